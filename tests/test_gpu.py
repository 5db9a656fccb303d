"""Engine checks on a CUDA device (skipped elsewhere; run by benchmarks/gpu_check.sh)."""
import pytest
import torch

from ap_erase_fast import erase

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fast_matches_reference_on_cuda(tiny_cfg):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = erase(tiny_cfg(steps=2, device="cuda", profile="reference"), write=False)
    fast = erase(tiny_cfg(steps=2, device="cuda", attention="classic", mixed_precision="no"),
                 write=False)
    assert [r["adv_word"] for r in ref.log] == [r["adv_word"] for r in fast.log]
    for name, value in ref.trained.items():
        err = (value - fast.trained[name]).abs().max() / value.abs().max()
        assert err < 1e-4, (name, float(err))


@pytest.mark.parametrize("schedule", ["faithful", "shared"])
def test_bf16_sdpa_runs_on_cuda(tiny_cfg, schedule):
    r = erase(tiny_cfg(steps=2, device="cuda", schedule=schedule, mixed_precision="bf16",
                       attention="sdpa", gradient_checkpointing=True), write=False)
    assert all(torch.isfinite(t).all() for t in r.trained.values())
    assert r.run_info["device"].startswith("cuda")
