"""``--search-estimator score`` (ALGORITHM.md §10): π follows the score-function estimate of
∇_π E_k[ℓ(k)] over the hard draw, with the batch's other samples of the same concept as baseline,
instead of the pathwise gradient through the relaxation. Checked: unbiased against the exact
gradient of the expectation, the baseline and the per-concept split by hand, the engine's search
step hands π exactly that estimate of the errors it measured, θ′'s update is the pathwise one's."""
import pytest
import torch

from ap_erase_fast.objective import preservation_loss
from ap_erase_fast.ops.reference import gumbel_argmax_reference
from ap_erase_fast.search import Search
from ap_erase_fast.steps import fast_iteration, shared_outer_step

from test_definitions import _eraser, _latents


def _bare_search(pis):
    s = Search.__new__(Search)
    s.pi = [torch.nn.Parameter(p.clone()) for p in pis]
    return s


def test_score_gradients_are_unbiased_for_the_expected_error():
    """Mean of the estimate over many hard draws (Gumbel-max at τ = 2, batches of two samples of
    one concept, and lone samples) = −∇_π Σ_k softmax(π)_k ℓ_k. Mutation checked: the probabilities
    at τ, softmax(π/τ), instead of softmax(π) (biased without a baseline: fails)."""
    g = torch.Generator().manual_seed(3)
    pi = torch.randn(6, generator=g, dtype=torch.float64)
    ell = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    s = _bare_search([pi])
    p = torch.softmax(pi, 0)
    exact = -(p * (ell - (p * ell).sum()))  # −∇ E_k[ℓ_k]
    for batch in (2, 1):  # with the other sample as baseline, and a lone sample (baseline 0)
        n_batches, total = 40_000 // batch, torch.zeros(6, dtype=torch.float64)
        noise = -torch.log(-torch.log(torch.rand(n_batches, batch, 6, generator=g, dtype=torch.float64)))
        draws = gumbel_argmax_reference(pi.expand(n_batches, batch, 6), noise, tau=2.0)
        for k in draws.tolist():
            total += s.score_gradients([0] * batch, k, ell[k])[0]
        mean = total / n_batches
        assert (mean - exact).abs().max() < 0.1 * exact.abs().max(), (batch, mean, exact)


def test_score_gradients_by_hand():
    """Two samples of concept 0 (baseline: the other one's error), one lone sample of concept 1
    (baseline 0); the sum is divided by the batch size. Mutation checked: baseline left out."""
    pi0, pi1 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, -1.0])
    s = _bare_search([pi0, pi1])
    got = s.score_gradients([0, 1, 0], [2, 0, 1], torch.tensor([0.3, 0.8, 0.1]))
    p0, p1 = torch.softmax(pi0, 0), torch.softmax(pi1, 0)
    e = torch.eye(3)
    want0 = -((0.3 - 0.1) * (e[2] - p0) + (0.1 - 0.3) * (e[1] - p0)) / 3
    want1 = -(0.8 * (torch.eye(2)[0] - p1)) / 3
    assert torch.allclose(got[0], want0) and torch.allclose(got[1], want1)


def _captured_step(er, d, schedule):
    captured = {}
    original = er.search.step

    def spy(grads, scaler=None):
        assert scaler is False  # unscaled: no loss scale touched them
        captured.update({c: g.detach().clone() for c, g in grads.items()})
        return original(grads, scaler)

    er.search.step = spy
    if schedule == "shared":
        shared_outer_step(er.ctx, d)
    else:
        fast_iteration(er.ctx, d, False)
    er.search.step = original
    return captured


@pytest.mark.parametrize("schedule", ["faithful", "shared"])
def test_engine_hands_pi_the_estimate_of_its_measured_errors(tiny_cfg, schedule):
    """The search step's π gradient = score_gradients of the draws and of ℓ_i computed here from
    the library's public calls (θ′ after one outer step ≠ θ), and no gradient reaches the
    denoiser from a faithful search step. Mutation checked: ℓ_i of the wrong sample (flipped)."""
    er = _eraser(tiny_cfg, ("fast", schedule, "no"), ddim_steps=10, lr=1e-2, train_method="xattn",
                 batch_size=2, search_estimator="score", gumbel_mode="hard")
    er.run_outer_step()
    for _ in range(50):  # two different candidates (the same one twice gives the estimate 0)
        d = er.draw()
        if len({er.draw_adversarial(s.concept, s.gumbel, with_grad=False)[1] for s in d.samples}) == 2:
            break
    _, z_r = _latents(er, d)
    t = torch.tensor([s.t_ddpm for s in d.samples])
    alpha = er.tables.x0_alpha(d.t_enc)
    ells, idx = [], []
    with torch.no_grad():
        for i, s in enumerate(d.samples):
            c_a, k = er.draw_adversarial(s.concept, s.gumbel, with_grad=False)
            zi, ti = z_r[i:i + 1], t[i:i + 1]
            ells.append(preservation_loss(er.query("trained", "grad", zi, ti, c_a),
                                          er.query("frozen", "frozen", zi, ti, c_a), zi, alpha,
                                          er.cfg.loss_space).float())
            idx.append(k)
    want = er.search.score_gradients([s.concept for s in d.samples], idx, torch.stack(ells))
    for _, p in er.trained:
        p.grad = None
    got = _captured_step(er, d, schedule)
    assert set(got) == set(want)
    for c in want:
        assert want[c].abs().max() > 0
        assert torch.allclose(got[c], want[c], rtol=1e-4, atol=1e-9), (got[c], want[c])
    if schedule == "faithful":
        assert all(p.grad is None for _, p in er.trained)


def test_theta_update_is_the_pathwise_runs(tiny_cfg):
    """The first outer step (before π has moved) gives θ′ the same update under both estimators;
    the search steps then move π differently."""
    updates, pis = {}, {}
    for est in ("pathwise", "score"):
        er = _eraser(tiny_cfg, ("fast", "faithful", "no"), ddim_steps=10, train_method="xattn",
                     batch_size=2, search_estimator=est, gumbel_mode="hard")
        theta0 = {n: p.detach().clone() for n, p in er.trained}
        pi0 = [p.detach().clone() for p in er.pi]
        er.run_outer_step()  # iteration 0: θ′; iteration 1: π
        updates[est] = {n: p.detach() - theta0[n] for n, p in er.trained}
        pis[est] = [p.detach() - q for p, q in zip(er.pi, pi0)]
    assert all(torch.equal(updates["pathwise"][n], updates["score"][n]) for n in updates["score"])
    assert any(u.abs().max() > 0 for u in updates["score"].values())
    assert any(m.abs().max() > 0 for m in pis["score"])
    assert not all(torch.equal(a, b) for a, b in zip(pis["pathwise"], pis["score"]))


def test_score_estimator_is_checked(tiny_cfg):
    from ap_erase_fast.errors import UserError

    for bad in ({"gumbel_mode": "soft"}, {"profile": "reference"}, {"search_score": "normalised"}):
        with pytest.raises(UserError, match="--search-estimator score"):
            tiny_cfg(search_estimator="score", **bad).validate()
    with pytest.raises(UserError, match="--search-estimator"):
        tiny_cfg(search_estimator="reinforce").validate()
