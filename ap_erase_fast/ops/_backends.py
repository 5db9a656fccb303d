"""Backend registry: which implementations exist, which can run on which device, and why not.

A backend is an object with four launchers working on 2-D views of the table ([N, D], unit
column stride, any row stride) and float32 [G, N] weights:

* ``weights(logits, gumbel_or_None, seed, tau, topk) -> (w [G, N] f32, index [G] i64)``
  fused noise + softmax + argmax (+ top-k renormalisation); ``w`` is the soft y (soft and hard
  modes) or the renormalised top-k weights.
* ``mix_forward(table, w) -> out [G, D]`` in the table dtype, fp32 accumulation.
* ``mix_backward(table, grad_out, w, table_w, tau, need_logits, need_table) -> (dlogits, dtable)``
  one pass over the table for both gradients, softmax backward fused as an epilogue.
* ``l2_scores(query [D], table) -> [N]`` float32 Euclidean distances.

Nothing heavy is imported here: Triton and the native extension are loaded on first use.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
# "auto" preference per device type (first usable wins).
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says why."""


def _strict() -> bool:
    return os.environ.get("AP_ERASE_STRICT_BACKEND", "0") == "1"


def _jit_allowed(explicit: bool) -> bool:
    mode = os.environ.get("AP_ERASE_JIT", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        return True
    return explicit  # "auto": compile on first use only when a native backend was asked for


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device_type: str, explicit: bool = True) -> str | None:
    """None if backend ``name`` can run on ``device_type`` tensors, else the reason."""
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cpu" and not _interpreting():
            return "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before triton is imported"
        if device_type == "cuda" and _interpreting():
            return "TRITON_INTERPRET=1 is set, so triton cannot launch on CUDA tensors"
        if device_type not in ("cpu", "cuda"):
            return f"triton backend does not support device type {device_type!r}"
        try:
            from . import triton_gumbel_mix  # noqa: F401
        except Exception as exc:  # ImportError, or a broken triton install
            return f"triton is not usable: {type(exc).__name__}: {exc}"
        return None
    if name in ("cpp", "cuda"):
        want = "cpu" if name == "cpp" else "cuda"
        if device_type != want:
            return f"the {name} backend runs on {want} tensors, got {device_type} tensors"
        from . import _native

        return _native.load_error(want, allow_jit=_jit_allowed(explicit))
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CPU, plus CUDA when present),
    in the order ``backend="auto"`` tries them.  Does not trigger a JIT build unless
    ``AP_ERASE_JIT=1``."""
    if device is None:
        types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        types = [torch.device(device).type]
    names: list[str] = []
    for dt in types:
        order = _AUTO_ORDER.get(dt, ("torch",))
        if dt == "cpu" and _interpreting():
            order = order[:-1] + ("triton",) + order[-1:]
        for name in order:
            if name not in names and why_unavailable(name, dt, explicit=False) is None:
                names.append(name)
    return names


def get_backend(name: str, device_type: str):
    """The backend module/object for ``name`` (resolving ``"auto"``), or None for the reference.

    A backend that cannot run warns once (with the reason) and falls back to the reference;
    with ``AP_ERASE_STRICT_BACKEND=1`` it raises :class:`BackendUnavailable` instead.
    """
    if name == "auto":
        order = _AUTO_ORDER.get(device_type, ("torch",))
        for cand in order:
            if why_unavailable(cand, device_type, explicit=False) is None:
                return _module(cand)
        return None
    reason = why_unavailable(name, device_type, explicit=True)
    if reason is None:
        return _module(name)
    if _strict():
        raise BackendUnavailable(f"backend {name!r} unavailable: {reason}")
    key = f"{name}:{device_type}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"ap_erase_fast.ops: backend {name!r} unavailable ({reason}); "
                      "falling back to the PyTorch reference", RuntimeWarning, stacklevel=3)
    return None


def _module(name: str):
    if name == "torch":
        return None
    if name == "triton":
        from . import triton_gumbel_mix

        return triton_gumbel_mix
    from . import _native

    return _native.NativeBackend
