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


def test_fast_profile_keeps_one_unet_and_frozen_copies_of_trained_tensors(tiny_cfg):
    eraser = Eraser(tiny_cfg(steps=1, mixed_precision="bf16")).setup()
    assert not hasattr(eraser, "frozen")  # no second UNet
    assert set(eraser.frozen_tensors) == set(eraser.trained_names)
    assert all(t.dtype == torch.bfloat16 for t in eraser.frozen_tensors.values())
    trained = {id(p) for _, p in eraser.trained}
    for p in eraser.unet.parameters():  # untrained weights: no gradient, compute dtype
        if id(p) not in trained:
            assert not p.requires_grad and p.dtype == torch.bfloat16
    assert all(p.requires_grad and p.dtype == torch.float32 for _, p in eraser.trained)
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
