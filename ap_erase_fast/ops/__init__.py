"""Fused, memory-bound ops for the AP inner search.

* :func:`gumbel_mix` -- Gumbel-Softmax draw over a concept table and the mix ``y @ table``
  (soft, hard straight-through, top-k), with its backward.
* :func:`gumbel_argmax` -- which row a hard draw selects (the adversarial word).
* :func:`l2_scores` -- L2 distance of every table row to a query embedding.
* :func:`available_backends` -- backends usable here, in ``backend="auto"`` order.

Backends: ``"triton"``, ``"cuda"`` / ``"cpp"`` (``csrc/`` extension), ``"torch"`` (reference).
Importing this package is cheap: Triton and the native extension load on first use.
See docs/ops.md.
"""
from ._backends import BACKENDS, BackendUnavailable, available_backends
from .gumbel_mix import gumbel_argmax, gumbel_mix, l2_scores

__all__ = ["gumbel_mix", "gumbel_argmax", "l2_scores", "available_backends", "BACKENDS",
           "BackendUnavailable"]
