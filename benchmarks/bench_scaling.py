#!/usr/bin/env python
"""Data-parallel scaling: outer steps/s, samples/s, efficiency and peak memory per world size.

Runs `deepspeed --num_gpus W train.py --config <ZeRO config> ...` for each W in --world-sizes
(on CPU: W processes over gloo, one thread each) and reads each run's run.json. Writes
scaling_<device>.csv and .md into a new bench-scaling-<date-time> folder under the current one,
or into ``--out DIR`` (the committed report: ``--out benchmarks/results``).

    python benchmarks/bench_scaling.py --world-sizes 1,2                    # CPU, tiny model
    python benchmarks/bench_scaling.py --world-sizes 1,2,4,8 --model /models/sd-v1-4 --steps 20
"""
import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--train-method", default="xattn")
    ap.add_argument("--extra", default="", help="more train.py flags, one string")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None,
                    help="results folder (default: a new bench-scaling-<date-time> folder under "
                         "the current one)")
    args = ap.parse_args()

    import torch

    from ap_erase_fast.bench import _environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "ds.json"
        ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                                  "zero_optimization": {"stage": args.zero}}))
        for w in [int(x) for x in args.world_sizes.split(",")]:
            out = Path(tmp) / f"w{w}"
            cmd = [deepspeed, "--num_gpus", str(w), "--master_port", str(free_port()),
                   str(ROOT / "train.py"), "--config", str(ds), "--model", args.model,
                   "--erase", "garbage truck", "--steps", str(args.steps), "--train-method",
                   args.train_method, "--output", str(out), "--quiet", *args.extra.split()]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            if device == "cpu":
                env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            row = {"world_size": w, "wall_s": round(time.time() - t0, 1)}
            if proc.returncode != 0:
                row["status"] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:150]
            else:
                info = json.loads((out / "run.json").read_text())
                sps = info["outer_steps"] / info["timings"]["train_s"]
                row.update(status="ok", outer_steps_per_s=round(sps, 4),
                           samples_per_s=round(sps * info["global_batch"], 4),
                           global_batch=info["global_batch"],
                           ranks_agree=str(info.get("ranks_agree", "n/a")))
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    base = next((r for r in rows if r["status"] == "ok" and r["world_size"] == 1), None)
    for r in rows:
        r["scaling_efficiency"] = (round(r["samples_per_s"] / (r["world_size"] * base["samples_per_s"]), 3)
                                   if base and r["status"] == "ok" else "nan")
    env = _environment(device)
    env.update(model=args.model, zero=args.zero, train_method=args.train_method, steps=args.steps)
    cols = ["world_size", "status", "outer_steps_per_s", "samples_per_s", "scaling_efficiency",
            "global_batch", "ranks_agree", "wall_s"]
    from ap_erase_fast.bench import new_results_dir

    results = Path(args.out or new_results_dir("scaling"))
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"scaling_{device}{('_' + args.tag) if args.tag else ''}"
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"# {k}: {v}" for k, v in env.items()])
        w.writerow(cols)
        w.writerows([[r.get(c, "") for c in cols] for r in rows])
    lines = [f"# Data-parallel scaling ({device})", ""] + [f"* {k}: {v}" for k, v in env.items()]
    lines += ["", "Steps/s from each run's training time (set-up excluded); samples/s = steps/s × "
              "global batch; efficiency = samples/s ÷ (world size × samples/s at world size 1).",
              "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
