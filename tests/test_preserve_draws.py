"""--preserve-draws K: θ′'s preservation term averages the errors of K candidates drawn from π
per sample. K = 1 is the authors' run; the further draws come from a generator of their own, so
every other draw is the same whatever K is; the fast profile computes what the reference profile
computes draw by draw; counts follow the cost model (ALGORITHM.md §7); resume is bit-identical."""
import json

import pytest
import torch

from ap_erase_fast import erase
from ap_erase_fast.errors import UserError

from _updates import assert_resume_bit_identical, relative_l2, run_updates


def _firsts(log):
    return [[{k: s[k] for k in ("slot", "concept", "t_ddpm", "adv_index", "bank_index") if k in s}
             for s in r["samples"]] for r in log]


@pytest.mark.parametrize("source", ["bank", "student"])
def test_fast_matches_the_reference_draw_by_draw(tiny_cfg, source):
    """K = 3, faithful schedule, two samples per step: the reference profile computes each
    draw's trajectory and error on its own and averages them; the fast profile batches every
    draw's rows. Same draws, updates within the fast-vs-reference tolerance, and not the
    update of K = 1 (the further draws change what θ′ learns)."""
    kw = dict(steps=2, batch_size=2, trajectories=source, mixed_precision="no", attention="classic",
              lr=1e-3, **({"bank_size": 3} if source == "bank" else {}))
    ref_theta, ref_pi, ref = run_updates(tiny_cfg(profile="reference", preserve_draws=3, **kw))
    fast_theta, fast_pi, fast = run_updates(tiny_cfg(preserve_draws=3, **kw))
    one_theta, _, one = run_updates(tiny_cfg(preserve_draws=1, **kw))
    assert [r["samples"] for r in ref.log] == [r["samples"] for r in fast.log]
    outer = [r for r in fast.log if r["kind"] == "outer"]
    assert all(len(s["extra_adv_index"]) == 2 for r in outer for s in r["samples"])
    assert all("extra_adv_index" not in s for r in fast.log if r["kind"] != "outer" for s in r["samples"])
    if source == "bank":
        assert all(len(s["extra_bank_index"]) == 2 for r in outer for s in r["samples"])
    assert relative_l2(fast_theta, ref_theta) < 2e-3 and relative_l2(fast_pi, ref_pi) < 5e-5
    assert relative_l2(one_theta, ref_theta) > 1e-2
    # the first draws, t_ddpm, x_T and bank indices are those of K = 1
    assert _firsts(one.log) == _firsts(fast.log)


def _draw_alone(er, d, k):
    """The one-draw preservation term of the samples' k-th draws."""
    import copy

    from ap_erase_fast.steps import _Batch, _joint_terms

    d1 = copy.copy(d)
    d1.samples = []
    for s in d.samples:
        s1 = copy.copy(s)
        if k:
            s1.gumbel, s1.bank_index = s.extra[k - 1]
        s1.extra = []
        d1.samples.append(s1)
    _, l_pres, _ = _joint_terms(er.ctx, _Batch(er.ctx, d1, pi_grad=False, draws=1))
    return l_pres


@pytest.mark.parametrize("schedule,frozen,grad", [("faithful", 3, 2), ("shared", 2, 1)])
def test_counts_follow_the_cost_model(tiny_cfg, schedule, frozen, grad):
    """With a bank, per sample and outer step: the outer update makes 2 + K frozen and 1 + K
    θ′ queries, and the faithful schedule's search step 1 + 1 more (§7)."""
    K, B = 3, 2
    r = erase(tiny_cfg(steps=2, schedule=schedule, trajectories="bank", bank_size=2, batch_size=B,
                       preserve_draws=K), write=False)
    extra = 1 if schedule == "faithful" else 0
    assert r.run_info["unet_calls_per_outer_step"] == {"frozen": B * (2 + K + extra),
                                                       "grad": B * (1 + K + extra)}


@pytest.mark.parametrize("estimator", ["pathwise", "score"])
def test_shared_schedule_steps_pi_from_every_draw(tiny_cfg, estimator):
    """Under the shared schedule π's step comes out of the outer loss, so it reads all K draws:
    the gradient π is stepped with differs from K = 1's on the same first draws."""
    from ap_erase_fast.engine import Eraser

    def first_pi_gradient(k):
        er = Eraser(tiny_cfg(steps=1, schedule="shared", trajectories="bank", bank_size=2, batch_size=2,
                             search_estimator=estimator, preserve_draws=k, mixed_precision="no")).setup()
        seen = []
        step = er.search.step
        er.search.step = lambda grads, **kw: (seen.append({c: g.clone() for c, g in grads.items()}),
                                              step(grads, **kw))[1]
        er.train()
        return seen[0], er

    g_k, er = first_pi_gradient(3)
    g_1, _ = first_pi_gradient(1)
    assert set(g_k) == set(g_1)
    assert all(torch.isfinite(g).all() for g in g_k.values())
    assert any(float(g_1[c].abs().sum()) > 0 for c in g_1)
    assert relative_l2([g_k[c] for c in sorted(g_k)], [g_1[c] for c in sorted(g_1)]) > 1e-2
    assert all(len(s["extra_adv_index"]) == 2 for r in er.log if r["kind"] == "shared"
               for s in r["samples"])


def test_resume_is_bit_identical(tiny_cfg, tmp_path):
    assert_resume_bit_identical(tiny_cfg, tmp_path, steps=4, trajectories="bank", bank_size=2, preserve_draws=2)
    info = json.loads((tmp_path / "full" / "run.json").read_text())
    assert info["config"]["preserve_draws"] == 2


def test_bad_values_are_refused(tiny_cfg):
    with pytest.raises(UserError, match="--preserve-draws must be at least 1"):
        tiny_cfg(preserve_draws=0).validate()


def test_preservation_term_is_the_mean_over_draws(tiny_cfg):
    """One outer update's preservation term with K = 4 equals the mean of the four one-draw
    terms computed separately on the same draws (same θ′ ≠ θ, same bank states)."""
    from ap_erase_fast.engine import Eraser
    from ap_erase_fast.steps import _Batch, _joint_terms

    er = Eraser(tiny_cfg(trajectories="bank", bank_size=3, preserve_draws=4, batch_size=2,
                         mixed_precision="no", lr=1e-2)).setup()
    er.run_outer_step()  # θ′ ≠ θ: the preservation errors are not 0
    d = er.plan.draw([len(s.words) for s in er.search.sets], er.models.tables, er.latent_shape)
    with torch.no_grad():
        _, l_all, _ = _joint_terms(er.ctx, _Batch(er.ctx, d, pi_grad=False, draws=4))
        each = torch.stack([_draw_alone(er, d, k) for k in range(4)])
    assert len({float(x) for x in each}) > 1  # the draws differ
    torch.testing.assert_close(l_all, each.mean(), rtol=1e-5, atol=0)
