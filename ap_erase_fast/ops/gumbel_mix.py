"""Public ops: ``gumbel_mix``, ``gumbel_argmax`` and ``l2_scores``.

Layering (after fla's l2norm.py): backend launchers (``triton_gumbel_mix``, ``_native`` over
``csrc/``) -> :class:`GumbelMixFunction` (autograd, backend-agnostic) -> functional
:func:`gumbel_mix`.  The ``"torch"`` backend is :mod:`.reference` itself.
"""
from __future__ import annotations

import torch

from . import reference
from ._backends import get_backend

_TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _rows_view(table: torch.Tensor) -> torch.Tensor:
    """[N, *E] -> [N, D] with unit column stride; a view whenever the E dims allow it."""
    t2 = table.reshape(table.shape[0], -1)
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


class GumbelMixFunction(torch.autograd.Function):
    """Fused draw + mix through a fast backend; gradients for logits and table."""

    @staticmethod
    def forward(ctx, logits, table, gumbel, seed, tau, hard, topk, impl):
        table2d = _rows_view(table)
        lg = logits.detach().to(torch.float32).contiguous()
        gb = None if gumbel is None else gumbel.detach().to(torch.float32).contiguous()
        w, index = impl.weights(lg, gb, 0 if seed is None else int(seed), float(tau), int(topk or 0))
        if hard:
            out2d = table2d.index_select(0, index)  # one row per draw, bit-exact
        else:
            out2d = impl.mix_forward(table2d, w)
        ctx.save_for_backward(table2d, w, index)
        ctx.meta = (tau, hard, impl, table.shape, table.dtype, logits.dtype)
        ctx.mark_non_differentiable(index)
        return out2d.reshape((logits.shape[0],) + tuple(table.shape[1:])), index

    @staticmethod
    def backward(ctx, grad_out, _grad_index):
        table2d, w, index = ctx.saved_tensors
        tau, hard, impl, table_shape, table_dtype, logits_dtype = ctx.meta
        need_logits, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_logits or need_table):
            return (None,) * 8
        go = grad_out.reshape(grad_out.shape[0], -1)
        if go.dtype != table_dtype:
            go = go.to(table_dtype)
        go = go.contiguous()
        if hard:
            table_w = torch.zeros_like(w).scatter_(1, index[:, None], 1.0)
        else:
            table_w = w
        dlogits, dtable = impl.mix_backward(table2d, go, w, table_w, float(tau), need_logits, need_table)
        dlogits = dlogits.to(logits_dtype) if need_logits else None
        dtable = dtable.reshape(table_shape) if need_table else None
        return dlogits, dtable, None, None, None, None, None, None


def _check(logits, table, tau, topk):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [G, N], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    if table.dim() < 2 or table.shape[0] != logits.shape[1]:
        raise ValueError(f"table must be [N, *E] with N = logits.shape[1] = {logits.shape[1]}, "
                         f"got shape {tuple(table.shape)}")
    if table.dtype not in _TABLE_DTYPES:
        raise TypeError(f"table dtype must be float32, bfloat16 or float16, got {table.dtype}")
    if logits.device != table.device:
        raise ValueError(f"logits on {logits.device} but table on {table.device}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if topk is not None and not (isinstance(topk, int) and topk >= 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")


def gumbel_mix(logits, table, tau=1.0, hard=False, topk=None, gumbel=None, seed=None,
               backend="auto", return_index=False):
    """Gumbel-Softmax draw over a concept table and the simplex-weighted mix of its rows.

    Args:
        logits: float ``[G, N]``; G independent draws over N table rows. May require grad.
        table: ``[N, *E]`` float32 / bfloat16 / float16, any strides. May require grad
            (gradient = y^T grad_out, with y one-hot in hard mode).
        tau: softmax temperature, y = softmax((logits + g) / tau).
        hard: forward value is exactly ``table[argmax y]`` (bit for bit); gradient w.r.t. logits
            is that of the soft y (straight-through).
        topk: keep the k largest y (ties: lower index first), renormalise, mix. Ignored when hard.
        gumbel: optional ``[G, N]`` noise g used as given (treated as a constant by the fast
            backends). When None, g = -log(-log(u + 1e-10) + 1e-10) with u from the counter-based
            Philox stream of ``seed`` (same noise on every backend), or, when ``seed`` is None,
            from a seed drawn from torch's default CPU generator.
        seed: int in [0, 2**63) for the in-kernel noise.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``. See
            :func:`available_backends`; an unusable explicit backend warns once and falls back
            to ``"torch"`` (raises with ``AP_ERASE_STRICT_BACKEND=1``).
        return_index: also return the selected row per draw (argmax of y, first maximum) as a
            ``[G]`` int64 tensor: the adversarial word in hard mode.

    Returns:
        ``[G, *E]`` in ``table.dtype`` (fp32 accumulation), or ``(out, index)``.
    """
    _check(logits, table, tau, topk)
    if topk is not None and (hard or topk >= logits.shape[1]):
        topk = None
    if seed is None and gumbel is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    impl = get_backend(backend, table.device.type)
    if impl is None or logits.dtype == torch.float64 or table.dtype == torch.float64:
        return reference.gumbel_mix_reference(logits, table, tau, hard, topk, gumbel, seed,
                                              return_index=return_index)
    out, index = GumbelMixFunction.apply(logits, table, gumbel, seed, tau, hard, topk, impl)
    return (out, index) if return_index else out


def gumbel_argmax(logits, gumbel, tau=1.0):
    """The row a hard draw selects: argmax over N of (logits + g) / tau, ``[G]`` int64.

    Uses the same float32 arithmetic as every backend (z = (logits + g) / tau, first maximum),
    so it agrees with ``gumbel_mix(..., hard=True, gumbel=gumbel)``.
    """
    with torch.no_grad():
        return reference.gumbel_argmax_reference(logits, gumbel, tau)


def l2_scores(query, table, backend="auto"):
    """Euclidean distance ``||table[n] - query||`` for each row, float32 ``[N]`` (no autograd).

    ``query`` is ``[*E]``, ``table`` ``[N, *E]``; one streaming pass over the table.
    """
    if tuple(query.shape) != tuple(table.shape[1:]):
        raise ValueError(f"query shape {tuple(query.shape)} must equal table.shape[1:] "
                         f"{tuple(table.shape[1:])}")
    impl = get_backend(backend, table.device.type)
    if impl is None or table.dtype == torch.float64:
        with torch.no_grad():
            return reference.l2_scores_reference(query, table)
    with torch.no_grad():
        return impl.l2_scores(query.reshape(-1).contiguous(), _rows_view(table))
