"""How the native extensions are built: sources, compiler flags, CUDA targets, in one place.

Two libraries, built and loaded separately so that a CUDA problem never takes the CPU kernels
with it:

* ``ap_erase_fast._C`` -- the op schema (``csrc/ops_schema.cpp``) and the CPU kernels;
* ``ap_erase_fast._C_cuda`` -- the CUDA kernels only (registered for the same ops).

Read by ``setup.py`` (loaded by file path, so it must not import torch or the package), by the
JIT build in :mod:`._native` and by the compile-only checks in :mod:`.gpu_build_check`: the
three always use the same sources and flags.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

CPU_EXT = "ap_erase_fast._C"
CUDA_EXT = "ap_erase_fast._C_cuda"
CPU_SOURCES = ("ops_schema.cpp", "gumbel_mix_cpu.cpp")
CUDA_SOURCES = ("gumbel_mix_cuda.cpp", "gumbel_mix_cuda_kernels.cu")
HEADERS = ("philox.h", "gumbel_mix_cuda.h")

# GPUs the CUDA library is built for by default: A100 (8.0), RTX 30xx (8.6), RTX 40xx / L4 / L40
# (8.9), H100 / H200 (9.0), plus PTX of 9.0 so newer GPUs can JIT-compile it. TORCH_CUDA_ARCH_LIST
# overrides it (torch's syntax, e.g. "8.6" or "8.0;9.0+PTX").
CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0")
DEFAULT_ARCH_LIST = ";".join(CUDA_ARCHS[:-1]) + ";" + CUDA_ARCHS[-1] + "+PTX"

# at::parallel_for is header code that only runs in parallel when the extension itself is
# compiled with OpenMP.
CXX_FLAGS = ("-O3", "-DNDEBUG", "-fopenmp")
LD_FLAGS = ("-fopenmp",)
CUDA_CXX_FLAGS = ("-O3", "-DNDEBUG")  # host side of the CUDA library (gumbel_mix_cuda.cpp)
# No fast-math: the Gumbel noise needs the accurate logf (csrc/philox.h), and nvcc defines no
# macro the source could check. -lineinfo costs nothing at run time and helps profilers.
NVCC_FLAGS = ("-O3", "-DNDEBUG", "-lineinfo")
FAST_MATH_FLAGS = ("--use_fast_math", "-use_fast_math", "--ftz=true", "-ftz=true", "--prec-div=false",
                   "-prec-div=false")

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def csrc_dir() -> str:
    """csrc/ of the source checkout this file belongs to (absent in an installed wheel)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


def sources(kind: str, root: str | None = None) -> list[str]:
    """Paths of the ``"cpu"`` or ``"cuda"`` sources under ``root`` (default: :func:`csrc_dir`)."""
    names = {"cpu": CPU_SOURCES, "cuda": CUDA_SOURCES}[kind]
    return [os.path.join(root or csrc_dir(), n) for n in names]


def switch(name: str, default: str = "auto") -> str:
    """``"auto"``, ``"on"`` or ``"off"`` from a build switch such as ``AP_ERASE_BUILD_CUDA``."""
    value = os.environ.get(name, default).strip().lower()
    if value in _OFF:
        return "off"
    if value in _ON:
        return "on"
    if value == "auto":
        return "auto"
    raise ValueError(f"{name}={value!r}: use 1 (required), 0 (skip) or auto")


def gencode_flags(archs=CUDA_ARCHS, ptx_of_last: bool = True) -> list[str]:
    """nvcc -gencode flags for ``archs`` ("8.0", ...): SASS for each, PTX of the last one."""
    flags = []
    for i, arch in enumerate(archs):
        num = arch.replace(".", "")
        code = f"sm_{num}"
        if ptx_of_last and i == len(archs) - 1:
            code = f"[sm_{num},compute_{num}]"
        flags.append(f"-gencode=arch=compute_{num},code={code}")
    return flags


def check_nvcc_flags(flags) -> None:
    """Refuse flags that make the in-kernel noise approximate."""
    bad = [f for f in flags if f in FAST_MATH_FLAGS]
    if bad:
        raise ValueError(f"nvcc flags {bad} would make logf approximate and change the Gumbel noise; "
                         "the CUDA kernels must be built without fast-math")
    env_extra = os.environ.get("NVCC_APPEND_FLAGS", "") + " " + os.environ.get("NVCC_PREPEND_FLAGS", "")
    bad = [f for f in env_extra.split() if f in FAST_MATH_FLAGS]
    if bad:
        raise ValueError(f"NVCC_APPEND_FLAGS/NVCC_PREPEND_FLAGS contain {bad}: the CUDA kernels must be "
                         "built without fast-math (the Gumbel noise needs the accurate logf)")


def find_nvcc() -> str | None:
    """The nvcc that torch's extension builder would use: $CUDA_HOME/bin/nvcc, else PATH, else
    /usr/local/cuda/bin/nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            path = os.path.join(home, "bin", "nvcc")
            return path if os.access(path, os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    path = "/usr/local/cuda/bin/nvcc"
    return path if os.access(path, os.X_OK) else None


@functools.lru_cache(maxsize=None)
def _toolkit_root(nvcc: str) -> str:
    try:
        run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", run.stderr + run.stdout, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_home(nvcc: str | None = None) -> str | None:
    """Root of the CUDA toolkit that ``nvcc`` belongs to, as nvcc itself reports it (the nvcc on
    PATH may be a wrapper script elsewhere, which torch would take for the toolkit root)."""
    nvcc = nvcc or find_nvcc()
    return None if nvcc is None else _toolkit_root(nvcc)


def toolkit_problem(torch_cuda_home: str | None) -> str | None:
    """Why the CUDA_HOME torch uses cannot build the CUDA library, with the fix; None if it can."""
    if torch_cuda_home is None or find_nvcc() is None:
        return "no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)"
    if not os.path.exists(os.path.join(torch_cuda_home, "include", "cuda_runtime.h")):
        real = cuda_home()
        fix = f"set CUDA_HOME={real}" if real and real != torch_cuda_home else "set CUDA_HOME to the toolkit root"
        return f"CUDA_HOME={torch_cuda_home} has no include/cuda_runtime.h (is the nvcc on PATH a wrapper?): {fix}"
    return None


def build_hint(kind: str) -> str:
    """How to build the ``"cpu"`` or ``"cuda"`` library (one sentence for error messages)."""
    if kind == "cpu":
        return ("build it with `pip install --no-build-isolation .` in a source checkout (needs a C++ "
                "compiler and torch installed first), or set AP_ERASE_JIT=1 to compile csrc/ on first use")
    return ("build it with `pip install --no-build-isolation .` in a source checkout (needs a CUDA build of "
            "torch and nvcc on PATH or CUDA_HOME set), or set AP_ERASE_JIT=1 to compile csrc/ on first use")
