"""Every fast backend against the PyTorch reference: forward, index, d logits, d table."""
import itertools

import pytest
import torch

from _ops_testlib import DEVICE, MODES, assert_matches_reference, native_backend_for, require_backend

NATIVE = native_backend_for(DEVICE)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Small embedding: the full grid of modes x G x N x dtype.
SMALL = list(itertools.product(MODES, (1, 3), (1, 2, 7, 1031), DTYPES))
# SD1.x embedding (77, 768): every N in fp32, low precision on a small table.
BIG = [(m, 3, n, torch.float32) for m in MODES for n in (1, 2, 7, 1031)] + \
      [(m, g, 7, dt) for m in MODES for g in (1, 3) for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("mode,G,N,dtype", SMALL)
def test_native_small_e(mode, G, N, dtype):
    require_backend(NATIVE)
    assert_matches_reference(NATIVE, G, N, (13,), dtype, mode, device=DEVICE)


@pytest.mark.parametrize("mode,G,N,dtype", BIG)
def test_native_sd_embedding(mode, G, N, dtype):
    require_backend(NATIVE)
    assert_matches_reference(NATIVE, G, N, (77, 768), dtype, mode, device=DEVICE)


@pytest.mark.parametrize("layout,E", [("rows", (13,)), ("cols", (13,)), ("rows", (77, 768)), ("perm", (77, 768))])
@pytest.mark.parametrize("mode", MODES)
def test_native_non_contiguous(layout, E, mode):
    require_backend(NATIVE)
    assert_matches_reference(NATIVE, 3, 7, E, torch.bfloat16 if len(E) > 1 else torch.float32, mode,
                             layout=layout, device=DEVICE)


@pytest.mark.parametrize("mode", MODES)
def test_native_in_kernel_noise_matches_reference(mode):
    """With gumbel=None the native Philox stream equals the reference's for the same seed."""
    require_backend(NATIVE)
    assert_matches_reference(NATIVE, 3, 1031, (13,), torch.float32, mode, noise="seed", device=DEVICE)


# ------------------------------------------------------------------ Triton lane (interpreter on CPU)
TRITON_SMALL = [(m, g, n, dt) for m in MODES for g in (1, 3) for n in (1, 2, 7, 1031) for dt in DTYPES
                if dt == torch.float32 or n in (7, 1031)]
TRITON_BIG = [("soft", 3, 7, torch.float32), ("hard", 3, 7, torch.bfloat16), ("topk", 1, 7, torch.float16),
              ("soft", 1, 2, torch.bfloat16)]


@pytest.mark.triton
@pytest.mark.parametrize("mode,G,N,dtype", TRITON_SMALL)
def test_triton_small_e(mode, G, N, dtype):
    require_backend("triton")
    assert_matches_reference("triton", G, N, (13,), dtype, mode, device=DEVICE)


@pytest.mark.triton
@pytest.mark.parametrize("mode,G,N,dtype", TRITON_BIG)
def test_triton_sd_embedding(mode, G, N, dtype):
    require_backend("triton")
    assert_matches_reference("triton", G, N, (77, 768), dtype, mode, device=DEVICE)


@pytest.mark.triton
@pytest.mark.parametrize("layout,E,mode", [("rows", (13,), "soft"), ("cols", (13,), "topk"), ("perm", (77, 768), "hard")])
def test_triton_non_contiguous(layout, E, mode):
    require_backend("triton")
    assert_matches_reference("triton", 3, 7, E, torch.float32, mode, layout=layout, device=DEVICE)


@pytest.mark.triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_in_kernel_noise_matches_reference(mode):
    require_backend("triton")
    assert_matches_reference("triton", 3, 1031, (13,), torch.float32, mode, noise="seed", device=DEVICE)
