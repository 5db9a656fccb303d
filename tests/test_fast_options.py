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
    states = [s for s in eraser.theta.optimizer.state.values() if "state1" in s]
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
    assert eraser.components.text_encoder is None  # prompt embeddings were computed once


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


# Adam's first steps are nearly sign(g): entries whose gradient is small flip sign under bf16
# rounding (measured on CPU: cos 0.92 for bf16, 0.995 for fp16); a sign or scale bug gives cos
# near -1 or 0, unscaled fp16 loses most entries.
COS_MIN = {"bf16": 0.8, "fp16": 0.95}


def low_precision_update_agreement(tiny_cfg, schedule, device="cpu"):
    """{"bf16"|"fp16": (cos θ-updates, norm ratio, cos π-updates)} against an fp32 run."""
    from _updates import run_updates

    from ap_erase_fast.models import load_components

    def flat(updates):
        return torch.cat([v.flatten() for v in (updates.values() if isinstance(updates, dict)
                                                else updates)])

    runs = {}
    for mp in ("no", "bf16", "fp16"):
        cfg = tiny_cfg(steps=3, mixed_precision=mp, schedule=schedule, lr=1e-4, search_lr=0.1,
                       seed=3, device=device)
        d_theta, d_pi, eraser = run_updates(cfg, components=load_components("tiny"))
        assert eraser.theta.scaler.is_enabled() == (mp == "fp16")
        runs[mp] = flat(d_theta), flat(d_pi)
    ref_theta, ref_pi = runs.pop("no")
    assert ref_theta.abs().max() > 0 and ref_pi.abs().max() > 0
    cos = torch.nn.functional.cosine_similarity
    return {mp: (float(cos(t, ref_theta, dim=0)), float(t.norm() / ref_theta.norm()),
                 float(cos(p, ref_pi, dim=0))) for mp, (t, p) in runs.items()}


@pytest.mark.parametrize("schedule", ["faithful", "shared"])
def test_low_precision_updates_follow_fp32(tiny_cfg, schedule):
    """bf16 and fp16 compute give the fp32 run's updates θ′ − θ₀ and π − π₀ (fp32 masters;
    fp16 with loss scaling), judged by direction and size, not by the Adam step budget.

    Mutations checked: fp16 without loss scaling (GradScaler disabled) fails both schedules;
    fp16 with a loss scale pinned at 1 fails the faithful schedule (its π-only search gradients
    flush to zero in an unscaled fp16 backward).
    """
    for mp, (cos, ratio, cos_pi) in low_precision_update_agreement(tiny_cfg, schedule).items():
        assert cos > COS_MIN[mp] and 0.8 < ratio < 1.25 and cos_pi > 0.9, (mp, cos, ratio, cos_pi)
