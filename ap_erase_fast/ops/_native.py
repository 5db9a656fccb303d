"""Loader for the optional ``csrc/`` extension (ops ``torch.ops.ap_erase_fast.*``).

Order: the extension built by ``setup.py`` (``ap_erase_fast/_C*.so``), then, when allowed
(``AP_ERASE_JIT``, see docs/ops.md), a JIT build of the C++ CPU sources with
``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``).  Failures are
remembered and reported as a reason string; nothing here raises at import time.
"""
from __future__ import annotations

import glob
import os
import threading

import torch

_lock = threading.Lock()
_state = {"loaded": False, "error": None, "tried_prebuilt": False, "tried_jit": False, "how": None}

_OPS = ("gumbel_weights", "mix_forward", "mix_backward", "l2_scores")
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC_DIR = os.path.join(os.path.dirname(_PKG_DIR), "csrc")
CPU_SOURCES = ("gumbel_mix_cpu.cpp",)


def _ops_registered() -> bool:
    try:
        return all(hasattr(torch.ops.ap_erase_fast, name) for name in _OPS)
    except (AttributeError, RuntimeError):
        return False


def _register_fakes():
    """Shape functions so torch.compile / FakeTensor can trace the native ops."""
    lib = "ap_erase_fast::"

    @torch.library.register_fake(lib + "gumbel_weights")
    def _(logits, gumbel, seed, tau, topk):
        return (logits.new_empty(logits.shape, dtype=torch.float32),
                logits.new_empty((logits.shape[0],), dtype=torch.int64))

    @torch.library.register_fake(lib + "mix_forward")
    def _(table, weights):
        return table.new_empty((weights.shape[0], table.shape[1]))

    @torch.library.register_fake(lib + "mix_backward")
    def _(table, grad_out, weights, table_weights, tau, need_logits, need_table):
        dl = weights.new_empty(weights.shape if need_logits else (0,))
        dt = table.new_empty(table.shape if need_table else (0,))
        return dl, dt

    @torch.library.register_fake(lib + "l2_scores")
    def _(query, table):
        return table.new_empty((table.shape[0],), dtype=torch.float32)


def _finish(how: str):
    _state.update(loaded=True, error=None, how=how)
    try:
        _register_fakes()
    except Exception:  # fakes are an optimisation for torch.compile only
        pass


def _try_prebuilt() -> str | None:
    if _ops_registered():
        return None
    libs = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C*.pyd")))
    if not libs:
        return "the native extension is not built (pip install --no-build-isolation . with a compiler)"
    try:
        torch.ops.load_library(libs[0])
    except Exception as exc:  # broken build, ABI mismatch with the installed torch, ...
        return f"loading {os.path.basename(libs[0])} failed: {str(exc).splitlines()[0]}"
    return None if _ops_registered() else f"{libs[0]} does not register the ap_erase_fast ops"


def _try_jit() -> str | None:
    sources = [os.path.join(_CSRC_DIR, s) for s in CPU_SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        return f"JIT build impossible: sources not found ({missing[0]}); not a source checkout"
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="ap_erase_fast_native_cpu",
            sources=sources,
            # -fopenmp: at::parallel_for is header code that only runs in parallel when the
            # extension itself is compiled with OpenMP
            extra_cflags=["-O3", "-DNDEBUG", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("AP_ERASE_JIT_VERBOSE", "0") == "1",
        )
    except Exception as exc:
        return f"JIT build of csrc failed: {str(exc).strip().splitlines()[-1][:300]}"
    return None if _ops_registered() else "JIT build did not register the ap_erase_fast ops"


def load_error(allow_jit: bool = False) -> str | None:
    """None once the native ops are registered, else why they are not."""
    with _lock:
        if _state["loaded"]:
            return None
        if not _state["tried_prebuilt"]:
            _state["tried_prebuilt"] = True
            err = _try_prebuilt()
            if err is None:
                _finish("prebuilt")
                return None
            _state["error"] = err
        if allow_jit and not _state["tried_jit"]:
            _state["tried_jit"] = True
            err = _try_jit()
            if err is None:
                _finish("jit")
                return None
            _state["error"] = f"{_state['error']}; {err}"
        return _state["error"]


def has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("ap_erase_fast::mix_forward", key)


def how_loaded() -> str | None:
    """"prebuilt", "jit" or None."""
    return _state["how"]


class NativeBackend:
    """Launchers over ``torch.ops.ap_erase_fast`` (dispatches to the CPU or CUDA kernels)."""

    @staticmethod
    def weights(logits, gumbel, seed, tau, topk):
        return torch.ops.ap_erase_fast.gumbel_weights(logits, gumbel, seed, tau, topk)

    @staticmethod
    def mix_forward(table, w):
        return torch.ops.ap_erase_fast.mix_forward(table, w)

    @staticmethod
    def mix_backward(table, grad_out, w, table_w, tau, need_logits, need_table):
        return torch.ops.ap_erase_fast.mix_backward(table, grad_out, w, table_w, tau, need_logits, need_table)

    @staticmethod
    def l2_scores(query, table):
        return torch.ops.ap_erase_fast.l2_scores(query, table)
