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


class _OneProcess:
    world = 1


def _bare_search(pis, dist=None):
    s = Search.__new__(Search)
    s.pi = [torch.nn.Parameter(p.clone()) for p in pis]
    s.dist = dist or _OneProcess()
    s.baseline = torch.full((len(pis),), float("nan"), dtype=torch.float64)
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
    for batch in (2, 1):  # with the other sample as baseline, and a lone sample (running mean)
        n_batches, total = 40_000 // batch, torch.zeros(6, dtype=torch.float64)
        noise = -torch.log(-torch.log(torch.rand(n_batches, batch, 6, generator=g, dtype=torch.float64)))
        draws = gumbel_argmax_reference(pi.expand(n_batches, batch, 6), noise, tau=2.0)
        for k in draws.tolist():
            total += s.score_gradients([0] * batch, k, ell[k])[0]
        mean = total / n_batches
        assert (mean - exact).abs().max() < 0.1 * exact.abs().max(), (batch, mean, exact)


def test_score_gradients_by_hand():
    """Two samples of concept 0 (baseline: the other one's error), one lone sample of concept 1
    (no history yet: no gradient); the sum is divided by the batch size. A second batch: the lone
    sample of concept 1 takes concept 1's running mean, which is its first error, then moves
    with decay 0.9. Mutation checked: baseline left out; a lone sample with baseline 0."""
    from ap_erase_fast.search import BASELINE_DECAY

    pi0, pi1 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, -1.0])
    s = _bare_search([pi0, pi1])
    got = s.score_gradients([0, 1, 0], [2, 0, 1], torch.tensor([0.3, 0.8, 0.1]))
    p0, p1 = torch.softmax(pi0, 0), torch.softmax(pi1, 0)
    e = torch.eye(3)
    want0 = -((0.3 - 0.1) * (e[2] - p0) + (0.1 - 0.3) * (e[1] - p0)) / 3
    assert torch.allclose(got[0], want0) and torch.equal(got[1], torch.zeros(2))
    got = s.score_gradients([1], [1], torch.tensor([0.5]))
    assert torch.allclose(got[1], -((0.5 - 0.8) * (torch.eye(2)[1] - p1)) / 1)
    assert float(s.baseline[1]) == pytest.approx(BASELINE_DECAY * 0.8 + (1 - BASELINE_DECAY) * 0.5)
    assert float(s.baseline[0]) == pytest.approx(0.2)


def test_equal_damage_leaves_pi_uniform_at_batch_one():
    """Every candidate does the same damage (ℓ = 1 + noise that does not depend on the draw):
    there is nothing to find, so π must stay uniform in expectation. |R| = 60, batch 1 (the
    authors' setting), π's Adam at lr 0.1, 40 steps, 64 seeds. Fixed margins: the probability of
    the last drawn candidate averages below 1.5× a uniform draw's (a baseline of 0 makes every
    step raise the logit of whatever was drawn: about 7.5×), and no candidate's probability,
    averaged over the seeds, is above 1.5× uniform."""
    n_r, ratios, mean_p = 60, [], torch.zeros(60, dtype=torch.float64)
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        s = _bare_search([torch.full((n_r,), 1.0 / n_r)])
        opt = torch.optim.Adam(s.pi, lr=0.1)
        for _ in range(40):
            k = int(torch.argmax(s.pi[0].detach() - torch.log(-torch.log(torch.rand(n_r, generator=g)))))
            ell = 1.0 + 0.1 * torch.rand(1, generator=g)
            opt.zero_grad()
            s.pi[0].grad = s.score_gradients([0], [k], ell)[0]
            opt.step()
        p = torch.softmax(s.pi[0].detach().double(), 0)
        ratios.append(float(p[k]) * n_r)
        mean_p += p / 64
    assert sum(ratios) / len(ratios) < 1.5, sum(ratios) / len(ratios)
    assert float(mean_p.max()) * n_r < 1.5


class _FakeRanks:
    """Two ranks in one process: ``gather`` returns what both ranks hand in for one call."""
    world = 2

    def __init__(self, shared):
        self.shared = shared

    def gather(self, obj):
        return self.shared


def test_ranks_compute_the_global_batch_estimate():
    """Two ranks of batch 1 equal one process of batch 2 (the issue's example: π = [0, 1, −1],
    errors [0.3, 0.1], draws [2, 1], one concept). Mutation checked: without the gather each rank
    uses a lone-sample baseline, and the ranks' average is a different vector."""
    pi = torch.tensor([0.0, 1.0, -1.0])
    one = _bare_search([pi]).score_gradients([0, 0], [2, 1], torch.tensor([0.3, 0.1]))[0]
    assert torch.allclose(one, torch.tensor([0.0, 0.1, -0.1]), atol=1e-6)
    shared = [([0], [2], [0.3]), ([0], [1], [0.1])]
    ranks = [_bare_search([pi], _FakeRanks(shared)).score_gradients([0], [k], torch.tensor([v]))[0]
             for k, v in ((2, 0.3), (1, 0.1))]
    assert torch.equal(ranks[0], ranks[1])
    assert torch.allclose((ranks[0] + ranks[1]) / 2, one, atol=1e-7)


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
        if len({er.search.draw(s.concept, s.gumbel, with_grad=False)[1] for s in d.samples}) == 2:
            break
    _, z_r = _latents(er, d)
    t = torch.tensor([s.t_ddpm for s in d.samples])
    alpha = er.tables.x0_alpha(d.t_enc)
    ells, idx = [], []
    with torch.no_grad():
        for i, s in enumerate(d.samples):
            c_a, k = er.search.draw(s.concept, s.gumbel, with_grad=False)
            zi, ti = z_r[i:i + 1], t[i:i + 1]
            ells.append(preservation_loss(er.models.query("trained", "grad", zi, ti, c_a),
                                          er.models.query("frozen", "frozen", zi, ti, c_a), zi, alpha,
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
        pi0 = [p.detach().clone() for p in er.search.pi]
        er.run_outer_step()  # iteration 0: θ′; iteration 1: π
        updates[est] = {n: p.detach() - theta0[n] for n, p in er.trained}
        pis[est] = [p.detach() - q for p, q in zip(er.search.pi, pi0)]
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


def test_resume_with_the_running_baseline_is_bit_identical(tmp_path, small_vocab):
    """Batch 1, two erased concepts (every sample is alone in its concept, so the running-mean
    baseline drives π): a run resumed from its step-1 checkpoint ends with the same π and θ′ bit
    for bit. Mutation checked: the baseline not restored on resume (π differs)."""
    from safetensors.torch import load_file

    from ap_erase_fast import EraseConfig, erase

    def cfg(out, **kw):
        return EraseConfig(model="tiny", erase=["garbage truck", "church"], steps=3, seed=1,
                           vocab=small_vocab, k_closest=60, num_centers=12, ddim_steps=10,
                           quiet=True, device="cpu", batch_size=1, search_estimator="score",
                           search_lr=1.0, checkpoint_every=1, output=str(out), **kw)

    erase(cfg(tmp_path / "full"))
    erase(cfg(tmp_path / "resumed", resume=str(tmp_path / "full.checkpoints" / "step-000001")))
    last = {name: tmp_path / f"{name}.checkpoints" / "step-000003" for name in ("full", "resumed")}
    state = {k: torch.load(p / "state.pt", weights_only=True) for k, p in last.items()}
    assert not state["full"]["score_baseline"].isnan().any()  # both concepts have a running mean
    assert torch.equal(state["full"]["score_baseline"], state["resumed"]["score_baseline"])
    for name in ("pi.safetensors", "trained.safetensors"):
        a, b = (load_file(str(p / name)) for p in last.values())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_shared_schedule_later_search_steps_move_pi(tiny_cfg):
    """The shared schedule with P = 4 under the score estimator: each outer step hands π one
    estimate from the joint pass and P − 2 = 2 more from its later search steps, each the
    estimate of the errors measured in that step (a step whose draws differ gives a non-zero
    one), and π's Adam steps P − 1 times. Mutation checked: the later search steps computing
    their errors without stepping π (fails), or stepping π with zero gradients (fails)."""
    er = _eraser(tiny_cfg, ("fast", "shared", "no"), ddim_steps=10, lr=1e-2, train_method="xattn",
                 batch_size=2, search_estimator="score", gumbel_mode="hard", pgd_steps=4)
    calls = []
    original = er.search.step

    def spy(grads, scaler=None):
        calls.append({c: g.detach().clone() for c, g in grads.items()})
        return original(grads, scaler)

    er.search.step = spy
    for _ in range(3):
        er.run_outer_step()
    er.search.step = original
    assert len(calls) == 3 * 3
    assert sum(bool(g.abs().max() > 0) for call in calls[1::3] + calls[2::3] for g in call.values()) >= 2
    assert int(er.search.optimizer.state[er.search.pi[0]]["step"]) == 9


def test_resume_keeps_one_skipped_step_counter(tmp_path, small_vocab):
    """After a resume the search and the θ′ update still count skipped fp16 steps into the run's
    own counter (run.json and later checkpoints read it), restored from the checkpoint. Mutation
    checked: rebinding the counter on resume (the parts keep counting into the old one)."""
    from ap_erase_fast import EraseConfig, erase
    from ap_erase_fast.engine import Eraser

    kw = dict(model="tiny", erase=["garbage truck"], steps=2, seed=1, vocab=small_vocab, k_closest=60,
              num_centers=12, ddim_steps=4, quiet=True, device="cpu", checkpoint_every=1)
    erase(EraseConfig(**kw, output=str(tmp_path / "run")))
    er = Eraser(EraseConfig(**kw)).setup()
    er.load_checkpoint(str(tmp_path / "run.checkpoints" / "step-000001"))
    assert er.search.skipped is er.skipped_steps and er.theta.skipped is er.skipped_steps
