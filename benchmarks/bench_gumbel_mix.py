"""Benchmark gumbel_mix: every available backend vs the plain F.gumbel_softmax + matmul.

Grid: N in {100, 1k, 10k, 50k} table rows, E = 77 x 768, G in {1, 4} draws, bf16 and fp32
tables, hard (the engine's setting) and soft modes.  Logits require grad, the table does not
(the AP inner search).  Reported per row: forward, backward (= total - forward) and total
milliseconds, achieved GB/s of the memory-bound passes and their fraction of the device's
measured copy bandwidth, and the speed-up over the baseline.  Writes gumbel_mix_<device>.csv
and .md into a new bench-gumbel_mix-<date-time> folder under the current one, or to the prefix
``--out`` names (the committed report: ``--out benchmarks/results/gumbel_mix_cpu``).

    python benchmarks/bench_gumbel_mix.py                 # CPU: cpp vs reference
    python benchmarks/bench_gumbel_mix.py --device cuda   # GPU: triton, cuda vs reference

Bytes counted: soft forward reads the table once (N*D) and writes G*D; hard forward reads G
rows and writes them; backward reads the table once and grad_out (G*D).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (bench_ms, copy_bandwidth_gbs, environment, header_markdown,  # noqa: E402
                     markdown_table, new_results_dir, write_csv)

import ap_erase_fast.ops as ops  # noqa: E402

E = (77, 768)
BASELINE = "F.gumbel_softmax+matmul"


def naive(logits, table, tau, hard):
    y = F.gumbel_softmax(logits, tau=tau, hard=hard)
    return (y.to(table.dtype) @ table.reshape(table.shape[0], -1)).reshape((logits.shape[0],) + table.shape[1:])


def make_fn(backend, logits, table, tau, hard, seed):
    if backend == BASELINE:
        return lambda: naive(logits, table, tau, hard)
    return lambda: ops.gumbel_mix(logits, table, tau=tau, hard=hard, seed=seed, backend=backend)


def run_case(backend, N, G, dtype, mode, device, table, copy_gbs, reps):
    D = math.prod(E)
    elem = table.element_size()
    hard = mode == "hard"
    logits = torch.zeros(G, N, device=device, requires_grad=True)
    fwd = make_fn(backend, logits, table, 2.0, hard, 1234)
    go = torch.randn((G,) + E, device=device).to(dtype)

    def total():
        out = fwd()
        (g,) = torch.autograd.grad(out, (logits,), go)
        return g

    row = dict(device=device.type, backend=backend, mode=mode, dtype=str(dtype).replace("torch.", ""),
               N=N, G=G, D=D)
    try:
        fwd_ms = bench_ms(fwd, device, reps=reps)
        tot_ms = bench_ms(total, device, reps=reps)
    except Exception as exc:  # a failing baseline is a nan row, not a gap
        row.update(fwd_ms=float("nan"), bwd_ms=float("nan"), total_ms=float("nan"),
                   status=f"failed: {type(exc).__name__}: {str(exc)[:80]}")
        return row
    bwd_ms = tot_ms - fwd_ms if tot_ms > fwd_ms else float("nan")  # nan: below timing noise
    fwd_bytes = (2 * G * D if hard else N * D + G * D) * elem
    bwd_bytes = (N * D + G * D) * elem
    fwd_gbs = fwd_bytes / (fwd_ms * 1e-3) / 1e9
    bwd_gbs = bwd_bytes / (bwd_ms * 1e-3) / 1e9
    row.update(fwd_ms=round(fwd_ms, 3), bwd_ms=round(bwd_ms, 3), total_ms=round(tot_ms, 3),
               fwd_GBps=round(fwd_gbs, 1), bwd_GBps=round(bwd_gbs, 1),
               bwd_pct_copy=round(100 * bwd_gbs / copy_gbs, 1),
               fwd_pct_copy=round(100 * fwd_gbs / copy_gbs, 1) if not hard else "n/a (G rows)",
               status="ok")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10_000, 50_000])
    p.add_argument("--g", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--modes", nargs="+", default=["hard", "soft"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every available backend except triton-on-CPU, plus the baseline")
    p.add_argument("--max-table-gb", type=float, default=None,
                   help="skip tables larger than this (default: 4 on CPU, 60%% of GPU memory on CUDA)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None,
                   help="output prefix (default: gumbel_mix_<device> in a new bench-gumbel_mix-"
                        "<date-time> folder under the current one; --out "
                        "benchmarks/results/gumbel_mix_cpu regenerates the committed report)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.backends is None:
        backends = [b for b in ops.available_backends(device) if not (b == "triton" and device.type == "cpu")]
        if device.type == "cpu":
            os.environ.setdefault("AP_ERASE_JIT", "1")
            backends = [b for b in ops.available_backends(device) if b != "triton"]
        backends = [BASELINE] + backends
    else:
        backends = args.backends
    if args.max_table_gb is None:
        args.max_table_gb = (0.6 * torch.cuda.get_device_properties(device).total_memory / 1e9
                             if device.type == "cuda" else 4.0)
    env = environment(device)
    copy_gbs = copy_bandwidth_gbs(device)
    env["copy_bandwidth_GBps"] = f"{copy_gbs:.1f}"
    env["backends"] = ", ".join(backends)
    print(header_markdown(env), flush=True)

    rows = []
    gen = torch.Generator().manual_seed(0)
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        for N in args.n:
            gb = N * math.prod(E) * torch.tensor([], dtype=dtype).element_size() / 1e9
            if gb > args.max_table_gb:
                for G in args.g:
                    for mode in args.modes:
                        rows.append(dict(device=device.type, backend="all", mode=mode, dtype=dt_name, N=N, G=G,
                                         D=math.prod(E), status=f"skipped: table {gb:.1f} GB > --max-table-gb"))
                continue
            table = torch.randn((N,) + E, generator=gen).to(dtype).to(device)
            for G in args.g:
                for mode in args.modes:
                    base = None
                    for backend in backends:
                        row = run_case(backend, N, G, dtype, mode, device, table, copy_gbs, args.reps)
                        if backend == BASELINE:
                            base = row.get("total_ms")
                        if base and row.get("total_ms") and row["status"] == "ok":
                            row["speedup_total"] = round(base / row["total_ms"], 2)
                        rows.append(row)
                        print({k: row.get(k) for k in ("backend", "mode", "dtype", "N", "G", "fwd_ms", "bwd_ms",
                                                       "total_ms", "bwd_GBps", "speedup_total", "status")},
                              flush=True)
            del table

    cols = ["backend", "mode", "dtype", "N", "G", "fwd_ms", "bwd_ms", "total_ms", "fwd_GBps", "bwd_GBps",
            "fwd_pct_copy", "bwd_pct_copy", "speedup_total", "status"]
    for r in rows:
        for c in cols + ["device", "D"]:
            r.setdefault(c, "")
    prefix = args.out or os.path.join(new_results_dir("gumbel_mix"), f"gumbel_mix_{device.type}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    write_csv(prefix + ".csv", [{**{k: r[k] for k in ["device", "D"] + cols}, **{"commit": env["commit"]}}
                                for r in rows])
    md = [f"# gumbel_mix benchmark ({device.type})", "", header_markdown(env), "",
          f"E = {E}; logits require grad, the table does not; tau = 2; backward = total - forward; "
          f"speed-up = baseline total / backend total (baseline = {BASELINE}).", "",
          markdown_table(rows, cols), ""]
    if device.type != "cuda":
        md += ["GPU: not measured on GPU yet (run `python benchmarks/bench_gumbel_mix.py --device cuda`).", ""]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(md))
    print(f"wrote {prefix}.csv and {prefix}.md")


if __name__ == "__main__":
    main()
