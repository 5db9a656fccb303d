"""Build script: the pure-Python package plus two optional native libraries (see docs/ops.md).

* ``ap_erase_fast._C``      -- op schema + CPU kernels (backend ``cpp``);
* ``ap_erase_fast._C_cuda`` -- CUDA kernels (backend ``cuda``), built separately, so a CUDA
  problem never takes the CPU kernels with it.

All metadata lives in pyproject.toml; sources and flags in ap_erase_fast/ops/native_build.py.
Switches (environment): ``AP_ERASE_BUILD_EXT`` (both libraries) and ``AP_ERASE_BUILD_CUDA``
(the CUDA one): ``auto`` (default) builds what this machine can build and says what it skipped
and why; ``1`` makes a missing prerequisite an error; ``0`` skips.  A library whose compilation
fails stops the install with the compiler's error and the switch that skips it: nothing
disappears without a word.  ``pip install .`` builds in an isolated environment without torch,
so it installs the pure-Python package only (the tests JIT-build the CPU kernels instead);
``pip install --no-build-isolation .`` builds the libraries against the installed torch.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # by file path: importing the package would import torch before we know it is there
    path = os.path.join(HERE, "ap_erase_fast", "ops", "native_build.py")
    spec = importlib.util.spec_from_file_location("_ap_erase_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nb = _load_build_config()
_summary = []


def _note(msg):
    print(f"ap_erase_fast setup: {msg}", file=sys.stderr)


_WHAT = {"CPU": "the native libraries (cpp and cuda backends)", "CUDA": "the CUDA library (cuda backend)"}


def _skip(kind, switch_name, mode, why):
    """A prerequisite is missing: an error when the library was required, else a note."""
    msg = f"not building {_WHAT[kind]}: {why}"
    if mode == "on":
        raise SystemExit(f"ap_erase_fast setup: error: {msg} (required by {switch_name}=1)")
    _note(msg)
    _summary.append(f"{kind}: skipped ({why})")


def _native_build():
    ext_mode = nb.switch("AP_ERASE_BUILD_EXT")
    cuda_mode = nb.switch("AP_ERASE_BUILD_CUDA") if ext_mode != "off" else "off"
    if ext_mode == "off":
        _note("AP_ERASE_BUILD_EXT=0: skipping the native libraries (backends triton and torch only)")
        return [], {}
    if not all(os.path.exists(p) for p in nb.sources("cpu", os.path.join(HERE, "csrc"))):
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _skip("CPU", "AP_ERASE_BUILD_EXT", ext_mode, "no C++ compiler found (set CXX)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # pip's isolated build env has no torch
        _skip("CPU", "AP_ERASE_BUILD_EXT", ext_mode,
              f"torch is not importable here ({type(exc).__name__}); pip builds in an isolated environment "
              "unless run as `pip install --no-build-isolation .`")
        return [], {}

    rel = lambda kind: [os.path.relpath(p, HERE) for p in nb.sources(kind, os.path.join(HERE, "csrc"))]  # noqa: E731
    exts = [CppExtension(nb.CPU_EXT, rel("cpu"), extra_compile_args={"cxx": list(nb.CXX_FLAGS)},
                         extra_link_args=list(nb.LD_FLAGS))]
    if cuda_mode != "off":
        if torch.version.cuda is None:
            _skip("CUDA", "AP_ERASE_BUILD_CUDA", cuda_mode,
                  f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch")
        elif nb.toolkit_problem(CUDA_HOME) is not None:
            _skip("CUDA", "AP_ERASE_BUILD_CUDA", cuda_mode, nb.toolkit_problem(CUDA_HOME))
        else:
            nvcc = list(nb.NVCC_FLAGS)
            if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                nvcc += nb.gencode_flags()  # torch adds its own arch flags only when we add none
            nb.check_nvcc_flags(nvcc)
            _note(f"building the CUDA library with CUDA_HOME={CUDA_HOME} for "
                  f"{os.environ.get('TORCH_CUDA_ARCH_LIST') or nb.DEFAULT_ARCH_LIST}")
            exts.append(CUDAExtension(nb.CUDA_EXT, rel("cuda"),
                                      extra_compile_args={"cxx": list(nb.CUDA_CXX_FLAGS), "nvcc": nvcc}))

    class LoudBuildExt(BuildExtension):
        """Builds each library on its own; a failure stops the install and says how to skip it."""

        def build_extension(self, ext):
            switch = "AP_ERASE_BUILD_CUDA" if ext.name == nb.CUDA_EXT else "AP_ERASE_BUILD_EXT"
            try:
                super().build_extension(ext)
            except Exception as exc:
                raise SystemExit(
                    f"ap_erase_fast setup: error: building {ext.name} failed: {exc}\n"
                    f"  The compiler output above says why. To install without this library, set "
                    f"{switch}=0 (the package then uses its other backends).") from exc
            _summary.append(f"{'CUDA' if ext.name == nb.CUDA_EXT else 'CPU'}: built ({ext.name})")

        def run(self):
            super().run()
            for line in _summary:
                _note(line)

    return exts, {"build_ext": LoudBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
