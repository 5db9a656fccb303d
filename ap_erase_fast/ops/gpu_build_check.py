"""Compile every GPU kernel for real GPU targets, on a machine without a GPU.

    python -m ap_erase_fast.ops.gpu_build_check                     # Triton + CUDA, sm_80/86/89/90
    python -m ap_erase_fast.ops.gpu_build_check --triton --arch 90 --json report.json

Triton: the launchers of :mod:`.triton_gumbel_mix` run on (never touched) CPU tensors for a
sweep of table dtypes, draw counts, shapes, noise modes and gradients, with the GPU tuning, under
a compile-only Triton driver for each target. Every launch they make is recorded with Triton's
own argument specialization (signature, constexprs, alignment attributes) and skipped; each
distinct one is then compiled with ``triton.compile`` for that target (ptxas included). So the
configurations compiled are exactly those the launchers choose, from their own planning code.
Checked per kernel: it compiles, its shared memory fits the target, its registers fit the block,
and the noise path (``_weights_kernel`` without given noise) has no approximate log.

CUDA: nvcc compiles ``csrc/gumbel_mix_cuda_kernels.cu`` for the targets with the flags of
:mod:`.native_build` (compile only), the host side ``gumbel_mix_cuda.cpp`` is compiled against
torch's headers with the C++ compiler. Checked: both compile, no approximate log in the PTX,
registers fit each kernel's block size, no spills.

Registers and spills are read from the compiled code with ``cuobjdump`` (the CUDA toolkit's, or
the one Triton ships). Without one those checks cannot run: each row says ``"resources": "not
checked (no cuobjdump: ...)"``, the part lists them under ``not_checked`` and the printed report
says NOT CHECKED; such rows never count as passed.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the compiler). Exit status 1 when a
check failed, else 0 (a check that could not run is reported, not failed); ``--json`` writes the
full report (tests/ops/test_gpu_build.py reads it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

from . import native_build

ARCHS = tuple(int(a.replace(".", "")) for a in native_build.CUDA_ARCHS)  # 80, 86, 89, 90
# largest shared memory one block may use (opt-in), per compute capability
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_KERNELS = ("_weights_kernel", "_mix_fwd_kernel", "_mix_bwd_kernel", "_softmax_bwd_kernel", "_l2_kernel")
CUDA_KERNELS = ("weights_kernel", "mix_forward_kernel", "mix_backward_kernel", "table_grad_kernel",
                "softmax_backward_kernel", "l2_kernel")
PROGRAMS = 4 * 132  # the split plans as on an H100 SXM (132 SMs); other counts pick the same configs


# ------------------------------------------------------------------------------------- Triton
class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports a target, never launches."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"compile-only:{self.target.arch}"  # one binder cache per target

    def get_current_stream(self, device=None):
        return 0


def _scenarios():
    """Launcher calls covering every branch of their planning: (label, thunk) pairs."""
    import torch

    from . import triton_gumbel_mix as tgm

    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype)  # never written or read: launches are recorded only

    out = []
    # SD1.x prompt embeddings (77 x 768): D % 16 == 0. N = 20 plans one row slice, N = 1031 several
    # (fp32 partials); G = 1, 2, 3, 5 give BLOCK_G = 1, 2, 4, 8; G = 9 is chunked.
    D = 77 * 768
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for N in (20, 1031):
            table = empty(N, D, dtype=dtype)
            for G in (1, 2, 3, 5, 9):
                w = empty(G, N)
                go = empty(G, D, dtype=dtype)
                out.append((f"mix_forward {dtype} N={N} G={G}", lambda t=table, w=w: tgm.mix_forward(t, w)))
                for need_logits, need_table in ((True, False), (False, True), (True, True)):
                    if G == 9 and need_table:
                        continue  # chunked d table sums touch memory; the chunks' configs are covered
                    out.append((f"mix_backward {dtype} N={N} G={G} logits={need_logits} table={need_table}",
                                lambda t=table, go=go, w=w, a=need_logits, b=need_table:
                                tgm.mix_backward(t, go, w, w, 1.5, a, b)))
            out.append((f"l2_scores {dtype} N={N}", lambda t=table: tgm.l2_scores(empty(D), t)))
    for N in (20, 1031):
        logits = empty(3, N)
        for topk in (0, 5):
            out.append((f"weights given noise N={N} topk={topk}",
                        lambda lg=logits, k=topk: tgm.weights(lg, lg, 0, 1.5, k)))
            for seed in (99, 2**40):  # int32 and int64 seeds specialize differently
                out.append((f"weights seed={seed} N={N} topk={topk}",
                            lambda lg=logits, k=topk, s=seed: tgm.weights(lg, None, s, 1.5, k)))
    return out


def record_triton_launches(cc: int) -> list[dict]:
    """The distinct kernel compilations the GPU launchers request for compute capability ``cc``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from . import triton_gumbel_mix as tgm

    if tgm._INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter replaces the compiler; run without it")
    records: dict[str, dict] = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        rec = {"kernel": fn.name, "signature": compile["signature"],
               "constants": [[list(k), v] for k, v in sorted(compile["constants"].items())],
               "attrs": [[list(k), v] for k, v in sorted(compile["configs"][0].items())],
               "options": {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}}
        records.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)
        return True  # do not compile, do not launch

    old_driver, old_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", cc, 32)))
    knobs.runtime.jit_cache_hook = hook
    try:
        with tgm.tuning(tgm.GPU_TUNING, programs=PROGRAMS):
            for _, call in _scenarios():
                call()
    finally:
        driver._active, knobs.runtime.jit_cache_hook = old_driver, old_hook
    return list(records.values())


CHECKED = "checked"
NO_CUOBJDUMP = ("not checked (no cuobjdump: install the CUDA toolkit and set CUDA_HOME, or a Triton "
                "that ships its NVIDIA tools)")


def _cubin_resources(cubin: bytes) -> dict:
    """Registers / stack / local memory of a cubin, from the cuobjdump shipped with Triton (the
    toolkit's when Triton has none), with ``resources``: ``CHECKED`` or why they are absent."""
    tool = _cuobjdump(triton_first=True)
    if tool is None:
        return {"resources": NO_CUOBJDUMP}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if m is None:
        return {"resources": f"not checked ({tool} --dump-resource-usage printed no resource usage)"}
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3)),
            "resources": CHECKED}


def compile_triton(cc: int, rec: dict) -> dict:
    """triton.compile one recorded launch for compute capability ``cc``; the result with checks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_gumbel_mix as tgm

    fn = getattr(tgm, rec["kernel"])
    constants = {tuple(k): v for k, v in rec["constants"]}
    attrs = {tuple(k): v for k, v in rec["attrs"]}
    result = {"arch": cc, "kernel": rec["kernel"], "signature": rec["signature"],
              "constexprs": {fn.arg_names[k[0]]: v for k, v in constants.items() if len(k) == 1},
              "errors": []}
    start = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, rec["signature"], constants, attrs), target=GPUTarget("cuda", cc, 32),
                           options=rec["options"])
    except Exception as exc:  # noqa: BLE001 -- reported, the check goes on
        result["errors"].append(f"compile failed: {type(exc).__name__}: {str(exc)[:2000]}")
        return result
    result["seconds"] = round(time.perf_counter() - start, 3)
    ptx = k.asm["ptx"]
    result.update(shared=k.metadata.shared, num_warps=k.metadata.num_warps,
                  lg2_approx=("lg2.approx" in ptx), ptx_bytes=len(ptx), **_cubin_resources(k.asm["cubin"]))
    threads = 32 * k.metadata.num_warps
    if k.metadata.shared > MAX_SHARED[cc]:
        result["errors"].append(f"shared memory {k.metadata.shared} B > {MAX_SHARED[cc]} B of sm_{cc}")
    if result["resources"] == CHECKED:
        if result["registers"] * threads > 65536:
            result["errors"].append(f"{result['registers']} registers x {threads} threads > 65536")
        if result["local"] or result["stack"]:
            result["errors"].append(f"register spills: {result['stack']} B stack, {result['local']} B local memory")
    noise = rec["kernel"] == "_weights_kernel" and not result["constexprs"].get("HAS_GUMBEL", True)
    if noise and result["lg2_approx"]:
        result["errors"].append("the in-kernel Gumbel noise uses an approximate log (lg2.approx)")
    return result


def _compile_many(jobs):
    cc, rec = jobs
    return compile_triton(cc, rec)


def check_triton(archs=ARCHS, workers: int | None = None) -> dict:
    start = time.perf_counter()
    work = [(cc, rec) for cc in archs for rec in record_triton_launches(cc)]
    workers = workers or max(1, min(len(work), os.cpu_count() or 1))
    if workers == 1:
        results = [_compile_many(w) for w in work]
    else:
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_compile_many, work, chunksize=4))
    import triton

    return {"triton": triton.__version__, "archs": list(archs), "kernels": results,
            "errors": [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {e}" for r in results for e in r["errors"]],
            "not_checked": _triton_not_checked(results),
            "seconds": round(time.perf_counter() - start, 1)}


def _triton_not_checked(results: list[dict]) -> list[str]:
    """One line per reason the register / spill checks did not run on some compilations."""
    compiled = [r for r in results if "resources" in r]  # a failed compile is an error already
    reasons: dict[str, int] = {}
    for r in compiled:
        if r["resources"] != CHECKED:
            reasons[r["resources"]] = reasons.get(r["resources"], 0) + 1
    return [f"registers and spills of {n} of {len(compiled)} compilations: {why}" for why, n in reasons.items()]


# --------------------------------------------------------------------------------------- CUDA
def _cuobjdump(triton_first: bool = False) -> str | None:
    """cuobjdump of the CUDA toolkit, else the one shipped with Triton (``triton_first``: the
    other way round, for cubins of Triton's own ptxas); None when there is neither."""
    home = native_build.cuda_home()
    cands = [os.path.join(home, "bin", "cuobjdump")] if home else []
    try:
        from triton import knobs

        cands.insert(0 if triton_first else len(cands),
                     os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump"))
    except Exception:  # noqa: BLE001 -- triton is optional here
        pass
    return next((c for c in cands if os.access(c, os.X_OK)), None)


def _resources(obj: str) -> list[dict] | None:
    """Per (kernel instantiation, arch): registers, stack, local (spill) and shared bytes of the
    SASS in an object file, or None when no cuobjdump is available."""
    tool = _cuobjdump()
    if tool is None:
        return None
    text = subprocess.run([tool, "--dump-resource-usage", obj], capture_output=True, text=True).stdout
    out, arch = [], None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = re.search(r"\d+(" + "|".join(CUDA_KERNELS) + r")", m.group(1))
            out.append({"kernel": name.group(1) if name else m.group(1), "mangled": m.group(1), "arch": arch})
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and out:
            out[-1].update(registers=int(m.group(1)), stack=int(m.group(2)), smem=int(m.group(3)),
                           local=int(m.group(4)))
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _block_threads() -> dict:
    """Threads per block of each CUDA kernel, read from csrc/gumbel_mix_cuda.h."""
    header = _read(os.path.join(native_build.csrc_dir(), "gumbel_mix_cuda.h"))
    threads = int(re.search(r"kThreads = (\d+);", header).group(1))
    weight_threads = int(re.search(r"kWeightThreads = (\d+);", header).group(1))
    return {k: weight_threads if k in ("weights_kernel", "softmax_backward_kernel") else threads
            for k in CUDA_KERNELS}


def _host_command(src: str, nvcc: str) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    cuda_home = native_build.cuda_home(nvcc)
    includes = cpp_extension.include_paths("cpu") + [os.path.join(cuda_home, "include"),
                                                     sysconfig.get_paths()["include"]]
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-fsyntax-only", "-fPIC", "-Wall",
           *list(native_build.CUDA_CXX_FLAGS), "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        # CPU wheels lack this generated header; torch's own switch skips it (on Linux it only
        # defines C10_CUDA_BUILD_SHARED_LIBS, which affects Windows DLL exports)
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in includes:
        cmd += ["-isystem", inc]
    return cmd + [src]


def start_cuda(archs=ARCHS) -> dict:
    """Start nvcc (device code) and the C++ compiler (host code) for the CUDA library; they run
    while the Triton check works. :func:`finish_cuda` collects them."""
    nvcc = native_build.find_nvcc()
    if nvcc is None:
        return {"skipped": "nvcc not found (put it on PATH or set CUDA_HOME)", "errors": []}
    src_dir = native_build.csrc_dir()
    kernels_cu, host_cpp = (os.path.join(src_dir, n) for n in ("gumbel_mix_cuda_kernels.cu", "gumbel_mix_cuda.cpp"))
    flags = list(native_build.NVCC_FLAGS) + native_build.gencode_flags([f"{a // 10}.{a % 10}" for a in archs])
    native_build.check_nvcc_flags(flags)
    try:  # the flags torch's extension builder adds to every nvcc call (half/bf16 macros, ...)
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        flags = list(COMMON_NVCC_FLAGS) + flags
    except ImportError:
        pass
    tmp = tempfile.TemporaryDirectory()
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return {"archs": archs, "start": time.perf_counter(), "tmp": tmp, "sources": (kernels_cu, host_cpp),
            "nvcc": next((ln for ln in subprocess.run([nvcc, "--version"], capture_output=True, text=True)
                          .stdout.splitlines() if "release" in ln), "unknown version"),
            "device": subprocess.Popen([nvcc, "-std=c++17", "-c", kernels_cu, "-o", os.path.join(tmp.name, "k.o"),
                                        *flags, "--threads", str(len(archs)), "--keep",
                                        "--keep-dir", tmp.name, "--compiler-options", "-fPIC"], **pipe),
            "host": subprocess.Popen(_host_command(host_cpp, nvcc), **pipe)}


def finish_cuda(job: dict) -> dict:
    if "skipped" in job:
        return job
    archs, tmp, (kernels_cu, host_cpp) = job["archs"], job["tmp"], job["sources"]
    dev_out, host_out = job["device"].communicate()[0], job["host"].communicate()[0]
    dev_rc, host_rc = job["device"].returncode, job["host"].returncode
    report = {"nvcc": job["nvcc"], "archs": list(archs), "errors": [],
              "device_compile": {"returncode": dev_rc}, "host_compile": {"returncode": host_rc}}
    if dev_rc != 0:
        report["errors"].append(f"nvcc failed on {os.path.basename(kernels_cu)}:\n{dev_out[-4000:]}")
    if host_rc != 0:
        report["errors"].append(f"host compile of {os.path.basename(host_cpp)} failed:\n{host_out[-4000:]}")
    elif host_out.strip():
        report["host_compile"]["warnings"] = host_out[-2000:]
    ptx = {}
    for a in archs:
        path = os.path.join(tmp.name, f"gumbel_mix_cuda_kernels.compute_{a}.ptx")
        ptx[a] = _read(path) if os.path.exists(path) else ""
    resources = _resources(os.path.join(tmp.name, "k.o")) if dev_rc == 0 else []
    tmp.cleanup()
    report["kernels"] = resources or []
    report["not_checked"] = []
    if resources is None:
        report["not_checked"].append(f"registers, spills and the compiled kernel list of sm_"
                                     f"{', sm_'.join(map(str, archs))}: {NO_CUOBJDUMP}")
    for r in resources or ():
        r["resources"] = CHECKED if "registers" in r else "not checked (cuobjdump printed no resource usage)"
        if r["resources"] != CHECKED:
            report["not_checked"].append(f"{r['arch']} {r['kernel']}: registers and spills {r['resources']}")
    if dev_rc == 0:
        threads = _block_threads()
        report["ptx_lg2_approx"] = {a: "lg2.approx" in text for a, text in ptx.items()}
        for a, text in ptx.items():
            if "weights_kernel" not in text:
                report["errors"].append(f"compute_{a}: no PTX for weights_kernel")
            if "lg2.approx" in text:
                report["errors"].append(f"compute_{a}: approximate log (lg2.approx) in the PTX: the Gumbel "
                                        "noise would differ from the other backends")
        for a in archs if resources is not None else ():
            seen = {r["kernel"] for r in resources if r["arch"] == f"sm_{a}"}
            if seen != set(CUDA_KERNELS):
                report["errors"].append(f"sm_{a}: compiled kernels {sorted(seen)} != {sorted(CUDA_KERNELS)}")
        for r in [r for r in resources or () if r["resources"] == CHECKED]:
            where = f"{r['arch']} {r['kernel']}"
            limit = min(255, 65536 // threads.get(r["kernel"], 256))
            if r.get("registers", 0) > limit:
                report["errors"].append(f"{where}: {r['registers']} registers > {limit} for "
                                        f"{threads.get(r['kernel'])}-thread blocks (the launch would fail)")
            if r.get("local", 0) or r.get("stack", 0):
                report["errors"].append(f"{where}: {r.get('stack')} B stack, {r.get('local')} B local memory "
                                        f"(register spills) in {r['mangled']}")
            if r.get("smem", 0) > 48 * 1024:
                report["errors"].append(f"{where}: {r['smem']} B static shared memory > 48 KiB")
    report["seconds"] = round(time.perf_counter() - job["start"], 1)
    return report


def check_cuda(archs=ARCHS) -> dict:
    return finish_cuda(start_cuda(archs))


# --------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--triton", action="store_true", help="check the Triton kernels")
    p.add_argument("--cuda", action="store_true", help="check the CUDA extension")
    p.add_argument("--arch", default=",".join(map(str, ARCHS)),
                   help="compute capabilities, e.g. 80,86,89,90 (default)")
    p.add_argument("--workers", type=int, default=None, help="Triton compile processes (default: CPU count)")
    p.add_argument("--json", default=None, help="write the full report here")
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    unknown = [a for a in archs if a not in MAX_SHARED]
    if unknown:
        p.error(f"--arch {unknown}: choose from {sorted(MAX_SHARED)}")
    both = not (args.triton or args.cuda)
    report = {}
    cuda = start_cuda(archs) if (both or args.cuda) else None  # compiles while Triton works
    if both or args.triton:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            report["triton"] = {"skipped": f"triton is not installed ({exc})", "errors": []}
        else:
            report["triton"] = check_triton(archs, args.workers)
    if cuda is not None:
        report["cuda"] = finish_cuda(cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    failed = False
    for part, r in report.items():
        if r.get("skipped"):
            print(f"{part}: skipped: {r['skipped']}")
            continue
        n = len(r.get("kernels", []))
        missing = r.get("not_checked", [])
        print(f"{part}: {n} kernel compilations for sm_{', sm_'.join(map(str, archs))} in {r['seconds']} s, "
              f"{len(r['errors'])} problems" + (f", {len(missing)} NOT CHECKED" if missing else ""))
        for e in r["errors"]:
            print(f"  {e}")
        for m in missing:
            print(f"  NOT CHECKED: {m}")
        failed |= bool(r["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
