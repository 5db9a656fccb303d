"""The ShapesWorld 2 attack table: does AP's adversarial preservation make an erasure harder to
undo than ESD's?

For every (target, seed) cell and method (ESD, the random control, AP faithful, AP with the score
estimator, the oracle), the erasure is trained again with the quality benchmark's settings
(``quality.runs``: COMMON, METHODS, lr and batch size of the committed rows) for the step budget
at which the committed quality curve of that method, target and seed first reached ``LEVEL`` ESR
(matched erasure: every method is attacked where it erases the plain prompt about as well), then
attacked with ``ap-erase attack`` (the white-box prefix attack with the attacker's judged checks,
concept inversion, the rephrasings) at one fixed budget, on the same attack seed for every
method of a cell. One JSON row per attacked run; the report pairs each method with ESD (and AP
with the random control) on the same cells.

The analysis rule, fixed before the table was run: the primary comparison is AP faithful − ESD
on the prompt attack's ASR (fresh seeds); every paired comparison of the table (4 against ESD and
AP faithful − random control, for each of the three attacks and for the unattacked erased rate)
gets the two-sided exact sign test over cells (ties left out) and the t-interval of the mean
difference, with Holm's adjustment over all of them. "Harder to undo" is claimed only where the
Holm-adjusted p is below 0.05 and the interval is below 0 (a lower ASR); otherwise the table
says "not shown".

    python -m ap_erase_fast.attack.table run --targets circle,ring --seeds 0 --shard 0/2
    python -m ap_erase_fast.attack.table report
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METHODS = ("esd", "preserve_random", "ap_faithful", "ap_score", "oracle")
ATTACKS = ("prompt", "inversion", "rephrase")
LEVEL = 0.8  # the ESR the committed curve must reach (the quality table's first matched level)
MODEL = "shapes2"
# One budget for every attacked run (docs/attack.md measured these settings on one ESD run).
ATTACK = dict(attacks=list(ATTACKS), images=32, steps=10, attack_steps=100, restarts=2, judge_every=10,
              judge_images=8, stop_rate=0.7, rephrasings=14, rephrase_images=8)
COMPARISONS = [(m, "esd") for m in METHODS[1:]] + [("ap_faithful", "preserve_random")]
MEASURES = ("erased",) + ATTACKS  # what is compared: the unattacked rate and each attack's ASR
CURVES = "benchmarks/results/quality_shapes2_cpu.jsonl"
NEAR = "benchmarks/results/quality_shapes2_cpu_near.json"


def _log(msg: str) -> None:
    print(f"[attack-table {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- which runs ----------------------------------------------------------------------------------
def matched_steps(curves: list[dict], target: str, seed: int, method: str, level: float = LEVEL) -> dict | None:
    """The committed row of ``method`` on (target, seed) at the smallest step budget whose ESR
    reached ``level`` (the main learning rate, no ablation); None if the curve never did."""
    own = sorted((r for r in curves if r["method"] == method and r["target"] == target and r["seed"] == seed
                  and not r.get("ablation") and r["lr"] == 1e-3), key=lambda r: r["steps"])
    return next((r for r in own if r["esr"] >= level), None)


def cells(targets: list[str], seeds: list[int]) -> list[tuple[str, int, str]]:
    """Every (target, seed, method), the methods of one cell next to each other."""
    return [(t, s, m) for t in targets for s in seeds for m in METHODS]


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(row: dict, near: dict, folder: Path) -> None:
    """Train the erasure of a committed quality row again (same settings, ``row['steps']`` steps)."""
    from ..api import erase
    from ..config import EraseConfig
    from ..quality.runs import COMMON
    from ..quality.runs import METHODS as QUALITY_METHODS
    from ..quality.worlds import oracle_set

    extra = dict(QUALITY_METHODS[row["method"]])
    if row["method"] == "oracle":
        extra["preserve_set"] = oracle_set(MODEL, row["target"], near[row["target"]]["near"])
    erase(EraseConfig(**{**COMMON, "model": MODEL, "erase": [row["target"]], "steps": row["steps"],
                         "lr": row["lr"], "batch_size": row["batch_size"], "seed": row["seed"],
                         "loss_space": row["loss_space"], "search_lr": row["search_lr"],
                         "preserve_weight": row["preserve_weight"], "train_method": row["train_method"],
                         "lora_rank": row["lora_rank"], **extra, "output": str(folder), "overwrite": True}))


def attack_row(target: str, seed: int, method: str, matched: dict, folder: Path) -> dict:
    """Attack the run in ``folder``; the table's row."""
    from . import AttackConfig, attack

    t0 = time.perf_counter()
    rep = attack(AttackConfig(run=str(folder), output=str(folder / "attack"), overwrite=True, seed=seed,
                              device="cpu", quiet=True, **ATTACK))
    rates = {"base": rep["rates"]["base"], "erased": rep["rates"]["erased"]}
    for name in ATTACKS:
        a = rep["attacks"][name]
        rates[name] = a["rate"] if name != "rephrase" else a["rate"]["erased"]
    prompt = rep["attacks"]["prompt"]
    return {"model": MODEL, "target": target, "seed": seed, "method": method, "steps": matched["steps"],
            "curve_esr": matched["esr"], "curve_psr": matched["psr"], "level": LEVEL, "attack": ATTACK,
            "rates": {k: {"hits": v["hits"], "images": v["images"], "rate": v["rate"]} for k, v in rates.items()},
            "prompt_found": prompt["prompt"], "inversion_word": rep["attacks"]["inversion"].get("nearest_candidate"),
            "unet_evals": {n: rep["attacks"][n].get("cost", {}).get("unet_evals") for n in ATTACKS},
            "selected_rate": prompt["selection"]["selected_rate"]["rate"]
            if prompt["selection"].get("selected_rate") else None,
            "attack_s": round(time.perf_counter() - t0, 1)}


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    curves = _read_rows(Path(args.curves))
    near = json.loads(Path(args.near).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, of = args.shard
    path = out / f"attack_{args.tag}.shard{shard}.jsonl"
    done = {(r["target"], r["seed"], r["method"]) for p in out.glob(f"attack_{args.tag}*.jsonl")
            for r in _read_rows(p)}
    todo = [c for i, c in enumerate(cells(args.targets, args.seeds)) if i % of == shard and c not in done]
    _log(f"shard {shard}/{of}: {len(todo)} runs to attack")
    for target, seed, method in todo:
        matched = matched_steps(curves, target, seed, method)
        if matched is None:
            row = {"model": MODEL, "target": target, "seed": seed, "method": method, "steps": None,
                   "level": LEVEL, "skipped": f"the committed curve never reached ESR {LEVEL}"}
        else:
            folder = out / ".attack_runs" / f"{target}-s{seed}-{method}"
            t0 = time.perf_counter()
            train(matched, near, folder)
            row = attack_row(target, seed, method, matched, folder)
            row["train_s"] = round(time.perf_counter() - t0 - row["attack_s"], 1)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _log(f"{target} seed {seed} {method}: " + (row.get("skipped") or " ".join(
            f"{k} {v['hits']}/{v['images']}" for k, v in row["rates"].items())))
    return 0


# -- the report ----------------------------------------------------------------------------------
def paired(rows: list[dict], method: str, against: str, measure: str) -> dict:
    """Differences ``method`` − ``against`` of one measure's rate over the cells both have."""
    from ..quality.statistics import sign_test, t_interval

    by = {(r["target"], r["seed"], r["method"]): r["rates"][measure]["rate"] for r in rows if "rates" in r}
    diffs = [by[(t, s, method)] - by[(t, s, against)] for (t, s, m) in by
             if m == method and (t, s, against) in by]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"method": method, "against": against, "measure": measure, "n": len(diffs), "higher": wins,
            "lower": losses, "ties": len(diffs) - wins - losses, "p": sign_test(wins, losses),
            "interval": t_interval(diffs)}


def verdict(d: dict) -> str:
    iv = d["interval"]
    if d.get("p_holm", 1.0) < 0.05 and iv is not None and iv[2] < 0:
        return "harder to undo" if d["measure"] != "erased" else "erases less"
    if d.get("p_holm", 1.0) < 0.05 and iv is not None and iv[1] > 0:
        return "easier to undo" if d["measure"] != "erased" else "erases more"
    return "not shown"


def comparisons(rows: list[dict]) -> list[dict]:
    from ..quality.statistics import holm

    out = [paired(rows, m, a, meas) for meas in MEASURES for m, a in COMPARISONS]
    for d, p in zip(out, holm([d["p"] for d in out])):
        d["p_holm"] = p
        d["verdict"] = verdict(d)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def complete_cells(done: list[dict]) -> set[tuple[str, int]]:
    """The (target, seed) cells with an attacked run of every method."""
    have = {(r["target"], r["seed"], r["method"]) for r in done}
    return {(t, s) for t, s, _ in have if all((t, s, m) in have for m in METHODS)}


def report_lines(rows: list[dict], env: dict) -> list[str]:
    done = [r for r in rows if "rates" in r]
    cells_done = sorted({(r["target"], r["seed"]) for r in done})
    lines = ["# ShapesWorld 2: attack success rates at matched erasure", "",
             "Regenerate: `bash benchmarks/attack_shapes2.sh` (runs, resumable) then "
             "`python -m ap_erase_fast.attack.table report`.", "",
             *(f"* {k}: {v}" for k, v in env.items()), "",
             f"Each method's erasure is trained again for the step budget at which its committed quality curve "
             f"(`{CURVES}`) first reached ESR ≥ {LEVEL:.0%} on the target and seed (learning rate 1e-3), then "
             f"attacked with `ap-erase attack` ({', '.join(f'{k}={v}' for k, v in ATTACK.items() if k != 'attacks')}; "
             "the attack seed = the cell's seed). Rates are shares of the judged images that the ShapesWorld 2 "
             "classifier labels as the erased shape: `erased` = the erased model on the plain prompt "
             f"(seeds 0…{ATTACK['images'] - 1}), `prompt` / `inversion` = the attacked prompts on the same seeds "
             "(selection on other seeds), `rephrase` = the erased model on the pooled rephrasings.", "",
             f"Cells attacked: {len(cells_done)} ({', '.join(f'{t}/{s}' for t, s in cells_done)}); "
             f"runs: {len(done)}; skipped (curve never reached the level): "
             f"{sum('skipped' in r for r in rows)}.", "",
             "## Mean rates per method (%)", "",
             f"Over the {len(complete_cells(done))} cells every method ran in (runs of cells still being attacked "
             "are left out, so that every row of this table averages the same targets).", "",
             "| method | runs | steps (mean) | base | erased | prompt attack | inversion | rephrasings | UNet evals / prompt attack |",
             "|---|---|---|---|---|---|---|---|---|"]
    complete = complete_cells(done)
    for m in METHODS:
        own = [r for r in done if r["method"] == m and (r["target"], r["seed"]) in complete]
        if not own:
            continue

        def mean(k, own=own):
            return f"{100 * statistics.fmean(r['rates'][k]['rate'] for r in own):.1f}"
        evals = statistics.fmean(r["unet_evals"]["prompt"] or 0 for r in own)
        lines.append(f"| {m} | {len(own)} | {statistics.fmean(r['steps'] for r in own):.1f} | {mean('base')} | "
                     f"{mean('erased')} | {mean('prompt')} | {mean('inversion')} | {mean('rephrase')} | {evals:.0f} |")
    lines += ["", "## Paired differences (percentage points; cells where both methods ran)", "",
              "Sign test: two-sided exact, ties left out; Holm over all "
              f"{len(COMPARISONS) * len(MEASURES)} comparisons of this table. Interval: t, 95 %. "
              "A negative difference on an attack = a lower attack success rate = harder to undo.", "",
              "| measure | method − against | n | mean [95 % CI] | higher / lower / ties | p | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for d in comparisons(done):
        iv = d["interval"]
        ci = f"{_pct(iv[0])} [{_pct(iv[1])}, {_pct(iv[2])}]" if iv else "–"
        lines.append(f"| {d['measure']} | {d['method']} − {d['against']} | {d['n']} | {ci} | "
                     f"{d['higher']} / {d['lower']} / {d['ties']} | {d['p']:.3g} | {d['p_holm']:.3g} | {d['verdict']} |")
    lines += ["", "## Per run", "", "| target | seed | method | steps | erased | prompt | inversion | rephrase | prompt found |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(done, key=lambda r: (r["target"], r["seed"], METHODS.index(r["method"]))):
        rt = r["rates"]
        lines.append(f"| {r['target']} | {r['seed']} | {r['method']} | {r['steps']} | "
                     + " | ".join(f"{rt[k]['hits']}/{rt[k]['images']}" for k in MEASURES)
                     + f" | `{r['prompt_found']}` |")
    return lines


def report(args) -> int:
    from ..quality.report import _environment

    out = Path(args.out)
    rows = [r for p in sorted(out.glob(f"attack_{args.tag}.shard*.jsonl")) for r in _read_rows(p)]
    merged = out / f"attack_{args.tag}.jsonl"
    if rows:  # the shards' rows are collected into one committed file
        merged.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = _read_rows(merged)
    if not rows:
        print(f"error: no attack rows under {out} (tag {args.tag}); run the table first", file=sys.stderr)
        return 2
    env = args.env or _environment("bash benchmarks/attack_shapes2.sh")
    (out / f"attack_{args.tag}.md").write_text("\n".join(report_lines(rows, env)) + "\n")
    for p in out.glob(f"attack_{args.tag}.shard*.jsonl"):
        p.unlink()
    _log(f"wrote {out / f'attack_{args.tag}.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ap_erase_fast.attack.table", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and attack the table's runs (resumable)")
    r.add_argument("--targets", type=lambda s: s.split(","), required=True)
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    r.add_argument("--shard", type=lambda s: tuple(int(x) for x in s.split("/")), default=(0, 1))
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--curves", default=CURVES)
    r.add_argument("--near", default=NEAR)
    for q in (r, sub.add_parser("report", help="collect the rows and write the markdown report")):
        q.add_argument("--out", default="benchmarks/results")
        q.add_argument("--tag", default="shapes2_cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    args.env = None
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
