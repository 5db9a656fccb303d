"""``--search-score normalised`` (ALGORITHM.md §10): π ascends Σ_i ℓ_i / s_i, where ℓ_i is
sample i's preservation error and s_i = ‖θ(z_r, c_a) − θ(z_r, "")‖² the drawn candidate's own
signal, and nothing else changes. Checked in every profile × schedule × dtype the command line
accepts, against a gradient computed here with plain autograd from the library's public calls.
"""
import pytest
import torch

from ap_erase_fast.objective import preservation_loss
from ap_erase_fast.steps import fast_iteration, reference_iteration, shared_outer_step

from test_definitions import COMBOS, IDS, _eraser, _latents, _load


def _captured_search_gradient(er, d):
    """Run the search update of draw ``d`` (a faithful search iteration, or a shared step) and
    return the unscaled gradients it handed to π's step (concept → ∂(−L_pres)/∂π)."""
    captured = {}
    original = er.search.step

    def spy(grads, scaler=None):
        scaler = scaler or er.search.scaler
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        captured.update({c: g.detach().float() / scale for c, g in grads.items()})
        return original(grads, scaler)

    er.search.step = spy
    profile, schedule = er.cfg.profile, er.cfg.schedule
    if schedule == "shared":
        shared_outer_step(er.ctx, d)
    else:
        (reference_iteration if profile == "reference" else fast_iteration)(er.ctx, d, False)
    er.search.step = original
    return captured


def _expected_gradient(er, d, z_r, normalised, swap=False):
    """∂/∂π of −(1/B)·Σ_i ℓ_i·w_i with θ(z_r, c_a) held (the authors' π objective); w_i = 1/s_i
    when ``normalised`` (``swap``: the weights of samples 0 and 1 exchanged), else 1. Also
    returns the s_i."""
    cfg = er.cfg
    t = torch.tensor([s.t_ddpm for s in d.samples], device=er.device)
    alpha = er.tables.x0_alpha(d.t_enc)
    ell_w, signals = [], []
    for i, s in enumerate(d.samples):
        c_a = er.search.draw(s.concept, s.gumbel, with_grad=True)[0]
        zi, ti = z_r[i:i + 1], t[i:i + 1]
        with torch.no_grad():
            e_ref = er.models.query("frozen", "frozen", zi, ti, c_a.detach())
            e_null = er.models.query("frozen", "frozen", zi, ti, er.models.null)
            signals.append(preservation_loss(e_ref, e_null, zi, alpha, cfg.loss_space).float())
        ell = preservation_loss(er.models.query("trained", "grad", zi, ti, c_a), e_ref, zi, alpha,
                                cfg.loss_space).float()
        ell_w.append(ell)
    weights = 1.0 / torch.stack(signals) if normalised else torch.ones(len(signals))
    if swap:
        weights = weights.flip(0)
    loss = -sum(e * w for e, w in zip(ell_w, weights)) / len(d.samples)
    concepts = sorted({s.concept for s in d.samples})
    grads = torch.autograd.grad(loss, [er.search.pi[c] for c in concepts])
    return dict(zip(concepts, grads)), torch.stack(signals)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_normalised_score_divides_each_samples_pi_gradient_by_its_signal(tiny_cfg, combo):
    """The gradient the search step gives π equals the one computed here, for two samples with
    different signals; the plain score (``mse``) keeps the authors' gradient.

    Mutations checked: the weight 1/s_i left out (w = 1); the two samples' weights exchanged
    (fails the batched profiles; the reference profile scores one sample at a time); the score
    left out of the shared schedule's joint loss (fails every shared case)."""
    tol = 2e-3 if combo[2] == "no" else 3e-2
    for score in ("normalised", "mse"):
        er = _eraser(tiny_cfg, combo, gumbel_mode="soft", ddim_steps=10, loss_space="eps", lr=1e-2,
                     train_method="xattn", batch_size=2, search_score=score)
        er.run_outer_step()  # θ′ ≠ θ: the preservation error and its π gradient are not zero
        d = er.draw()
        _, z_r = _latents(er, d)
        pi_old = [p.detach().clone() for p in er.search.pi]
        expected, signals = _expected_gradient(er, d, z_r, score == "normalised")
        got = _captured_search_gradient(er, d)
        assert set(got) == set(expected)
        errors = {}
        for c in expected:
            e, g = expected[c].float(), got[c]
            assert e.norm() > 0
            err = (g - e).norm()
            assert err <= tol * e.norm(), (score, c, err / e.norm())
            errors[c] = err
        # the check can tell the scores apart: the signals are far from 1, and the gradient
        # with the two samples' weights exchanged is ten times farther from the step's gradient
        # than the rounding seen here (the fp16 tolerance alone is wide enough to hold both on
        # some CPUs)
        assert ((signals - 1).abs() > 0.2).all(), signals
        if score == "normalised":
            swapped, _ = _expected_gradient(er, d, z_r, True, swap=True)
            for c in expected:
                gap = (swapped[c] - got[c]).norm()
                assert gap > 10 * errors[c] and gap > 1e-2 * expected[c].norm(), (gap, errors[c])
        _load(er, {n: p.detach() for n, p in er.trained}, pi_old)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[1] == "shared"],
                         ids=[i for c, i in zip(COMBOS, IDS) if c[1] == "shared"])
def test_normalised_score_leaves_the_theta_update_alone(tiny_cfg, combo):
    """In the shared schedule θ′ and π learn from one backward: θ′'s update (θ′ − θ₀) is
    bit-identical under both scores, over one outer step with P = 3 (the shared step and one
    more search step; π moves differently). Mutation checked: θ′'s
    preservation loss scaled by 1.01 under the normalised score (fails in fp32; Adam's first
    step is sign-like, so in bf16/fp16 only a sign change would show)."""
    updates = {}
    for score in ("mse", "normalised"):
        er = _eraser(tiny_cfg, combo, ddim_steps=10, train_method="xattn", batch_size=2,
                     pgd_steps=3, search_score=score)
        theta0 = {n: p.detach().clone() for n, p in er.trained}
        pi0 = [p.detach().clone() for p in er.search.pi]
        er.run_outer_step()
        updates[score] = {n: p.detach() - theta0[n] for n, p in er.trained}
        moved = [p.detach() - q for p, q in zip(er.search.pi, pi0)]
        assert any(m.abs().max() > 0 for m in moved)
        updates[score + "_pi"] = moved
    assert all(torch.equal(updates["mse"][n], updates["normalised"][n]) for n in updates["mse"])
    assert any(u.abs().max() > 0 for u in updates["mse"].values())
    assert not all(torch.equal(a, b) for a, b in zip(updates["mse_pi"], updates["normalised_pi"]))


def test_search_score_is_checked(tiny_cfg):
    from ap_erase_fast.errors import UserError

    with pytest.raises(UserError, match="--search-score"):
        tiny_cfg(search_score="relative").validate()
