"""Run an erasure and return what it changed: θ′ − θ₀ per trained tensor and π − π₀ per
erased concept (equivalence tests compare updates, never weights: weights are ~1, updates ~1e-5)."""
import torch

from ap_erase_fast.engine import Eraser


def run_updates(cfg, components=None):
    er = Eraser(cfg, components=components).setup()
    theta0 = {n: p.detach().float().cpu().clone() for n, p in er.trained}
    pi0 = [p.detach().cpu().clone() for p in er.search.pi]
    er.train()
    state = er.trained_state()
    d_theta = {n: state[n].float() - theta0[n] for n in theta0}
    d_pi = [p.detach().cpu() - q for p, q in zip(er.search.pi, pi0)]
    return d_theta, d_pi, er


def relative_l2(a, b):
    """‖a − b‖ / ‖b‖ over all tensors of two update sets (dicts or lists, same order)."""
    xs = list(a.values()) if isinstance(a, dict) else list(a)
    ys = list(b.values()) if isinstance(b, dict) else list(b)
    x = torch.cat([t.flatten().float() for t in xs])
    y = torch.cat([t.flatten().float() for t in ys])
    assert float(y.norm()) > 0, "the reference run changed nothing"
    return float((x - y).norm() / y.norm())


def assert_resume_bit_identical(make_cfg, tmp_path, at: int = 2, **kw):
    """Run ``make_cfg(**kw)`` uninterrupted, then again with a checkpoint every ``at`` steps and
    resumed from step ``at``: the same log and trained tensors bit for bit. Returns (full,
    resumed) and leaves the uninterrupted run's folder at ``tmp_path / "full"``."""
    from ap_erase_fast import erase

    full = erase(make_cfg(**kw, output=str(tmp_path / "full")))
    erase(make_cfg(**kw, output=str(tmp_path / "part"), checkpoint_every=at))
    resumed = erase(make_cfg(**kw, output=str(tmp_path / "res"),
                             resume=str(tmp_path / "part.checkpoints" / f"step-{at:06d}")))
    assert full.log == resumed.log
    for name in full.trained:
        assert torch.equal(full.trained[name], resumed.trained[name]), name
    return full, resumed
