"""Plain-PyTorch reference for the Gumbel-Softmax mix and the L2 table scan.

This is the definition every fast backend is tested against (and the ``"torch"`` backend, the
fallback).  It favours obviousness over speed: it materialises the table in the accumulation
dtype and uses ordinary autograd.

Definitions (G draws over an N-row table, E the embedding shape, D = prod(E)):

* noise       g = -log(-log(u + 1e-10) + 1e-10), u ~ U[0, 1)      (ALGORITHM.md section 3)
* scores      z = (logits + g) / tau                              [G, N]
* soft        y = softmax(z);  out = y @ table                    [G, *E]
* hard        index = argmax(z) (first maximum);  out = table[index] exactly (bit for bit);
              gradients are the straight-through ones of ``y_st = (y_hard - y).detach() + y``:
              d logits from the soft y, d table = onehot(index)^T grad_out.
* top-k       keep the k largest z (equivalently the k largest y; ties go to the lower index),
              renormalise y over them (= softmax of z restricted to the kept set), mix.

In-kernel noise: when ``gumbel`` is None and ``seed`` is given, u is the counter-based Philox-4x32-10
stream of Triton's ``tl.rand(seed, offset)`` at ``offset = g * N + n``.  :func:`philox_uniform`
reproduces it in plain integer torch ops, so every backend draws the same noise for a seed.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "EPS",
    "philox_uniform",
    "gumbel_from_uniform",
    "gumbel_noise",
    "gumbel_scores",
    "mix_weights",
    "gumbel_mix_reference",
    "gumbel_argmax_reference",
    "l2_scores_reference",
]

EPS = 1e-10

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
# Largest float32 scale with (2**31 - 1) * scale < 1 (same constant as triton's uint_to_uniform_float).
_U32_TO_UNIFORM = 4.6566127342e-10


def _mul_hi_lo(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 (no int64 overflow)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    mid = p_hi + (p_lo >> 16)
    hi = (mid >> 16) & _M32
    lo = ((mid & 0xFFFF) << 16 | (p_lo & 0xFFFF)) & _M32
    return hi, lo


def philox_uniform(seed: int, numel: int, device=None) -> torch.Tensor:
    """U[0, 1) float32 values of Philox-4x32-10 at counters 0..numel-1 (Triton ``tl.rand``)."""
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    c0 = torch.arange(numel, dtype=torch.int64, device=device)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_U32_TO_UNIFORM, dtype=torch.float32, device=device)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """The engine's Gumbel transform: g = -log(-log(u + 1e-10) + 1e-10)."""
    return -torch.log(-torch.log(u + EPS) + EPS)


def gumbel_noise(shape, seed: int, device=None) -> torch.Tensor:
    """float32 Gumbel noise of ``shape`` ([G, N]) drawn from the Philox stream of ``seed``."""
    numel = math.prod(shape)
    return gumbel_from_uniform(philox_uniform(seed, numel, device)).reshape(shape)


def gumbel_scores(logits: torch.Tensor, gumbel: torch.Tensor, tau: float) -> torch.Tensor:
    """z = (logits + g) / tau, in the accumulation dtype (float32, or float64 for float64 inputs)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (logits.to(acc) + gumbel.to(acc)) / tau


def _topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, order, True)


def mix_weights(z: torch.Tensor, topk: int | None = None) -> torch.Tensor:
    """Soft weights over the table: softmax(z), or softmax of z restricted to its top-k entries."""
    if topk is not None and topk < z.shape[-1]:
        z = z.masked_fill(~_topk_mask(z, topk), float("-inf"))
    return torch.softmax(z, dim=-1)


class _StraightThroughRows(torch.autograd.Function):
    """out = table[index] exactly; backward as if out = y @ table (straight-through estimator)."""

    @staticmethod
    def forward(ctx, y, table, index):
        ctx.save_for_backward(y, table, index)
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        y, table, index = ctx.saved_tensors
        flat_go = grad_out.reshape(grad_out.shape[0], -1).to(y.dtype)
        grad_y = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_y = flat_go @ table.reshape(table.shape[0], -1).to(y.dtype).T
        if ctx.needs_input_grad[1]:
            grad_table = torch.zeros(table.shape, dtype=y.dtype, device=table.device)
            grad_table.index_add_(0, index, grad_out.to(y.dtype))
            grad_table = grad_table.to(table.dtype)
        return grad_y, grad_table, None


def _resolve_noise(logits, gumbel, seed):
    if gumbel is not None:
        if gumbel.shape != logits.shape:
            raise ValueError(f"gumbel must have the shape of logits {tuple(logits.shape)}, got {tuple(gumbel.shape)}")
        return gumbel
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return gumbel_noise(tuple(logits.shape), seed, logits.device)


def gumbel_mix_reference(logits, table, tau=1.0, hard=False, topk=None, gumbel=None, seed=None,
                         return_index=False):
    """Reference ``gumbel_mix``: see the module docstring for the definitions."""
    g = _resolve_noise(logits, gumbel, seed)
    z = gumbel_scores(logits, g, tau)
    index = torch.argmax(z.detach(), dim=-1)
    if hard:
        y = torch.softmax(z, dim=-1)
        out = _StraightThroughRows.apply(y, table, index)
    else:
        w = mix_weights(z, topk)
        flat = table.reshape(table.shape[0], -1).to(w.dtype)
        out = (w @ flat).to(table.dtype).reshape((logits.shape[0],) + tuple(table.shape[1:]))
    return (out, index) if return_index else out


def gumbel_argmax_reference(logits, gumbel, tau=1.0):
    """argmax over N of (logits + g) / tau: the row a hard draw selects."""
    return torch.argmax(gumbel_scores(logits, gumbel, tau), dim=-1)


def l2_scores_reference(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ||table[n] - query|| for every row n, float32 (float64 for float64)."""
    acc = torch.float64 if table.dtype == torch.float64 else torch.float32
    rows, q = table.reshape(table.shape[0], -1), query.reshape(1, -1).to(acc)
    out = []
    for start in range(0, rows.shape[0], 256):  # bounded temporaries for 50k-word tables
        diff = rows[start:start + 256].to(acc) - q
        out.append(torch.sqrt((diff * diff).sum(dim=1)))
    return torch.cat(out) if out else torch.empty(0, dtype=acc, device=table.device)
