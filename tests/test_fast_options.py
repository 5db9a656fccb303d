"""Fast-profile options: 8-bit optimizers, gradient checkpointing, attention backends, precision."""
import sys

import pytest
import torch

from ap_erase_fast import erase
from ap_erase_fast.engine import Eraser
from ap_erase_fast.errors import UserError


def test_adamw8bit_keeps_8bit_states(tiny_cfg):
    pytest.importorskip("bitsandbytes")
    eraser = Eraser(tiny_cfg(train_method="noxattn", optimizer="adamw8bit", steps=1)).setup()
    eraser.run_outer_step()
    states = [s for s in eraser.optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)
    assert all(torch.isfinite(p).all() for _, p in eraser.trained)
    assert all(p.dtype == torch.float32 for _, p in eraser.trained)


def test_paged_adamw8bit_runs_on_cpu(tiny_cfg):
    pytest.importorskip("bitsandbytes")
    r = erase(tiny_cfg(optimizer="paged_adamw8bit", steps=1), write=False)
    assert len(r.log) == 2


def test_missing_bitsandbytes_is_a_clear_error(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"pip install 'ap_erase_fast\[bnb\]'"):
        erase(tiny_cfg(optimizer="adamw8bit", steps=1), write=False)


def test_gradient_checkpointing_gives_the_same_result(tiny_cfg):
    plain = erase(tiny_cfg(steps=2, mixed_precision="no"), write=False)
    ckpt = erase(tiny_cfg(steps=2, mixed_precision="no", gradient_checkpointing=True),
                 write=False)
    assert [r["samples"] for r in plain.log] == [r["samples"] for r in ckpt.log]
    for name, value in plain.trained.items():
        torch.testing.assert_close(ckpt.trained[name], value, rtol=1e-6, atol=1e-8)


def test_xformers_without_cuda_is_a_clear_error(tiny_cfg):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(UserError, match="xformers"):
        erase(tiny_cfg(attention="xformers", steps=1), write=False)


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_fast_profile_keeps_one_unet_and_frozen_copies_of_trained_tensors(tiny_cfg, method):
    """Untrained weights of linear and convolution layers are stored in the compute dtype
    (autocast casts them to it anyway); norm layers keep fp32 (autocast runs them in fp32, so
    rounding their weights would change the model). Frozen copies of trained tensors follow the
    same rule. Mutation checked: every untrained weight cast to bf16 (the old rule) fails."""
    eraser = Eraser(tiny_cfg(steps=1, mixed_precision="bf16", train_method=method)).setup()
    assert not hasattr(eraser, "frozen")  # no second UNet
    assert set(eraser.frozen_tensors) == set(eraser.trained_names)
    modules = dict(eraser.unet.named_modules())
    lowp = (torch.nn.Linear, torch.nn.Conv2d)
    kinds = set()
    for name, p in eraser.unet.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        want = torch.bfloat16 if isinstance(owner, lowp) else torch.float32
        kinds.add(type(owner).__name__)
        if name in eraser.frozen_tensors:  # trained: fp32 master, copy as autocast reads it
            assert p.requires_grad and p.dtype == torch.float32
            assert eraser.frozen_tensors[name].dtype == want, name
        else:  # untrained: no gradient
            assert not p.requires_grad and p.dtype == want, name
    assert {"GroupNorm", "LayerNorm", "Linear", "Conv2d"} <= kinds
    eraser.run_outer_step()
    assert eraser.text_encoder is None  # prompt embeddings were computed once


def test_compiled_sampling_step_gives_the_same_result(tiny_cfg, monkeypatch, tmp_path):
    """--compile traces the no-grad sampling call (one graph per batch shape, reused for every
    trajectory length); the result matches eager execution to fp32 rounding."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = erase(tiny_cfg(steps=2, mixed_precision="no"), write=False)
    eraser = Eraser(tiny_cfg(steps=2, mixed_precision="no", compile=True)).setup()
    eraser.train()
    assert eraser.compiled_sampler is not None
    assert [r["samples"] for r in eager.log] == [r["samples"] for r in eraser.log]
    for name, value in eager.trained.items():
        torch.testing.assert_close(eraser.trained_state()[name], value, rtol=1e-5, atol=1e-7)


def _updates(result, theta0):
    return torch.cat([(result.trained[n] - theta0[n]).flatten() for n in sorted(theta0)])


@pytest.mark.parametrize("schedule", ["faithful", "shared"])
def test_low_precision_updates_follow_fp32(tiny_cfg, schedule):
    """bf16 and fp16 compute give the fp32 run's updates θ′ − θ₀ and π − π₀ (fp32 masters;
    fp16 with loss scaling), judged by direction and size, not by the Adam step budget.

    Mutation checked: fp16 without loss scaling (GradScaler disabled) fails: AP's gradients
    flush to zero in an unscaled fp16 backward.
    """
    from ap_erase_fast.models import load_components

    theta0 = None
    runs = {}
    for mp in ("no", "bf16", "fp16"):
        comp = load_components("tiny")
        cfg = tiny_cfg(steps=3, mixed_precision=mp, schedule=schedule, lr=1e-4, search_lr=0.1,
                       seed=3)
        eraser = Eraser(cfg, components=comp).setup()
        theta0 = theta0 or {n: p.detach().clone() for n, p in eraser.trained}
        pi0 = eraser.pi[0].detach().clone()
        eraser.train()
        res = type("R", (), {"trained": eraser.trained_state()})
        runs[mp] = (_updates(res, theta0), eraser.pi[0].detach() - pi0, eraser)
    ref_theta, ref_pi, _ = runs["no"]
    assert ref_theta.abs().max() > 0 and ref_pi.abs().max() > 0
    for mp in ("bf16", "fp16"):
        d_theta, d_pi, eraser = runs[mp]
        cos = torch.nn.functional.cosine_similarity(d_theta, ref_theta, dim=0)
        assert cos > 0.9, (mp, float(cos))
        assert 0.8 < float(d_theta.norm() / ref_theta.norm()) < 1.25, mp
        cos_pi = torch.nn.functional.cosine_similarity(d_pi, ref_pi, dim=0)
        assert cos_pi > 0.9, (mp, float(cos_pi))
    assert runs["fp16"][2].scaler.is_enabled() and not runs["bf16"][2].scaler.is_enabled()
