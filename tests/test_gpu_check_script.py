"""benchmarks/gpu_check.sh --cpu-dry-run: the GPU check script itself runs end to end on CPU
(tiny preset, few repetitions), so that a rare GPU session spends its minutes on numbers."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "native-build", "kernel-tests", "engine", "compile-cuda-graphs",
         "xformers", "gumbel-mix-bench", "step-matrix", "cap-22gib", "sdxl-lora-cap-22gib",
         "trajectory-bank", "sdxl-lora-bank-cap-22gib", "flow-lora-cap-22gib"]


def test_gpu_check_cpu_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets what it needs
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = dict(re.findall(r"^([\w-]+): (PASS|FAIL|SKIP) \(\d+ s\)$", proc.stdout, re.M))
    assert proc.returncode == 0, proc.stdout + (tmp_path / "gpu_check.log").read_text()[-3000:]
    assert list(lines) == STEPS
    assert {k for k, v in lines.items() if v == "SKIP"} <= {"compile-cuda-graphs", "xformers"}
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "fast_vs_reference" in summary and "step_tiny_cpu.md" in summary
    for row in ("fast/faithful/xattn+bank", "fast/shared/xattn+bank", "fast/faithful/xattn+lora8+bank"):
        assert f"| {row} | ok | bank |" in summary, row  # the bank rows ran, in both presets
    for row, model, base in (("flux-nf4", "tiny-flux", "nf4"), ("flux-int8", "tiny-flux", "int8"),
                             ("sd35m-bf16", "tiny-sd3", "bf16")):
        # the SD3/FLUX 24 GB rows' plumbing (bench_memory_flow.py --measure) on the tiny models
        assert re.search(rf"^\* {row} \({model}, {base} base, LoRA 16 xattn, gradient checkpointing, "
                         rf"adamw8bit.*outer steps/s on cpu$", summary, re.M), row
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files  # what the GPU machine can send back


def test_a_failing_step_fails_the_run_and_the_rest_still_runs(tmp_path):
    """One step failing (here: the interpreter the environment step runs breaks) makes the
    script exit non-zero; the steps after it run and report; unselected steps are SKIP."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *env_report*) exit 3;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(wrapper))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                           "--only", "environment,native-build"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = dict(re.findall(r"^([\w-]+): (PASS|FAIL|SKIP) \(\d+ s\)$", proc.stdout, re.M))
    assert proc.returncode == 1, proc.stdout
    assert lines["environment"] == "FAIL" and lines["native-build"] == "PASS"
    assert all(lines[s] == "SKIP" for s in STEPS[2:])
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def _run(tmp_path, *args, python=sys.executable, **env_extra):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(python), **env_extra)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = dict(re.findall(r"^([\w-]+): (PASS|FAIL|SKIP) \(\d+ s\)$", proc.stdout, re.M))
    return proc, lines, (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_spent_time_budget_fails_the_steps_it_leaves_out(tmp_path):
    """A step the whole-run budget leaves no time for is FAIL, not SKIP, and the script exits
    non-zero: a run cut short must not read as a success. Mutation checked: the old
    classification (SKIP, exit 0) fails."""
    proc, lines, log = _run(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout
    assert list(lines) == STEPS and set(lines.values()) == {"FAIL"}, lines
    assert "SOME STEPS FAILED" in proc.stdout
    assert log.count("not run: no time left in the 0 s budget") == len(STEPS)
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "* engine: FAIL" in summary


def test_a_pytest_step_that_runs_no_test_fails(tmp_path):
    """A pytest step that collects no test (exit 5; here the engine step's selection made to
    match nothing) or that skips every test it collects (exit 0, "N skipped" only) is FAIL and
    the script exits non-zero; exit 77 (not applicable by design) stays SKIP. Mutations
    checked: exit 5 classified SKIP; an all-skipped pytest run classified SKIP or PASS."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *pytest*) exec {sys.executable} \"$@\" "
                       f"-k no_test_has_this_name;; esac\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    proc, lines, log = _run(tmp_path, "--only", "engine,compile-cuda-graphs", python=wrapper)
    assert proc.returncode == 1, proc.stdout + log[-3000:]
    assert lines["engine"] == "FAIL" and lines["compile-cuda-graphs"] == "SKIP", lines
    assert re.search(r"^\d+ deselected", log, re.M), log[-3000:]
    assert "engine: FAIL, pytest ran no test (exit 5" in log

    skipping = tmp_path / "test_skips.py"
    skipping.write_text("import pytest\n\n\ndef test_a():\n    pytest.skip('no device')\n")
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *pytest*) exec {sys.executable} -m pytest -q "
                       f"-p no:cacheprovider {skipping};; esac\nexec {sys.executable} \"$@\"\n")
    proc, lines, log = _run(tmp_path, "--only", "engine", python=wrapper)
    assert proc.returncode == 1, proc.stdout + log[-3000:]
    assert lines["engine"] == "FAIL", lines
    assert "1 skipped" in log and "engine: FAIL, pytest skipped every test it collected" in log
