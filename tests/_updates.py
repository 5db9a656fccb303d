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
