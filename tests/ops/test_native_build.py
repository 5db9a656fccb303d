"""The native build and loader: separate CPU / CUDA libraries, no fast-math, loud reasons.

Mutations checked (each made a test here fail): ``--use_fast_math`` added to
``native_build.NVCC_FLAGS``; setup.py's missing-prerequisite branch turned back into a silent
skip when ``AP_ERASE_BUILD_CUDA=1``; the CUDA sources added to the CPU library's list; the
loader's reasons (cpp, and cuda with a CPU-only torch) without the build command.
"""
import os
import subprocess
import sys

import pytest
import torch

from ap_erase_fast.ops import native_build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_TORCH = torch.version.cuda is None


def _run(code_or_args, **env):
    args = code_or_args if isinstance(code_or_args, list) else [sys.executable, "-c", code_or_args]
    full_env = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def test_cpu_and_cuda_sources_are_separate_libraries():
    cpu, cuda = native_build.sources("cpu"), native_build.sources("cuda")
    assert all(os.path.exists(p) for p in cpu + cuda)
    assert not set(cpu) & set(cuda)
    assert not any(p.endswith(".cu") for p in cpu), "the CPU library must build without nvcc"
    schema = [p for p in cpu + cuda if "TORCH_LIBRARY(" in open(p).read()]
    assert schema == [os.path.join(native_build.csrc_dir(), "ops_schema.cpp")], "one op schema, in the CPU library"
    kernels_cu = os.path.join(native_build.csrc_dir(), "gumbel_mix_cuda_kernels.cu")
    assert "#include <ATen" not in open(kernels_cu).read() and "#include <torch" not in open(kernels_cu).read()


def test_nvcc_flags_refuse_fast_math(monkeypatch):
    native_build.check_nvcc_flags(list(native_build.NVCC_FLAGS) + native_build.gencode_flags())
    for flag in ("--use_fast_math", "-use_fast_math", "--ftz=true"):
        with pytest.raises(ValueError, match="fast-math"):
            native_build.check_nvcc_flags(["-O3", flag])
    monkeypatch.setenv("NVCC_APPEND_FLAGS", "-lineinfo --use_fast_math")
    with pytest.raises(ValueError, match="NVCC_APPEND_FLAGS"):
        native_build.check_nvcc_flags(list(native_build.NVCC_FLAGS))


def test_gencode_flags_cover_a100_to_h100():
    assert native_build.gencode_flags() == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_89,code=sm_89", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]
    assert native_build.DEFAULT_ARCH_LIST == "8.0;8.6;8.9;9.0+PTX"


def test_build_switch_values(monkeypatch):
    for value, mode in (("0", "off"), ("no", "off"), ("1", "on"), ("auto", "auto")):
        monkeypatch.setenv("AP_ERASE_BUILD_CUDA", value)
        assert native_build.switch("AP_ERASE_BUILD_CUDA") == mode
    monkeypatch.setenv("AP_ERASE_BUILD_CUDA", "maybe")
    with pytest.raises(ValueError, match="AP_ERASE_BUILD_CUDA"):
        native_build.switch("AP_ERASE_BUILD_CUDA")


@pytest.mark.skipif(not CPU_TORCH, reason="checks the messages of a CPU-only torch")
def test_setup_says_why_the_cuda_library_is_skipped_and_fails_when_it_is_required():
    """setup.py (run as `setup.py --version`, which evaluates the build plan but compiles
    nothing): with a CPU-only torch the CUDA library is skipped with the reason; required with
    AP_ERASE_BUILD_CUDA=1 it is an error, never a silent gap."""
    auto = _run([sys.executable, "setup.py", "--version"], AP_ERASE_BUILD_CUDA="auto")
    assert auto.returncode == 0, auto.stderr
    assert "not building the CUDA library (cuda backend): this torch" in auto.stderr
    assert "CPU-only build" in auto.stderr
    required = _run([sys.executable, "setup.py", "--version"], AP_ERASE_BUILD_CUDA="1")
    assert required.returncode != 0
    assert "error: not building the CUDA library" in required.stderr + required.stdout
    assert "AP_ERASE_BUILD_CUDA=1" in required.stderr + required.stdout
    off = _run([sys.executable, "setup.py", "--version"], AP_ERASE_BUILD_EXT="0")
    assert off.returncode == 0 and "AP_ERASE_BUILD_EXT=0: skipping" in off.stderr


def test_unbuilt_backends_say_why_and_how_to_build():
    code = ("from ap_erase_fast.ops._backends import why_unavailable\n"
            "print(why_unavailable('cpp', 'cpu', explicit=True))\n"
            "print(why_unavailable('cuda', 'cuda', explicit=True))\n")
    out = _run(code, AP_ERASE_JIT="0")
    assert out.returncode == 0, out.stderr
    cpp, cuda = out.stdout.strip().splitlines()[-2:]
    if cpp != "None":  # no prebuilt library next to the package (a source checkout)
        assert cpp.startswith("the cpp backend is not built: ")
        assert "pip install --no-build-isolation ." in cpp and "AP_ERASE_JIT=1" in cpp
    assert cuda.startswith("the cuda backend is not built: ")
    assert "pip install --no-build-isolation ." in cuda and "AP_ERASE_JIT=1" in cuda
    if CPU_TORCH:
        assert "CPU-only build" in cuda


def test_cpu_library_alone_serves_the_cpp_backend():
    """Loading the CPU library registers the schema and CPU kernels; without the CUDA library
    the ops have no CUDA kernel (and a CPU-only torch never tries to load it)."""
    from _ops_testlib import require_backend

    require_backend("cpp", "cpu")
    from ap_erase_fast.ops import _native

    assert _native.has_kernel("cpu")
    if CPU_TORCH:
        assert not _native.has_kernel("cuda")
