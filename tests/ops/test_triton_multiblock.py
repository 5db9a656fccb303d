"""The Triton kernels' multi-program paths, run on the CPU interpreter against the reference.

The interpreter's own tuning runs one big program per pass, so on its own it never reaches the
paths a GPU takes. Here the launchers run under other tunings (``triton_gumbel_mix.tuning``):

* ``GPU_TUNING`` with the program count of an H100 (528): exactly the block sizes and grids a
  GPU launch plans (the configurations tests/ops/test_gpu_build.py compiles), so the weights
  loop over several 1024-blocks (N > 1024), split-N in the forward (fp32 partials over row
  slices), split-D in the backward (partial d w summed by the softmax backward) and G > 8
  chunking run here;
* tiny blocks (8-row weights blocks, 16- and 4-column tiles, 4 draws per launch, 64 programs):
  every multi-block, split and chunked path on small, fast shapes.

Forward and both gradients, hard / soft / top-k, fp32 / bf16 / fp16 tables, given and in-kernel
noise. Each test also asserts that its shape really plans the path it is named after.

Mutations checked (each made at least one test here fail): the forward's split-N partials summed
over only the first slice (``out[:1].sum(0)``); ``_softmax_bwd_kernel`` reading only the first
split partial (``range(0, 1)``); the weights kernel's running max not carried across blocks
(``best`` reset per block); the chunked backward dropping the last chunk's d table; the top-k
tie rank not carried across blocks (``seen_eq`` reset per block).
"""
import pytest
import torch

from _ops_testlib import DEVICE, MODES, assert_matches_reference, require_backend

tgm = pytest.importorskip("ap_erase_fast.ops.triton_gumbel_mix", exc_type=ImportError)

pytestmark = pytest.mark.triton
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
H100_PROGRAMS = 4 * 132
# 8-row weights blocks, 2-row x 16-column forward tiles, 4 x 4 backward tiles, 4 draws per launch
TINY = dict(weights_block=8, fwd_block_n=2, fwd_block_d=16, bwd_block_n=4, bwd_block_d=4, l2_block_n=4,
            l2_block_d=16, scale_rows_by_g=False, fit_blocks=False, max_g=4, programs=64)
# each mode and each dtype once (the interpreter is slow: a full grid would take minutes)
LATIN = [("soft", torch.float16), ("hard", torch.float32), ("topk", torch.bfloat16)]
LATIN2 = [("soft", torch.bfloat16), ("hard", torch.float16), ("topk", torch.float32)]


def _gpu():
    return tgm.tuning(tgm.GPU_TUNING, programs=H100_PROGRAMS)


def _noise(dtype):
    return "given" if dtype == torch.bfloat16 else "seed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_plans_split_n_and_multiblock_weights(mode, dtype):
    """GPU plans, both gradients: N = 1030 > 1024 (two weights blocks), split-N forward."""
    require_backend("triton")
    G, N, E = 2, 1030, (13,)
    t = tgm.GPU_TUNING
    assert N > tgm.plan_weights(N, t)
    assert tgm.plan_mix_forward(N, 13, G, H100_PROGRAMS, t).split > 1
    with _gpu():
        assert_matches_reference("triton", G, N, E, dtype, mode, noise=_noise(dtype), device=DEVICE)


@pytest.mark.parametrize("mode,dtype", LATIN, ids=str)
def test_gpu_plans_split_d_backward(mode, dtype):
    """GPU plans, frozen table (the engine's case): the backward splits D across programs."""
    require_backend("triton")
    G, N, E = 3, 100, (100, 11)
    assert tgm.plan_mix_backward(N, 1100, G, False, H100_PROGRAMS, tgm.GPU_TUNING).split > 1
    with _gpu():
        assert_matches_reference("triton", G, N, E, dtype, mode, noise=_noise(dtype), device=DEVICE,
                                 table_grad=False)


@pytest.mark.parametrize("mode,dtype", LATIN2, ids=str)
def test_gpu_plans_more_than_8_draws(mode, dtype):
    """GPU plans, G = 11 > 8 draws per launch: chunks of 8 + 3 (the second masked: G < BLOCK_G),
    d table from one launch over all 11 draws; both gradients, then a frozen table."""
    require_backend("triton")
    assert 11 > tgm.GPU_TUNING.max_g
    with _gpu():
        assert_matches_reference("triton", 11, 40, (9,), dtype, mode, noise=_noise(dtype), device=DEVICE)
        assert_matches_reference("triton", 11, 40, (9,), dtype, mode, noise="seed", device=DEVICE,
                                 table_grad=False, seed=1)


@pytest.mark.parametrize("table_grad", [True, False], ids=["both_grads", "frozen_table"])
@pytest.mark.parametrize("mode,dtype", LATIN, ids=str)
def test_tiny_blocks_every_multiblock_path(mode, dtype, table_grad):
    """Tiny blocks: 5 weights blocks, split-N forward, split-D backward (frozen table), G = 7 in
    launches of 4 + 3; top-k with k = 7 spans several blocks."""
    require_backend("triton")
    G, N, E = 7, 40, (3, 7)
    with tgm.tuning(tgm.GPU_TUNING, **TINY) as t:
        assert N >= 5 * tgm.plan_weights(N, t) and G > t.max_g
        assert tgm.plan_mix_forward(N, 21, t.max_g, t.programs, t).split > 1
        assert tgm.plan_mix_backward(N, 21, t.max_g, False, t.programs, t).split > 1
        assert_matches_reference("triton", G, N, E, dtype, mode, noise=_noise(dtype), device=DEVICE,
                                 table_grad=table_grad, k=7)


def test_top_k_ties_across_blocks():
    """Top-k whose threshold value is tied across several weights blocks: the kept ties are the
    lowest indices, counted across blocks (tiny blocks, given noise of equal values)."""
    require_backend("triton")
    from ap_erase_fast.ops import gumbel_mix
    from ap_erase_fast.ops.reference import gumbel_mix_reference

    N = 60
    logits = torch.zeros(1, N, device=DEVICE)
    logits[:, ::7] = 1.0  # 9 tied maxima spread over 8 blocks of 8
    gumbel = torch.zeros(1, N, device=DEVICE)
    table = torch.randn(N, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with tgm.tuning(tgm.GPU_TUNING, **TINY):
        got = gumbel_mix(logits, table, topk=5, gumbel=gumbel, backend="triton")
    want = gumbel_mix_reference(logits, table, topk=5, gumbel=gumbel)
    torch.testing.assert_close(want, table[[0, 7, 14, 21, 28]].mean(0, keepdim=True))  # lowest tied indices
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tuning_kw,E", [(dict(programs=H100_PROGRAMS), (77, 32)), (TINY, (7, 13))],
                         ids=["gpu", "tiny"])
def test_l2_scores_split_d(tuning_kw, E):
    require_backend("triton")
    from ap_erase_fast.ops import l2_scores
    from ap_erase_fast.ops.reference import l2_scores_reference

    gen = torch.Generator().manual_seed(4)
    table = torch.randn((40,) + E, generator=gen).to(torch.bfloat16).to(DEVICE)
    q = torch.randn(E, generator=gen).to(DEVICE)
    with tgm.tuning(tgm.GPU_TUNING, **tuning_kw) as t:
        assert tgm.plan_l2(40, E[0] * E[1], t.programs, t).split > 1
        got = l2_scores(q, table, backend="triton")
    torch.testing.assert_close(got, l2_scores_reference(q, table), rtol=1e-5, atol=1e-4)


def test_tuning_validates_and_restores():
    with pytest.raises(ValueError, match="power of two"):
        with tgm.tuning(fwd_block_d=48):
            pass
    before = tgm.current_tuning()
    with tgm.tuning(max_g=3) as t:
        assert tgm.current_tuning() is t and t.max_g == 3
    assert tgm.current_tuning() == before
