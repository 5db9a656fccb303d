"""One table over the ablations of AP's search (``benchmarks/quality_shapes2_ablations.sh``).

Each ablation is a results tag of ``ap-erase bench quality`` (``quality_<prefix><name>.jsonl``
in ``--out``) holding one AP method with one search setting changed, next to the controls it
borrowed from the main table (or re-ran, where the setting changes them: λ). Per setting, on its
own (target, seed) curves and near sets: the AP method − the random control and − the oracle in
PSR-near at matched erasure (paired, as the main report), PSR-near after the full step budget, and
where π went. The first rows are the main table's AP methods with the default settings, on the
same targets and seeds, so that every setting reads against them.

    ap-erase bench ablations --out benchmarks/results --main-tag shapes2_cpu

A study built on the instrument's layers (:mod:`.metrics`, :mod:`.statistics`, :mod:`.report`):
it runs nothing, it reads the finished tables.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import _names
from .metrics import add_near_far, near_sets, search_stats
from .report import _environment, _mean, _paired_cell, _pct
from .statistics import MATCHED_ESR, paired_difference

# the settings an ablation may change besides the search flags (runs.ABLATIONS), by row key
KNOBS = {"search_lr": "π lr", "preserve_weight": "λ"}


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def describe(ap_rows: list[dict], defaults: dict) -> str:
    """What a setting changed: its ablation flags and the knobs that differ from ``defaults``."""
    r = ap_rows[0]
    parts = [f"{k} {v}" for k, v in sorted((r.get("ablation") or {}).items())]
    parts += [f"{name} {r[k]:g}" for k, name in KNOBS.items() if k in defaults and r.get(k) != defaults[k]]
    return ", ".join(parts) or "defaults"


def setting_row(name: str, rows: list[dict], method: str, steps: int, lr: float, model: str,
                targets: list[str], seeds: list[int]) -> list[str]:
    """The table's cells for ``method`` among ``rows`` (one setting's runs, controls included)."""
    rows = [dict(r) for r in rows if r["target"] in targets and r["seed"] in seeds]
    sets = near_sets(rows, targets, lr, model, steps=steps)
    add_near_far(rows, sets)
    cells = [name, method]
    for control in ("preserve_random", "oracle"):
        for level in MATCHED_ESR:
            d = paired_difference(rows, method, control, targets, seeds, level, "psr_near")
            cells.append(_paired_cell(d))
    final = {m: [r["psr_near"] for r in rows if r["method"] == m and r["lr"] == lr and r["steps"] == steps
                 and "psr_near" in r] for m in (method, "preserve_random")}
    cells.append(" / ".join(_pct(final[m]) for m in final))
    st = search_stats([r for r in rows if r["method"] == method and r["lr"] == lr and r["steps"] == steps],
                              sets) or {"draws": [], "mass": [], "top": [], "peak": [], "share": [], "gap": []}
    cells += [_pct(st["draws"]), _pct(st["mass"]), _pct(st["top"]), _mean(st["peak"], 1),
              _mean(st["gap"], 2), _pct(st["share"])]
    return cells


def summary_lines(main_rows: list[dict], settings: list[tuple[str, list[dict]]], model: str = "shapes2") -> list[str]:
    """The markdown table: the main table's AP methods at the defaults, then every setting (name,
    its rows), each on the targets and seeds of the settings' AP runs."""
    ap_runs = [r for _, rows in settings for r in rows if r["method"].startswith("ap_")]
    if not ap_runs:
        return []
    targets = list(dict.fromkeys(r["target"] for r in ap_runs))
    seeds = sorted({r["seed"] for r in ap_runs})
    steps = max(r["steps"] for r in ap_runs)
    lr = ap_runs[0]["lr"]
    main_ap = [r for r in main_rows if r["method"].startswith("ap_")]
    defaults = {k: main_ap[0][k] for k in KNOBS if main_ap and k in main_ap[0]}
    head = ["setting", "AP method"]
    head += [f"− {c} PSR-near @ ESR {100 * lv:.0f} %" for c in ("random", "oracle") for lv in MATCHED_ESR]
    head += [f"PSR-near after {steps} steps: AP / random", "draws naming a near concept", "π mass on the near set", "π's top 5 naming a near concept",
             "π's peak ÷ uniform", "π₁ − π₅", "near set's share of R"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    used = list(dict.fromkeys(r["method"] for r in ap_runs))
    for method in used:
        if any(r["method"] == method for r in main_rows):
            lines.append("| " + " | ".join(setting_row("defaults (main table)", main_rows, method, steps, lr, model,
                                                         targets, seeds)) + " |")
    for name, rows in settings:
        aps = [r for r in rows if r["method"].startswith("ap_")]
        if not aps:
            continue
        method = aps[0]["method"]
        label = f"{name} ({describe(aps, defaults)})"
        lines.append("| " + " | ".join(setting_row(label, rows, method, steps, lr, model, targets, seeds)) + " |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ap-erase bench ablations",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="the folder of the results files")
    ap.add_argument("--main-tag", default="shapes2_cpu", help="the main table's tag (its AP rows at the defaults)")
    ap.add_argument("--prefix", default="shapes2_abl_", help="the ablations' tags: <prefix><setting name>")
    ap.add_argument("--names", default=None,
                    help="comma-separated setting names in table order (default: every tag with the prefix)")
    ap.add_argument("--model", default="shapes2")
    ap.add_argument("--report", default="quality_shapes2_ablations.md",
                    help="the markdown file to write, in --out (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    main_file = out / f"quality_{args.main_tag}.jsonl"
    if not main_file.exists():
        raise UserError(f"{main_file} does not exist: run the main table first (benchmarks/quality_shapes2.sh)")
    if args.names:
        names = _names(args.names)
    else:
        stem = f"quality_{args.prefix}"
        names = sorted(p.name[len(stem):-len(".jsonl")] for p in out.glob(f"{stem}*.jsonl") if ".shard" not in p.name)
    files = {n: out / f"quality_{args.prefix}{n}.jsonl" for n in names}
    missing = [n for n, f in files.items() if not f.exists()]
    if missing or not files:
        raise UserError(f"no finished ablation results for {', '.join(missing) or args.prefix + '*'} in {out} "
                        f"(quality_{args.prefix}<name>.jsonl; run benchmarks/quality_shapes2_ablations.sh)")
    settings = [(n, _read(f)) for n, f in files.items()]
    lines = summary_lines(_read(main_file), settings, args.model)
    env = _environment("ap-erase bench ablations " + " ".join(argv))
    report = out / args.report
    text = ["# Ablations of AP's search on ShapesWorld 2", ""]
    text += [f"* {k}: `{v}`" if k == "command" else f"* {k}: {v}" for k, v in env.items() if k != "torch threads"]
    text += ["* each setting: its own results file `quality_<prefix><name>.md` (settings, per-target tables, "
             "curves); the runs on one core each, at the main table's steps, budgets, images and seeds", "",
             "Paired at matched erasure on the same (target, seed) curves as in the main report: percentage "
             "points of PSR-near, mean ± standard error (wins / losses / ties, two-sided sign test's p). The "
             "first rows are the main table's runs with the default search settings (τ 2, π lr 0.1, P 2, "
             "|R| ≤ 60, hard draw, λ 1) on the same targets and seeds. π columns: after the full step "
             "budget, mean over targets and seeds, %: the share of the preservation draws whose candidate names a near "
             "concept (what was actually preserved), then π itself (the near set's share of R is what a uniform "
             "draw gives). "
             "π's mass and peak are those of its draw distribution (softmax(π) for the hard draw, whatever τ), "
             "shown only for runs that recorded it (– for runs recorded before); π₁ − π₅, the logit gap "
             "between π's first and fifth candidate, is exact for every run (τ-free: the first is drawn "
             "exp(π₁ − π₅) times as often as the fifth under the hard draw).", ""]
    text += lines
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text("\n".join(text) + "\n")
    tmp.replace(report)
    print(f"wrote {report}")
    return 0

