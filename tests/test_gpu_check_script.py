"""benchmarks/gpu_check.sh --cpu-dry-run: the GPU check script itself runs end to end on CPU
(tiny preset, few repetitions), so that a rare GPU session spends its minutes on numbers."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "native-build", "kernel-tests", "engine", "compile-cuda-graphs",
         "xformers", "gumbel-mix-bench", "step-matrix", "cap-22gib", "sdxl-lora-cap-22gib"]


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
