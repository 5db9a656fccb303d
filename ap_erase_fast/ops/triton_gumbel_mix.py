"""Triton kernels for gumbel_mix and l2_scores (CUDA; CPU tensors under TRITON_INTERPRET=1).

Layers: ``_*_kernel`` (Triton) -> launchers ``weights`` / ``mix_forward`` / ``mix_backward`` /
``l2_scores`` (the backend interface of :mod:`._backends`) -> ``GumbelMixFunction`` in
:mod:`.gumbel_mix`.

* ``_weights_kernel``: one program per draw. Philox noise (``tl.rand``, same stream as the
  reference), z = (logits + g) / tau, running max / first argmax, softmax; for top-k, an exact
  32-step bisection on order-preserving integer keys of z finds the k-th largest score, ties go
  to the lower index (running rank across blocks), and the kept y are renormalised.
* ``_mix_fwd_kernel``: out[g, d] = sum_n w[g, n] T[n, d]; a program owns a column tile and a
  slice of rows and reads each table element once for all G draws (fp32 accumulation).
  Row slices (split-N) write fp32 partials [S, G, D] summed in a fixed order: deterministic.
* ``_mix_bwd_kernel``: a program owns a row tile and a slice of columns; one read of T gives
  d w[g, n] = <T[n], grad_out[g]> for all g, and (optionally) d T = table_w^T grad_out is
  written from the same tiles (for more draws than one launch holds, d T comes from one launch
  that loops over the chunks of draws, so it is rounded to the table dtype once).
* ``_softmax_bwd_kernel``: sums the split partials and applies the softmax backward
  dz = w * (gw - <w, gw>), d logits = dz / tau (restricted to the kept set for top-k).
* ``_l2_kernel``: sum_d (T[n, d] - q[d])^2 per row, split over columns, sqrt on the host side.

Block sizes and grids come from the pure ``plan_*`` functions and a :class:`Tuning`
(:data:`GPU_TUNING` on CUDA, :data:`INTERPRETER_TUNING` under ``TRITON_INTERPRET=1``); the
:func:`tuning` context manager replaces it, which is how the tests run the GPU's own plans, and
small blocks that reach every multi-block path, on the CPU interpreter.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _topk_keep(z, mask, thr, seen_eq, need_eq):
    """Which entries of a block are among the top k: keys above the threshold, plus the first
    ``need_eq`` entries (lowest index first) equal to it. Returns (keep, updated seen_eq)."""
    key = _sort_key(z)
    eq = (mask & (key == thr)).to(tl.int64)
    rank = seen_eq + tl.cumsum(eq, axis=0) - eq
    keep = mask & ((key > thr) | ((eq > 0) & (rank < need_eq)))
    return keep, seen_eq + tl.sum(eq, axis=0)


@triton.jit
def _sort_key(z):
    # int32 key with the same order as the float32 value (negative floats: flip magnitude bits)
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _weights_kernel(L, GN, W, IDX, N, seed, tau, k,
                    HAS_GUMBEL: tl.constexpr, USE_TOPK: tl.constexpr, BLOCK_N: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    base = g * N
    offs = tl.arange(0, BLOCK_N)
    # pass 1: scores (kept in W), running max and first argmax
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int64)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs
        mask = n < N
        lg = tl.load(L + base + n, mask=mask, other=0.0).to(tl.float32)
        if HAS_GUMBEL:
            noise = tl.load(GN + base + n, mask=mask, other=0.0).to(tl.float32)
        else:
            u = tl.rand(seed, (base + n).to(tl.uint32))
            noise = -tl.log(-tl.log(u + 1e-10) + 1e-10)
        z = (lg + noise) / tau
        tl.store(W + base + n, z, mask=mask)
        z = tl.where(mask, z, float("-inf"))
        upd = z > best
        best = tl.where(upd, z, best)
        best_i = tl.where(upd, n.to(tl.int64), best_i)
    m = tl.max(best, axis=0)
    arg = tl.min(tl.where(best == m, best_i, N), axis=0)
    tl.store(IDX + g, arg)

    if USE_TOPK:
        # k-th largest key: largest t with #{key >= t} >= k, by bisection over the int32 range
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros([], tl.int64)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + offs
                mask = n < N
                key = _sort_key(tl.load(W + base + n, mask=mask, other=0.0))
                cnt += tl.sum((mask & (key >= mid)).to(tl.int64), axis=0)
            ok = cnt >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        thr = lo
        n_gt = tl.zeros([], tl.int64)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs
            mask = n < N
            key = _sort_key(tl.load(W + base + n, mask=mask, other=0.0))
            n_gt += tl.sum((mask & (key > thr)).to(tl.int64), axis=0)
        need_eq = k - n_gt  # how many of the tied-at-threshold entries to keep (lowest index first)
        total = tl.zeros([], tl.float32)
        seen_eq = tl.zeros([], tl.int64)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs
            mask = n < N
            z = tl.load(W + base + n, mask=mask, other=0.0)
            keep, seen_eq = _topk_keep(z, mask, thr, seen_eq, need_eq)
            total += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), axis=0)
        seen_eq = tl.zeros([], tl.int64)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs
            mask = n < N
            z = tl.load(W + base + n, mask=mask, other=0.0)
            keep, seen_eq = _topk_keep(z, mask, thr, seen_eq, need_eq)
            tl.store(W + base + n, tl.where(keep, tl.exp(z - m) / total, 0.0), mask=mask)
    else:
        total = tl.zeros([], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs
            mask = n < N
            z = tl.load(W + base + n, mask=mask, other=float("-inf"))
            total += tl.sum(tl.exp(z - m), axis=0)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs
            mask = n < N
            z = tl.load(W + base + n, mask=mask, other=float("-inf"))
            tl.store(W + base + n, tl.exp(z - m) / total, mask=mask)


@triton.jit
def _mix_fwd_kernel(T, stride_tn, W, OUT, G, N, D, rows_per_split,
                    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    gs = tl.arange(0, BLOCK_G)
    dmask = d < D
    gmask = gs < G
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < n_end
        t = tl.load(T + n[:, None] * stride_tn + d[None, :], mask=nmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(W + gs[:, None] * N + n[None, :], mask=gmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.sum(w[:, :, None] * t[None, :, :], axis=1)
    out = OUT + pid_s * G * D + gs[:, None] * D + d[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _mix_bwd_kernel(T, stride_tn, GO, TW, GW, DT, G, N, D, cols_per_split,
                    NEED_GW: tl.constexpr, NEED_DT: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = tl.arange(0, BLOCK_G)
    nmask = n < N
    gmask = gs < G
    gw = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    if NEED_DT:
        tw = tl.load(TW + gs[:, None] * N + n[None, :], mask=gmask[:, None] & nmask[None, :], other=0.0)
    d_start = pid_s * cols_per_split
    d_end = tl.minimum(d_start + cols_per_split, D)
    for d0 in range(d_start, d_end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < d_end
        go = tl.load(GO + gs[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        if NEED_GW:
            t = tl.load(T + n[:, None] * stride_tn + d[None, :], mask=nmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            gw += tl.sum(go[:, None, :] * t[None, :, :], axis=2)
        if NEED_DT:
            dt = tl.sum(tw[:, :, None] * go[:, None, :], axis=0)
            if not NEED_GW:
                # d table over more draws than one launch holds (G > BLOCK_G): the other chunks
                # of draws are added here, so d table is rounded to its dtype only once
                for g0 in range(BLOCK_G, G, BLOCK_G):
                    gg = g0 + gs
                    ggmask = gg < G
                    twc = tl.load(TW + gg[:, None] * N + n[None, :], mask=ggmask[:, None] & nmask[None, :],
                                  other=0.0)
                    goc = tl.load(GO + gg[:, None] * D + d[None, :], mask=ggmask[:, None] & dmask[None, :],
                                  other=0.0).to(tl.float32)
                    dt += tl.sum(twc[:, :, None] * goc[:, None, :], axis=0)
            tl.store(DT + n[:, None] * D + d[None, :], dt.to(DT.dtype.element_ty),
                     mask=nmask[:, None] & dmask[None, :])
    if NEED_GW:
        tl.store(GW + pid_s * G * N + gs[:, None] * N + n[None, :], gw,
                 mask=gmask[:, None] & nmask[None, :])


@triton.jit
def _softmax_bwd_kernel(W, GWP, DL, N, S, GN_TOTAL, inv_tau, BLOCK_N: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    base = g * N
    offs = tl.arange(0, BLOCK_N)
    dot = tl.zeros([], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs
        mask = n < N
        gw = tl.zeros([BLOCK_N], tl.float32)
        part = GWP + base + n  # 64-bit pointer steps: S * G * N may exceed the int32 range
        for _ in range(0, S):  # fixed summation order over the split partials
            gw += tl.load(part, mask=mask, other=0.0)
            part += GN_TOTAL
        w = tl.load(W + base + n, mask=mask, other=0.0)
        tl.store(DL + base + n, gw, mask=mask)
        dot += tl.sum(w * gw, axis=0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs
        mask = n < N
        gw = tl.load(DL + base + n, mask=mask, other=0.0)
        w = tl.load(W + base + n, mask=mask, other=0.0)
        tl.store(DL + base + n, w * (gw - dot) * inv_tau, mask=mask)


@triton.jit
def _l2_kernel(Q, T, stride_tn, OUT, N, D, cols_per_split, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    d_start = pid_s * cols_per_split
    d_end = tl.minimum(d_start + cols_per_split, D)
    for d0 in range(d_start, d_end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < d_end
        q = tl.load(Q + d, mask=dmask, other=0.0).to(tl.float32)
        t = tl.load(T + n[:, None] * stride_tn + d[None, :], mask=nmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        diff = tl.where(nmask[:, None] & dmask[None, :], t - q[None, :], 0.0)
        acc += tl.sum(diff * diff, axis=1)
    tl.store(OUT + pid_s * N + n, acc, mask=nmask)


# ------------------------------------------------------------------------------ launch plans
# The block sizes and grids are chosen by pure functions of the problem shape and a Tuning, used
# by the launchers below and by the compile-only check (gpu_build_check.py), which compiles every
# configuration the GPU launchers can choose.
@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block sizes and parallelism the launchers plan with.

    ``*_block_*`` are powers of two. ``scale_rows_by_g``: the mix kernels' row tile shrinks as
    BLOCK_G grows (the [BLOCK_G, BLOCK_N, BLOCK_D] product keeps its register budget).
    ``fit_blocks``: shrink BLOCK_D / the weights block to the problem (the interpreter's speed);
    the GPU uses fixed blocks, so the set of compiled kernels is small and fully checked.
    ``max_g``: draws per launch, larger G is chunked. ``programs``: the number of programs the
    split-N / split-D plans aim for (None: 4 per SM on CUDA, 1 under the interpreter).
    """

    weights_block: int
    fwd_block_n: int
    fwd_block_d: int
    bwd_block_n: int
    bwd_block_d: int
    l2_block_n: int
    l2_block_d: int
    scale_rows_by_g: bool
    fit_blocks: bool
    max_g: int = 8
    programs: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_block") or "_block_" in f.name:
                if not (isinstance(v, int) and v >= 1 and v & (v - 1) == 0):
                    raise ValueError(f"Tuning.{f.name} must be a power of two, got {v!r}")
        if not (isinstance(self.max_g, int) and self.max_g >= 1):
            raise ValueError(f"Tuning.max_g must be a positive int, got {self.max_g!r}")
        if self.programs is not None and not (isinstance(self.programs, int) and self.programs >= 1):
            raise ValueError(f"Tuning.programs must be None or a positive int, got {self.programs!r}")


GPU_TUNING = Tuning(weights_block=1024, fwd_block_n=16, fwd_block_d=256, bwd_block_n=16, bwd_block_d=256,
                    l2_block_n=16, l2_block_d=256, scale_rows_by_g=True, fit_blocks=False)
# the interpreter runs programs one after another: few, big programs are fastest
INTERPRETER_TUNING = Tuning(weights_block=4096, fwd_block_n=64, fwd_block_d=2048, bwd_block_n=64,
                            bwd_block_d=1024, l2_block_n=64, l2_block_d=2048, scale_rows_by_g=False,
                            fit_blocks=True, programs=1)
_override: contextvars.ContextVar[Tuning | None] = contextvars.ContextVar("ap_erase_triton_tuning", default=None)


def current_tuning() -> Tuning:
    """The tuning in force: a :func:`tuning` override, else the GPU or interpreter default."""
    t = _override.get()
    if t is not None:
        return t
    return INTERPRETER_TUNING if _INTERPRET else GPU_TUNING


@contextlib.contextmanager
def tuning(base: Tuning | None = None, **changes):
    """Run the launchers with another tuning, e.g. ``tuning(GPU_TUNING, programs=528)`` to execute
    the GPU's plans under the interpreter, or small blocks to force every multi-block path."""
    token = _override.set(dataclasses.replace(base or current_tuning(), **changes))
    try:
        yield _override.get()
    finally:
        _override.reset(token)


@dataclasses.dataclass(frozen=True)
class MixPlan:
    """One launch of a mix / l2 kernel: constexpr blocks, grid, and the split of the reduced dim
    (``split`` slices of ``span`` rows (forward) or columns (backward, l2))."""

    block_g: int
    block_n: int
    block_d: int
    grid: tuple[int, int]
    split: int
    span: int


def _cdiv(a, b):
    return (a + b - 1) // b


def _rows(block, block_g, t):
    return max(1, block // block_g) if t.scale_rows_by_g else block


def _cols(block, D, t):
    return min(block, triton.next_power_of_2(max(D, 1))) if t.fit_blocks else block


def plan_weights(N: int, t: Tuning) -> int:
    """BLOCK_N of ``_weights_kernel`` and ``_softmax_bwd_kernel`` (grid: one program per draw)."""
    return min(t.weights_block, triton.next_power_of_2(max(N, 1))) if t.fit_blocks else t.weights_block


def plan_mix_forward(N: int, D: int, G: int, programs: int, t: Tuning) -> MixPlan:
    """Column tiles x row slices; split-N (fp32 partials) when the column tiles alone would leave
    programs idle. G <= t.max_g."""
    block_g = triton.next_power_of_2(G)
    block_n, block_d = _rows(t.fwd_block_n, block_g, t), _cols(t.fwd_block_d, D, t)
    d_blocks = _cdiv(D, block_d)
    split = max(1, min(_cdiv(programs, d_blocks), _cdiv(N, 16 * block_n)))
    rows = max(block_n, _cdiv(_cdiv(N, split), block_n) * block_n)
    split = _cdiv(N, rows)
    return MixPlan(block_g, block_n, block_d, (d_blocks, split), split, rows)


def plan_mix_backward(N: int, D: int, G: int, need_table: bool, programs: int, t: Tuning) -> MixPlan:
    """Row tiles x column slices; split-D (partials of d w summed by the softmax backward) only
    when the table needs no gradient (d table tiles are written exactly once). G <= t.max_g."""
    block_g = triton.next_power_of_2(G)
    block_n, block_d = _rows(t.bwd_block_n, block_g, t), _cols(t.bwd_block_d, D, t)
    n_blocks = _cdiv(N, block_n)
    split = 1 if need_table else max(1, min(_cdiv(programs, n_blocks), _cdiv(D, 4 * block_d)))
    cols = max(block_d, _cdiv(_cdiv(D, split), block_d) * block_d)
    split = _cdiv(D, cols)
    return MixPlan(block_g, block_n, block_d, (n_blocks, split), split, cols)


def plan_l2(N: int, D: int, programs: int, t: Tuning) -> MixPlan:
    """Row tiles x column slices (partial sums of squares, summed on the host side)."""
    block_n, block_d = t.l2_block_n, _cols(t.l2_block_d, D, t)
    n_blocks = _cdiv(N, block_n)
    split = max(1, min(_cdiv(programs, n_blocks), _cdiv(D, 4 * block_d)))
    cols = max(block_d, _cdiv(_cdiv(D, split), block_d) * block_d)
    split = _cdiv(D, cols)
    return MixPlan(1, block_n, block_d, (n_blocks, split), split, cols)


# ------------------------------------------------------------------------------ launchers
def _programs(device, t: Tuning) -> int:
    if t.programs is not None:
        return t.programs
    if _INTERPRET or device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _check_table(table):
    if table.dim() != 2 or (table.shape[1] > 1 and table.stride(1) != 1):
        raise ValueError("triton backend: table must be a [N, D] view with unit column stride")


def weights(logits, gumbel, seed, tau, topk):
    G, N = logits.shape
    if G * N >= 2**31:
        raise ValueError("triton backend: G * N must be < 2**31 (Philox counter range)")
    w = torch.empty((G, N), dtype=torch.float32, device=logits.device)
    idx = torch.empty((G,), dtype=torch.int64, device=logits.device)
    if G == 0:
        return w, idx
    _weights_kernel[(G,)](logits, gumbel if gumbel is not None else logits, w, idx, N, seed,
                          float(tau), int(topk), HAS_GUMBEL=gumbel is not None,
                          USE_TOPK=0 < topk < N, BLOCK_N=plan_weights(N, current_tuning()))
    return w, idx


def mix_forward(table, w):
    _check_table(table)
    N, D = table.shape
    G = w.shape[0]
    t = current_tuning()
    if G == 0 or N == 0 or D == 0:
        return torch.zeros((G, D), dtype=table.dtype, device=table.device)
    if G > t.max_g:
        return torch.cat([mix_forward(table, w[i:i + t.max_g]) for i in range(0, G, t.max_g)])
    p = plan_mix_forward(N, D, G, _programs(table.device, t), t)
    if p.split == 1:
        out = torch.empty((G, D), dtype=table.dtype, device=table.device)
    else:
        out = torch.empty((p.split, G, D), dtype=torch.float32, device=table.device)
    _mix_fwd_kernel[p.grid](table, table.stride(0), w, out, G, N, D, p.span,
                            BLOCK_G=p.block_g, BLOCK_N=p.block_n, BLOCK_D=p.block_d)
    if p.split > 1:
        out = out.sum(0).to(table.dtype)  # fixed order over the row slices: deterministic
    return out


def mix_backward(table, grad_out, w, table_w, tau, need_logits, need_table):
    _check_table(table)
    N, D = table.shape
    G = w.shape[0]
    t = current_tuning()
    no_logits = torch.empty((0,), dtype=torch.float32, device=table.device)
    no_table = torch.empty((0,), dtype=table.dtype, device=table.device)
    if G == 0 or N == 0 or D == 0:  # nothing to contract: both gradients are zero
        return (torch.zeros((G, N), dtype=torch.float32, device=table.device) if need_logits else no_logits,
                torch.zeros((N, D), dtype=table.dtype, device=table.device) if need_table else no_table)
    if G > t.max_g:
        # d w per chunk of draws; d table in one launch that loops over all chunks (one rounding)
        dl = (torch.cat([mix_backward(table, grad_out[i:i + t.max_g], w[i:i + t.max_g], table_w[i:i + t.max_g],
                                      tau, True, False)[0] for i in range(0, G, t.max_g)])
              if need_logits else no_logits)
        if not need_table:
            return dl, no_table
        p = plan_mix_backward(N, D, t.max_g, True, _programs(table.device, t), t)
        dt = torch.empty((N, D), dtype=table.dtype, device=table.device)
        _mix_bwd_kernel[p.grid](table, table.stride(0), grad_out, table_w, w, dt, G, N, D, p.span,
                                NEED_GW=False, NEED_DT=True, BLOCK_G=p.block_g, BLOCK_N=p.block_n,
                                BLOCK_D=p.block_d)
        return dl, dt
    p = plan_mix_backward(N, D, G, need_table, _programs(table.device, t), t)
    gwp = torch.empty((p.split, G, N), dtype=torch.float32, device=table.device) if need_logits else w
    dt = torch.empty((N, D), dtype=table.dtype, device=table.device) if need_table else no_table
    _mix_bwd_kernel[p.grid](table, table.stride(0), grad_out, table_w, gwp, dt if need_table else table,
                            G, N, D, p.span, NEED_GW=need_logits, NEED_DT=need_table,
                            BLOCK_G=p.block_g, BLOCK_N=p.block_n, BLOCK_D=p.block_d)
    if not need_logits:
        return no_logits, dt
    dl = torch.empty((G, N), dtype=torch.float32, device=table.device)
    _softmax_bwd_kernel[(G,)](w, gwp, dl, N, p.split, G * N, 1.0 / tau, BLOCK_N=plan_weights(N, t))
    return dl, dt


def l2_scores(query, table):
    _check_table(table)
    N, D = table.shape
    if N == 0 or D == 0:
        return torch.zeros((N,), dtype=torch.float32, device=table.device)
    q = query.to(torch.float32).contiguous()
    t = current_tuning()
    p = plan_l2(N, D, _programs(table.device, t), t)
    part = torch.empty((p.split, N), dtype=torch.float32, device=table.device)
    _l2_kernel[p.grid](q, table, table.stride(0), part, N, D, p.span, BLOCK_N=p.block_n, BLOCK_D=p.block_d)
    return part.sum(0).sqrt()
