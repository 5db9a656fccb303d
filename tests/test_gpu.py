"""Engine checks on an accelerator: run by benchmarks/gpu_check.sh on CUDA, and by its
``--cpu-dry-run`` on the CPU (``AP_ERASE_TEST_DEVICE=cpu``) so that the checks themselves are
known to work before a GPU is available. Skipped in the normal test run without CUDA.

Each check prints one ``GPUCHECK {json}`` line with what it measured; gpu_check.sh collects
them into its results file.
"""
import json
import os

import pytest
import torch

from ap_erase_fast import erase

DEVICE = os.environ.get("AP_ERASE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device (or AP_ERASE_TEST_DEVICE=cpu)")]


def _report(check, **values):
    print("GPUCHECK " + json.dumps({"check": check, "device": DEVICE, **values}), flush=True)


@pytest.fixture(autouse=True)
def _no_tf32():
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.mark.parametrize("train_method", ["xattn", "noxattn"])
def test_fast_matches_reference(tiny_cfg, train_method):
    """fp32, classic attention: the fast profile's updates equal the reference's within the
    mutation-checked tolerances of tests/test_engine.py."""
    from test_engine import assert_fast_equals_reference

    _, _, errors = assert_fast_equals_reference(tiny_cfg, train_method, device=DEVICE)
    _report("fast_vs_reference", train_method=train_method, theta_rel_l2=errors[0],
            pi_rel_l2=errors[1])


@pytest.mark.parametrize("schedule", ["faithful", "shared"])
def test_low_precision_follows_fp32(tiny_cfg, schedule):
    """bf16 and fp16 (loss-scaled) autocast against fp32 on the device: update directions and
    sizes (tests/test_fast_options.py)."""
    from test_fast_options import COS_MIN, low_precision_update_agreement

    for mp, (cos, ratio, cos_pi) in low_precision_update_agreement(tiny_cfg, schedule,
                                                                   DEVICE).items():
        _report("low_precision", schedule=schedule, mixed_precision=mp, cos_theta=cos,
                norm_ratio=ratio, cos_pi=cos_pi)
        assert cos > COS_MIN[mp] and 0.8 < ratio < 1.25 and cos_pi > 0.9, (mp, cos, ratio, cos_pi)


@pytest.mark.parametrize("mp", ["bf16", "fp16"])
def test_theta_equals_theta_prime_at_the_first_step(tiny_cfg, mp):
    """On a model whose norms are not exact in bf16/fp16: the first preservation term is 0
    (on CUDA, up to the rounding of batches of different sizes; the value is reported)."""
    from test_definitions import _eraser

    er = _eraser(tiny_cfg, ("fast", "faithful", mp), device=DEVICE)
    first = er.run_outer_step()[0]
    _report("first_preservation_term", mixed_precision=mp, loss_preserve=first["loss_preserve"],
            loss_erase=first["loss_erase"])
    assert first["loss_preserve"] <= 1e-6 * first["loss_erase"], first


def test_sdpa_bf16_checkpointing_and_8bit(tiny_cfg):
    """The consumer-card configuration: bf16, SDPA, gradient checkpointing, AdamW 8-bit, on
    both schedules; gradient checkpointing gives the same updates as without (fp32)."""
    pytest.importorskip("bitsandbytes")
    from _updates import relative_l2, run_updates

    for schedule in ("faithful", "shared"):
        r = erase(tiny_cfg(steps=2, device=DEVICE, schedule=schedule, mixed_precision="bf16",
                           attention="sdpa", gradient_checkpointing=True,
                           optimizer="adamw8bit", train_method="noxattn"), write=False)
        assert all(torch.isfinite(t).all() for t in r.trained.values())
        assert r.run_info["device"].startswith(DEVICE)
    plain = run_updates(tiny_cfg(steps=2, device=DEVICE, mixed_precision="no"))[0]
    ckpt = run_updates(tiny_cfg(steps=2, device=DEVICE, mixed_precision="no",
                                gradient_checkpointing=True))[0]
    err = relative_l2(ckpt, plain)
    _report("gradient_checkpointing", theta_rel_l2=err)
    assert err < 1e-4


def test_compile_matches_eager(tiny_cfg, tmp_path, monkeypatch):
    """--compile (CUDA graphs through mode reduce-overhead on CUDA) against eager, fp32 and
    bf16."""
    from _updates import relative_l2, run_updates

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for mp in ("no", "bf16"):
        eager = run_updates(tiny_cfg(steps=2, device=DEVICE, mixed_precision=mp))
        comp = run_updates(tiny_cfg(steps=2, device=DEVICE, mixed_precision=mp, compile=True))
        assert comp[2].compiled_sampler is not None
        assert [r["samples"] for r in eager[2].log] == [r["samples"] for r in comp[2].log]
        err = relative_l2(comp[0], eager[0])
        _report("compile", mixed_precision=mp, theta_rel_l2=err)
        assert err < (1e-4 if mp == "no" else 0.1), (mp, err)


def test_xformers_matches_sdpa(tiny_cfg):
    """xformers attention against SDPA (fp32 and bf16): same draws, close updates."""
    pytest.importorskip("xformers")
    if DEVICE != "cuda":
        pytest.skip("xformers runs on CUDA only")
    from _updates import relative_l2, run_updates

    for mp in ("no", "bf16"):
        sdpa = run_updates(tiny_cfg(steps=2, device=DEVICE, mixed_precision=mp))
        xf = run_updates(tiny_cfg(steps=2, device=DEVICE, mixed_precision=mp,
                                  attention="xformers"))
        err = relative_l2(xf[0], sdpa[0])
        _report("xformers", mixed_precision=mp, theta_rel_l2=err)
        assert err < (1e-3 if mp == "no" else 0.1), (mp, err)
