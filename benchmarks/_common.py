"""Shared helpers for the benchmark scripts: environment header, timers, bandwidth, output files."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")  # the committed reports (name it to regenerate)


def new_results_dir(kind: str) -> str:
    """Default output folder: a new ``bench-<kind>-<date-time>`` folder under the current one,
    so that no run writes over the committed reports unless ``--out`` names them."""
    base = os.path.join(os.getcwd(), f"bench-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = base, 1
    while os.path.exists(path):
        path, k = f"{base}-{k}", k + 1
    os.makedirs(path)
    return path


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """Machine, versions, commit and date: the header every result file carries."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "cpu": cpu_model(),
        "cpu_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "cuda": str(torch.version.cuda),
    }
    return env


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, device: torch.device, warmup: int = 2, reps: int = 5, max_seconds: float = 20.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA: triton.testing.do_bench when available)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - t_start > max_seconds:
            break
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth (read + write bytes per second), GB/s."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_csv(path: str, rows: list[dict]):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def header_markdown(env: dict) -> str:
    return "\n".join(f"* {k}: {v}" for k, v in env.items())
