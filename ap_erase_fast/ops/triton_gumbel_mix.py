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
  written from the same tiles.
* ``_softmax_bwd_kernel``: sums the split partials and applies the softmax backward
  dz = w * (gw - <w, gw>), d logits = dz / tau (restricted to the kept set for top-k).
* ``_l2_kernel``: sum_d (T[n, d] - q[d])^2 per row, split over columns, sqrt on the host side.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_G = 8  # draws per launch; more draws are processed in chunks of this size


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
        for s in range(0, S):  # fixed summation order over the split partials
            gw += tl.load(GWP + s * GN_TOTAL + base + n, mask=mask, other=0.0)
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


# ------------------------------------------------------------------------------ launchers
def _cdiv(a, b):
    return (a + b - 1) // b


def _target_programs(device) -> int:
    if _INTERPRET or device.type != "cuda":
        return 1  # the interpreter runs programs one after another: fewer, bigger is faster
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
    use_topk = 0 < topk < N
    block = min(4096 if _INTERPRET else 1024, triton.next_power_of_2(N))
    _weights_kernel[(G,)](logits, gumbel if gumbel is not None else logits, w, idx, N, seed,
                          float(tau), int(topk), HAS_GUMBEL=gumbel is not None,
                          USE_TOPK=use_topk, BLOCK_N=block)
    return w, idx


def _fwd_blocks(D):
    if _INTERPRET:
        return 64, min(2048, triton.next_power_of_2(D))
    return 16, min(256, triton.next_power_of_2(D))


def mix_forward(table, w):
    _check_table(table)
    N, D = table.shape
    G = w.shape[0]
    if G > _MAX_G:
        return torch.cat([mix_forward(table, w[i:i + _MAX_G]) for i in range(0, G, _MAX_G)])
    block_g = triton.next_power_of_2(G)
    block_n, block_d = _fwd_blocks(D)
    block_n = max(1, block_n // block_g) if not _INTERPRET else block_n
    d_blocks = _cdiv(D, block_d)
    split = max(1, min(_cdiv(_target_programs(table.device), d_blocks), _cdiv(N, 16 * block_n)))
    rows = _cdiv(_cdiv(N, split), block_n) * block_n
    split = _cdiv(N, rows)
    if split == 1:
        out = torch.empty((G, D), dtype=table.dtype, device=table.device)
    else:
        out = torch.empty((split, G, D), dtype=torch.float32, device=table.device)
    _mix_fwd_kernel[(d_blocks, split)](table, table.stride(0), w, out, G, N, D, rows,
                                       BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d)
    if split > 1:
        out = out.sum(0).to(table.dtype)
    return out


def mix_backward(table, grad_out, w, table_w, tau, need_logits, need_table):
    _check_table(table)
    N, D = table.shape
    G = w.shape[0]
    if G > _MAX_G:
        parts = [mix_backward(table, grad_out[i:i + _MAX_G], w[i:i + _MAX_G], table_w[i:i + _MAX_G],
                              tau, need_logits, need_table) for i in range(0, G, _MAX_G)]
        dl = torch.cat([p[0] for p in parts]) if need_logits else parts[0][0]
        dt = sum(p[1].float() for p in parts).to(table.dtype) if need_table else parts[0][1]
        return dl, dt
    block_g = triton.next_power_of_2(G)
    if _INTERPRET:
        block_n, block_d = 64, min(1024, triton.next_power_of_2(D))
    else:
        block_n, block_d = max(1, 16 // block_g), min(256, triton.next_power_of_2(D))
    n_blocks = _cdiv(N, block_n)
    split = max(1, min(_cdiv(_target_programs(table.device), n_blocks), _cdiv(D, 4 * block_d)))
    if need_table:
        split = 1  # d table tiles are written exactly once; one pass over D per row tile
    cols = _cdiv(_cdiv(D, split), block_d) * block_d
    split = _cdiv(D, cols)
    gwp = torch.empty((split, G, N), dtype=torch.float32, device=table.device) if need_logits else w
    dt = (torch.empty((N, D), dtype=table.dtype, device=table.device) if need_table
          else torch.empty((0,), dtype=table.dtype, device=table.device))
    _mix_bwd_kernel[(n_blocks, split)](table, table.stride(0), grad_out, table_w, gwp,
                                       dt if need_table else table, G, N, D, cols,
                                       NEED_GW=need_logits, NEED_DT=need_table,
                                       BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d)
    if not need_logits:
        return torch.empty((0,), dtype=torch.float32, device=table.device), dt
    dl = torch.empty((G, N), dtype=torch.float32, device=table.device)
    block = min(4096 if _INTERPRET else 1024, triton.next_power_of_2(N))
    _softmax_bwd_kernel[(G,)](w, gwp, dl, N, split, G * N, 1.0 / tau, BLOCK_N=block)
    return dl, dt


def l2_scores(query, table):
    _check_table(table)
    N, D = table.shape
    q = query.to(torch.float32).contiguous()
    if _INTERPRET:
        block_n, block_d = 64, min(2048, triton.next_power_of_2(D))
    else:
        block_n, block_d = 16, min(256, triton.next_power_of_2(D))
    n_blocks = _cdiv(N, block_n)
    split = max(1, min(_cdiv(_target_programs(table.device), n_blocks), _cdiv(D, 4 * block_d)))
    cols = _cdiv(_cdiv(D, split), block_d) * block_d
    split = _cdiv(D, cols)
    part = torch.empty((split, N), dtype=torch.float32, device=table.device)
    _l2_kernel[(n_blocks, split)](q, table, table.stride(0), part, N, D, cols,
                                  BLOCK_N=block_n, BLOCK_D=block_d)
    return part.sum(0).sqrt()
