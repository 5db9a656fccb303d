"""Loader for the optional native libraries (ops ``torch.ops.ap_erase_fast.*``).

Two libraries (see :mod:`.native_build`): ``_C`` holds the op schema and the CPU kernels and is
always loaded first; ``_C_cuda`` adds the CUDA kernels. Each comes from the build next to the
package (``setup.py``) or, when allowed (``AP_ERASE_JIT``, docs/ops.md), from a JIT build of
csrc/ with ``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``).
Failures are remembered and reported as one reason string that says why and how to build the
library; nothing here raises at import time.
"""
from __future__ import annotations

import importlib.machinery
import os
import shutil
import threading

import torch

from . import native_build

_lock = threading.Lock()
_OPS = ("gumbel_weights", "mix_forward", "mix_backward", "l2_scores")
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIB = {"cpu": "_C", "cuda": "_C_cuda"}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_state = {kind: {"loaded": False, "error": None, "tried_prebuilt": False, "tried_jit": False, "how": None}
          for kind in _LIB}
_fakes_registered = False


def _ops_registered() -> bool:
    try:
        return all(hasattr(torch.ops.ap_erase_fast, name) for name in _OPS)
    except (AttributeError, RuntimeError):
        return False


def has_kernel(device_type: str) -> bool:
    """Whether the ops have a kernel for ``"cpu"`` / ``"cuda"`` tensors (after loading)."""
    if not _ops_registered():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("ap_erase_fast::mix_forward",
                                                          _DISPATCH_KEY[device_type])


def _register_fakes():
    """Shape functions so torch.compile / FakeTensor can trace the native ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
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


def prebuilt_path(kind: str) -> str | None:
    """The library built by setup.py next to the package, if any."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_PKG_DIR, _LIB[kind] + suffix)
        if os.path.exists(path):
            return path
    return None


def _try_prebuilt(kind: str) -> str | None:
    if has_kernel(kind):
        return None  # registered by someone else (an earlier load in this process)
    path = prebuilt_path(kind)
    if path is None:
        return (f"no ap_erase_fast/{_LIB[kind]} library next to the package (installed without a compiler, "
                "or by pip's isolated build)")
    try:
        torch.ops.load_library(path)
    except Exception as exc:  # broken build, ABI mismatch with the installed torch, ...
        return f"loading {os.path.basename(path)} failed: {str(exc).strip().splitlines()[0][:300]}"
    return None if has_kernel(kind) else f"{os.path.basename(path)} does not register the {kind} kernels"


def _try_jit(kind: str) -> str | None:
    srcs = native_build.sources(kind)
    missing = [s for s in srcs if not os.path.exists(s)]
    if missing:
        return f"the JIT build needs the csrc/ sources of a source checkout ({missing[0]} not found)"
    try:
        from torch.utils import cpp_extension

        if kind == "cuda":
            problem = native_build.toolkit_problem(cpp_extension.CUDA_HOME)
            if problem is not None:
                return f"the JIT build cannot compile CUDA code: {problem}"

        verbose = os.environ.get("AP_ERASE_JIT_VERBOSE", "0") == "1"
        if kind == "cpu":
            cpp_extension.load(name="ap_erase_fast_native_cpu", sources=srcs,
                               extra_cflags=list(native_build.CXX_FLAGS),
                               extra_ldflags=list(native_build.LD_FLAGS),
                               is_python_module=False, verbose=verbose)
        else:
            # no arch flags: torch builds for the visible GPUs (or TORCH_CUDA_ARCH_LIST)
            native_build.check_nvcc_flags(native_build.NVCC_FLAGS)
            cpp_extension.load(name="ap_erase_fast_native_cuda", sources=srcs,
                               extra_cflags=list(native_build.CUDA_CXX_FLAGS),
                               extra_cuda_cflags=list(native_build.NVCC_FLAGS),
                               is_python_module=False, verbose=verbose)
    except Exception as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        return f"the JIT build of csrc/ failed: {lines[-1][:300]} (AP_ERASE_JIT_VERBOSE=1 shows the compiler output)"
    return None if has_kernel(kind) else f"the JIT build did not register the {kind} kernels"


def _load(kind: str, allow_jit: bool) -> str | None:
    st = _state[kind]
    if st["loaded"]:
        return None
    if not st["tried_prebuilt"]:
        st["tried_prebuilt"] = True
        err = _try_prebuilt(kind)
        if err is None:
            st.update(loaded=True, error=None, how="prebuilt")
            return None
        st["error"] = err
    if allow_jit and not st["tried_jit"]:
        st["tried_jit"] = True
        err = _try_jit(kind)
        if err is None:
            st.update(loaded=True, error=None, how="jit")
            return None
        st["error"] = f"{st['error']}; {err}"
    return st["error"]


def load_error(kind: str = "cpu", allow_jit: bool = False) -> str | None:
    """None once the ops have ``kind`` ("cpu" or "cuda") kernels, else why not and how to build them.

    The CPU library (op schema) is loaded first in both cases.
    """
    with _lock:
        if kind == "cuda" and torch.version.cuda is None:
            return (f"the cuda backend is not built: this torch ({torch.__version__}) is a CPU-only build; "
                    f"{native_build.build_hint('cuda')}")
        err = _load("cpu", allow_jit)
        if err is not None:
            if kind == "cuda":
                return (f"the cuda backend is not built: it needs the CPU library (op schema) first, which is "
                        f"not built: {err}; {native_build.build_hint('cpu')}")
            return f"the cpp backend is not built: {err}; {native_build.build_hint('cpu')}"
        if kind == "cuda":
            err = _load("cuda", allow_jit)
            if err is not None:
                return f"the cuda backend is not built: {err}; {native_build.build_hint('cuda')}"
        try:
            _register_fakes()
        except Exception:  # fakes are an optimisation for torch.compile only
            pass
        return None


def how_loaded(kind: str = "cpu") -> str | None:
    """"prebuilt", "jit" or None."""
    return _state[kind]["how"]


def compiler_available(kind: str) -> bool:
    """Whether this machine could build the ``kind`` library (for tests: skip vs fail)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False
    return kind == "cpu" or native_build.find_nvcc() is not None


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
