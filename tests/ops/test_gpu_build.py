"""GPU build checks that need no GPU (marker ``gpu_build``): every Triton kernel configuration
the GPU launchers can choose, and the CUDA library, compiled for sm_80, sm_86, sm_89 and sm_90.

One run of ``python -m ap_erase_fast.ops.gpu_build_check`` (in a subprocess: the compiler must
not see ``TRITON_INTERPRET``) compiles them; the tests read its JSON report. Triton's compile
cache lives in ``.cache/gpu_build/triton`` of the checkout (a clean checkout compiles all).
Skipped only where a tool is genuinely absent: Triton not installed, or no nvcc (the reason is
printed); without cuobjdump the register and spill tests skip with the check's own "not checked"
line (the tests at the end check that the report says so and passes no such row).

Mutations checked (each made a test here fail): ``min<int64_t>(...)`` back in the CUDA kernels
(nvcc 13 rejects it); ``__logf`` instead of ``logf`` in ``gumbel_from_uniform`` on the device
(lg2.approx in the PTX); ``tl.log`` replaced by libdevice ``fast_logf`` in the Triton noise
(lg2.approx); ``GPU_TUNING.bwd_block_d`` 256 -> 8192 (register spills); bf16 dropped from the
check's sweep (coverage test). Not reached by a mutation: the register limit of the 1024-thread
CUDA kernels (without its launch bound the weights kernel needs 40 registers, under the 64
allowed) and the shared-memory limits (these kernels use at most 4 KiB).
"""
import itertools
import json
import os
import subprocess
import sys

import pytest

from ap_erase_fast.ops import native_build

pytestmark = pytest.mark.gpu_build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = [int(a.replace(".", "")) for a in native_build.CUDA_ARCHS]
DTYPES = ("fp32", "bf16", "fp16")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_build") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(REPO, ".cache", "gpu_build", "triton")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "ap_erase_fast.ops.gpu_build_check", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-3000:], run.stderr[-3000:])
    assert out.exists(), f"the check wrote no report (exit {run.returncode}):\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


def _part(report, name):
    part = report[name]
    if part.get("skipped"):
        pytest.skip(f"{name}: {part['skipped']}")
    return part


# ------------------------------------------------------------------------------------- Triton
def test_triton_kernels_compile_for_every_target(report):
    tr = _part(report, "triton")
    assert tr["errors"] == [], "\n".join(tr["errors"])
    assert tr["archs"] == ARCHS
    configs = {}
    for k in tr["kernels"]:
        key = (k["kernel"], json.dumps(k["signature"], sort_keys=True), json.dumps(k["constexprs"], sort_keys=True))
        configs.setdefault(k["arch"], set()).add(key)
        assert "shared" in k and k["num_warps"] == 4
    assert sorted(configs) == ARCHS
    assert all(configs[a] == configs[ARCHS[0]] for a in ARCHS), "each target must compile the same configurations"
    assert {c[0] for c in configs[ARCHS[0]]} == {"_weights_kernel", "_mix_fwd_kernel", "_mix_bwd_kernel",
                                                  "_softmax_bwd_kernel", "_l2_kernel"}


def test_triton_gpu_plans_use_a_fixed_set_of_blocks():
    """On a GPU the launchers' constexpr block sizes do not depend on the shape (only BLOCK_G on
    G), so the configurations the check compiles are all there are; the grids stay within CUDA's
    limits up to N = 2^24 rows, SDXL-sized rows and 170 SMs."""
    tgm = pytest.importorskip("ap_erase_fast.ops.triton_gumbel_mix", exc_type=ImportError)
    t = tgm.GPU_TUNING
    for N, D, programs in itertools.product((1, 7, 1031, 50_000, 2**24 - 1), (1, 13, 77 * 768, 77 * 2048),
                                            (1, 328, 528, 4 * 170)):
        assert tgm.plan_weights(N, t) == t.weights_block
        for G in range(1, t.max_g + 1):
            bg = 1 << (G - 1).bit_length()
            f = tgm.plan_mix_forward(N, D, G, programs, t)
            assert (f.block_g, f.block_n, f.block_d) == (bg, t.fwd_block_n // bg, t.fwd_block_d)
            for need_table in (False, True):
                b = tgm.plan_mix_backward(N, D, G, need_table, programs, t)
                assert (b.block_g, b.block_n, b.block_d) == (bg, t.bwd_block_n // bg, t.bwd_block_d)
                assert b.split >= 1 and (b.split == 1 or not need_table)
            assert f.split * f.span >= N and f.grid[0] * f.block_d >= D
            # CUDA grid limits: x < 2^31, y <= 65535
            assert max(f.grid[0], b.grid[0]) < 2**31 and max(f.grid[1], b.grid[1]) <= 65535
        l2 = tgm.plan_l2(N, D, programs, t)
        assert (l2.block_n, l2.block_d) == (t.l2_block_n, t.l2_block_d)


def test_triton_configs_cover_every_launcher_choice(report):
    """Every (kernel, table dtype, output dtype, flags, blocks) the GPU launchers can pick was
    compiled, for every target; expectations come from the launchers' plan functions."""
    tgm = pytest.importorskip("ap_erase_fast.ops.triton_gumbel_mix", exc_type=ImportError)
    tr = _part(report, "triton")
    t = tgm.GPU_TUNING
    block_gs = sorted({1 << (G - 1).bit_length() for G in range(1, t.max_g + 1)})
    for cc in ARCHS:
        ks = [k for k in tr["kernels"] if k["arch"] == cc]

        def got(name, *fields, ks=ks):
            return {tuple(k["constexprs"][f] if f in k["constexprs"] else k["signature"][f] for f in fields)
                    for k in ks if k["kernel"] == name}

        fwd = {(f"*{dt}", out, bg, t.fwd_block_n // bg, t.fwd_block_d)
               for dt in DTYPES for out in {f"*{dt}", "*fp32"} for bg in block_gs}
        assert got("_mix_fwd_kernel", "T", "OUT", "BLOCK_G", "BLOCK_N", "BLOCK_D") == fwd
        bwd = {(f"*{dt}", need[0], need[1], bg, t.bwd_block_n // bg, t.bwd_block_d)
               for dt in DTYPES for need in ((True, False), (False, True), (True, True)) for bg in block_gs}
        assert got("_mix_bwd_kernel", "T", "NEED_GW", "NEED_DT", "BLOCK_G", "BLOCK_N", "BLOCK_D") == bwd
        weights = {(a, b, t.weights_block) for a in (False, True) for b in (False, True)}
        assert got("_weights_kernel", "HAS_GUMBEL", "USE_TOPK", "BLOCK_N") == weights
        assert {s for (s,) in got("_weights_kernel", "seed")} >= {"i32", "i64"}
        assert got("_softmax_bwd_kernel", "BLOCK_N") == {(t.weights_block,)}
        assert got("_l2_kernel", "T", "BLOCK_N", "BLOCK_D") == {(f"*{dt}", t.l2_block_n, t.l2_block_d)
                                                                for dt in DTYPES}


def test_triton_noise_uses_the_accurate_log(report):
    """The in-kernel Gumbel noise compiles to libdevice's accurate logf, not lg2.approx."""
    tr = _part(report, "triton")
    noise = [k for k in tr["kernels"] if k["kernel"] == "_weights_kernel" and not k["constexprs"]["HAS_GUMBEL"]]
    assert sorted({k["arch"] for k in noise}) == ARCHS
    assert not any(k["lg2_approx"] for k in noise)


def test_triton_kernels_fit_shared_memory_and_registers(report):
    tr = _part(report, "triton")
    for k in tr["kernels"]:
        assert k["shared"] <= {80: 166912, 86: 101376, 89: 101376, 90: 232448}[k["arch"]]
    if tr["not_checked"]:  # no cuobjdump: said so, not passed
        pytest.skip("; ".join(tr["not_checked"]))
    for k in tr["kernels"]:  # measured with the cuobjdump shipped with Triton
        assert k["resources"] == "checked", k
        assert k["registers"] * 32 * k["num_warps"] <= 65536 and k["local"] == 0 and k["stack"] == 0


# --------------------------------------------------------------------------------------- CUDA
def test_cuda_library_compiles_for_every_target(report):
    cu = _part(report, "cuda")
    assert cu["errors"] == [], "\n".join(cu["errors"])
    assert cu["archs"] == ARCHS
    assert cu["device_compile"]["returncode"] == 0 and cu["host_compile"]["returncode"] == 0
    if cu["kernels"]:  # per-instantiation resources (cuobjdump found)
        for a in ARCHS:
            names = {k["kernel"] for k in cu["kernels"] if k["arch"] == f"sm_{a}"}
            assert names == {"weights_kernel", "mix_forward_kernel", "mix_backward_kernel", "table_grad_kernel",
                             "softmax_backward_kernel", "l2_kernel"}


def test_cuda_noise_has_no_approximate_log(report):
    cu = _part(report, "cuda")
    assert cu["ptx_lg2_approx"] == {str(a): False for a in ARCHS}


def test_cuda_weights_kernel_fits_1024_threads(report):
    """The weights and softmax-backward blocks have 1024 threads: at most 64 registers each."""
    cu = _part(report, "cuda")
    if cu["not_checked"]:  # no cuobjdump: said so, not passed
        pytest.skip("; ".join(cu["not_checked"]))
    assert cu["kernels"]
    for k in cu["kernels"]:
        assert k["resources"] == "checked", k
        if k["kernel"] in ("weights_kernel", "softmax_backward_kernel"):
            assert k["registers"] <= 64, k
        assert k["local"] == 0 and k["stack"] == 0, k


# ---------------------------------------------------------------------- without cuobjdump
def _no_cuobjdump(monkeypatch):
    from ap_erase_fast.ops import gpu_build_check

    monkeypatch.setattr(gpu_build_check, "_cuobjdump", lambda *a, **k: None)
    return gpu_build_check


class _Done:
    """A finished compiler process: exit 0, no output."""
    returncode = 0

    def communicate(self):
        return "", None


def _cuda_job(tmp_path, archs=(80, 90)):
    """What start_cuda returns once nvcc has written its PTX (kept files) and the object."""
    import tempfile
    import time

    tmp = tempfile.TemporaryDirectory(dir=tmp_path)
    for a in archs:
        with open(os.path.join(tmp.name, f"gumbel_mix_cuda_kernels.compute_{a}.ptx"), "w") as f:
            f.write(".visible .entry _Z14weights_kernelPf(\n")
    return {"archs": archs, "start": time.perf_counter(), "tmp": tmp, "nvcc": "nvcc (stand-in)",
            "sources": ("gumbel_mix_cuda_kernels.cu", "gumbel_mix_cuda.cpp"),
            "device": _Done(), "host": _Done()}


def test_cuda_without_cuobjdump_reports_registers_and_spills_not_checked(monkeypatch, tmp_path, capsys):
    """No cuobjdump: the CUDA part says its register, spill and kernel-list checks were not
    checked (report and printed output), with no kernel row that could read as passed. Mutation
    checked: the old report (a ``notes`` field, nothing printed) fails."""
    g = _no_cuobjdump(monkeypatch)
    cu = g.finish_cuda(_cuda_job(tmp_path))
    assert cu["errors"] == [] and cu["kernels"] == []
    assert len(cu["not_checked"]) == 1
    assert "sm_80, sm_90: not checked (no cuobjdump: install the CUDA toolkit" in cu["not_checked"][0]

    monkeypatch.setattr(g, "start_cuda", lambda archs: _cuda_job(tmp_path, archs))
    assert g.main(["--cuda", "--arch", "80,90", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "0 problems, 1 NOT CHECKED" in out
    assert "NOT CHECKED: registers, spills and the compiled kernel list of sm_80, sm_90: not checked (no " \
           "cuobjdump" in out
    assert json.loads((tmp_path / "r.json").read_text())["cuda"]["not_checked"] == cu["not_checked"]


def test_cuda_rows_without_resource_usage_are_not_passed(monkeypatch, tmp_path):
    """A kernel row cuobjdump printed no resource usage for is "not checked", never passed; the
    rows it measured are checked (here: one over the 64-register limit of a 1024-thread block).
    Mutation checked: rows without registers counted as 0 registers (the old check) fails."""
    from ap_erase_fast.ops import gpu_build_check as g

    rows = [{"kernel": k, "mangled": k, "arch": "sm_90", "registers": 32, "stack": 0, "smem": 0, "local": 0}
            for k in g.CUDA_KERNELS]
    rows[0] = {"kernel": "weights_kernel", "mangled": "w", "arch": "sm_90"}  # no REG line
    rows.append({"kernel": "softmax_backward_kernel", "mangled": "s", "arch": "sm_90", "registers": 80,
                 "stack": 0, "smem": 0, "local": 0})
    monkeypatch.setattr(g, "_resources", lambda obj: [dict(r) for r in rows])
    cu = g.finish_cuda(_cuda_job(tmp_path, archs=(90,)))
    by_name = {r["mangled"]: r for r in cu["kernels"]}
    assert by_name["w"]["resources"].startswith("not checked")
    assert by_name["s"]["resources"] == "checked"
    assert cu["not_checked"] == ["sm_90 weights_kernel: registers and spills not checked (cuobjdump printed "
                                 "no resource usage)"]
    assert any("softmax_backward_kernel: 80 registers > 64" in e for e in cu["errors"])


def test_triton_without_cuobjdump_reports_registers_and_spills_not_checked(tmp_path):
    """No cuobjdump: every compiled Triton kernel says "not checked" for registers and spills
    (no register count in its row), the part lists it under not_checked and the printed report
    says NOT CHECKED. Three of the recorded launches, one target, in a subprocess (the compiler
    must not see TRITON_INTERPRET). Mutation checked: the old check (Triton's own cuobjdump
    looked up directly, a missing one leaving the row silently without registers) fails."""
    pytest.importorskip("triton")
    script = (
        "import sys\n"
        "from ap_erase_fast.ops import gpu_build_check as g\n"
        "g._cuobjdump = lambda *a, **k: None\n"
        "record = g.record_triton_launches\n"
        "g.record_triton_launches = lambda cc: record(cc)[:3]\n"
        "sys.exit(g.main(sys.argv[1:]))\n")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(REPO, ".cache", "gpu_build", "triton")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", script, "--triton", "--arch", "90", "--workers", "1",
                          "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    tr = json.loads(out.read_text())["triton"]
    assert len(tr["kernels"]) == 3 and tr["errors"] == []
    for k in tr["kernels"]:
        assert k["resources"].startswith("not checked (no cuobjdump"), k
        assert "registers" not in k and "local" not in k
    assert tr["not_checked"] == ["registers and spills of 3 of 3 compilations: not checked (no cuobjdump: "
                                 "install the CUDA toolkit and set CUDA_HOME, or a Triton that ships its "
                                 "NVIDIA tools)"]
    assert "0 problems, 1 NOT CHECKED" in run.stdout
    assert "NOT CHECKED: registers and spills of 3 of 3 compilations" in run.stdout
