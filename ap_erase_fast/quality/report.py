"""The report of a quality table: the results CSV, the summary and per-target tables, the
matched-erasure, paired and confirmation sections, the search's course and the near sets, written
as ``quality_<tag>.md`` (the plots it shows: :mod:`.plots`)."""
from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .metrics import (
    PI_MEASURE,
    _is_main,
    _near_share,
    add_near_far,
    near_sets,
    search_stats,
)
from .plots import _plot_near_far, _plot_sweep, _save_grid
from .runs import COMMON, TRAJECTORY_METHODS, _ablation, budgets_below
from .statistics import (MATCHED_ESR, _point, esr_after, holm, matched_erasure, paired_difference,
                         steps_to_esr, t_interval)

# Non-inferiority margins of the trajectory-source comparison, fixed before its run
# (benchmarks/quality_shapes2_trajectories.sh): the lower end of the 95 % interval of
# source − student must be at least these many points.
PSR_NEAR_MARGIN = -2.0
ESR_MARGIN = -5.0
from .worlds import EVAL_GUIDANCE, world_of


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _environment(command: str) -> dict:
    from ..runtime import environment as bench_env

    env = bench_env("cpu")
    env["torch threads"] = str(torch.get_num_threads())
    env["command"] = command
    return env


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def _paired_cell(d: dict, adjusted: float | None = None) -> str:
    """``mean ± se (wins/losses/ties, p P)``; with ``adjusted``, also the Holm-adjusted p."""
    if not d["n"]:
        return "–"
    se = f" ± {100 * d['se']:.1f}" if d["se"] is not None else ""
    mean = 100 * d["mean"] if abs(d["mean"]) >= 5e-4 else 0.0  # no "-0.0"
    holm_p = f"; Holm {adjusted:.2g}" if adjusted is not None else ""
    return f"{mean:+.1f}{se} ({d['wins']}/{d['losses']}/{d['ties']}, p {d['p']:.2g}{holm_p})"


def summarize(rows: list[dict], methods: list[str], targets: list[str], seeds: list[int], lr: float,
              model: str = "shapes", steps: int | None = None):
    """Per method: ESR and PSR (and PSR-near / PSR-far where the rows have them) averaged over
    targets for each seed, then mean ± std over seeds, at learning rate ``lr`` (and, when given,
    ``steps`` outer steps)."""
    w = world_of(model)
    captions = set(w.all_captions()) - {""}  # the non-empty captions the model was trained on
    main = [r for r in rows if _is_main(r, lr, steps)]
    table = []
    for m in methods:
        entry = {"method": m}
        for kind, tg in (("shapes", [t for t in targets if t in w.SHAPES]),
                         ("colour", [t for t in targets if t not in w.SHAPES])):
            if not tg:
                continue
            for metric in ("esr", "psr", "psr_near", "psr_far"):
                per_seed = []
                for s in seeds:
                    vals = [r[metric] for r in main if r["method"] == m and r["seed"] == s and r["target"] in tg
                            and metric in r]
                    if len(vals) == len(tg):
                        per_seed.append(statistics.fmean(vals))
                entry[f"{metric}_{kind}"] = _mean_std(per_seed)
        times = [r["train_s"] for r in main if r["method"] == m and "train_s" in r]
        entry["train_s"] = f"{statistics.fmean(times):.1f}" if times else "–"
        sizes = [r["r_size"] for r in main if r["method"] == m and "r_size" in r]
        entry["r_size"] = f"{statistics.fmean(sizes):.0f}" if sizes else "–"
        draws = [(k, v) for r in main if r["method"] == m for k, v in (r.get("picks") or {}).items()]
        total = sum(v for _, v in draws)
        entry["caption_draws"] = (f"{100 * sum(v for k, v in draws if k in captions) / total:.0f}"
                                  if total else "–")
        for key in ("drift_erased", "drift_kept"):
            vals = [r[key] for r in main if r["method"] == m and key in r]  # none on a flow model
            entry[key] = f"{statistics.fmean(vals):.4f}" if vals else "–"
        table.append(entry)
    return table


def write_outputs(rows, args, env, grid_images, out: Path, tag: str) -> None:
    methods, targets, seeds = args.methods, args.targets, args.seeds
    w = world_of(args.model)
    shapes = w.SHAPES
    if getattr(args, "near_sets", None):  # fixed in advance (a confirmation): not re-measured
        sets = {t: ns for t, ns in json.loads(Path(args.near_sets).read_text()).items()
                if t in {r["target"] for r in rows}}
    else:
        sets = near_sets(rows, sorted({r["target"] for r in rows}), args.lr, args.model, steps=args.steps)
    add_near_far(rows, sets)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{tag}"
    flat_cols = ["target", "method", "seed", "lr", "steps", "batch_size", "esr", "psr", "psr_near", "psr_far",
                 "shape_acc",
                 "drift_erased", "drift_kept", "gap_erased", "gap_base", "r_size", "train_s", "wall_s",
                 "acc", "became", "picks"]
    with open(f"{stem}.csv", "w", newline="") as fh:
        out_csv = csv.writer(fh)
        out_csv.writerow([f"# {k}: {v}" for k, v in env.items()])
        out_csv.writerow(flat_cols)
        for r in rows:
            out_csv.writerow([json.dumps(r[c]) if isinstance(r.get(c), dict) else r.get(c, "") for c in flat_cols])
    table = summarize(rows, methods, targets, seeds, args.lr, args.model, args.steps)
    world_name = {"shapes": "ShapesWorld", "shapes2-flow": "ShapesWorld 2 flow (shapes2-flow)"}.get(args.model, "ShapesWorld 2")
    lines = [f"# Erasure quality on {world_name} ({tag})", ""]
    lines += [f"* {k}: `{v}`" if k == "command" else f"* {k}: {v}" for k, v in env.items()]
    lines += [
        f"* settings: {args.steps} steps"
        + (f" (judged also after {', '.join(map(str, budgets_below(args)))})" if budgets_below(args) else "")
        + f", lr {args.lr}, batch {args.batch_size}, loss {args.loss_space}, "
        f"λ {args.preserve_weight}, π lr {args.search_lr}, train_method={args.train_method}, "
        + (f"LoRA rank {args.lora_rank} (alpha {args.lora_alpha or args.lora_rank}), " if args.lora_rank else "full fine-tuning, ")
        + f"model={args.model}, {', '.join(f'{k}={v}' for k, v in COMMON.items() if k not in ('device', 'quiet'))}"
        + "".join(f", {k}={v} (ablation)" for k, v in _ablation(vars(args)).items()),
        f"* evaluation: {args.images} images per shape prompt (colour target: "
        f"{max(1, args.images // len(shapes))} per colour-shape pair), {'flow Euler' if args.model.endswith('-flow') else 'DDIM'} {args.eval_steps} steps, CFG {EVAL_GUIDANCE}, "
        f"seeds paired across methods; classifier top-1. Seeds: {seeds}."
        + (f" Prompts '{w.EVAL_PREFIX} <shape>' / '{w.EVAL_PREFIX} <colour> <shape>': trained, never members of R "
           f"(asserted for every run)." if hasattr(w, "EVAL_PREFIX") else ""),
        "",
        "## Summary (mean ± std over seeds of the mean over targets; %)",
        "",
    ]
    has_colour = any(t not in shapes for t in targets)
    split = bool(sets)
    near_far = ["PSR-near shapes ↑", "PSR-far shapes ↑"] if split else []
    head = ["method", "ESR shapes ↑", "PSR shapes ↑", *near_far] + (["ESR colour ↑", "PSR colour ↑"] if has_colour else [])
    head += ["ε drift erased", "ε drift kept ↓", "|R|", "draws that are world captions %", "train s/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["method"], e.get("esr_shapes", "–"), e.get("psr_shapes", "–")]
        if split:
            cells += [e.get("psr_near_shapes", "–"), e.get("psr_far_shapes", "–")]
        if has_colour:
            cells += [e.get("esr_colour", "–"), e.get("psr_colour", "–")]
        cells += [e["drift_erased"], e["drift_kept"], e["r_size"], e["caption_draws"], e["train_s"]]
        lines.append("| " + " | ".join(cells) + " |")
    main = [r for r in rows if _is_main(r, args.lr, args.steps)]
    def esr_psr(rs, t):
        return (f"{100 * statistics.fmean(r['esr'] for r in rs):.0f} / "
                f"{100 * statistics.fmean(r['psr'] for r in rs):.0f}")

    def hurt_most(rs, t):
        names = [n for n in rs[0]["acc"] if n != t]
        mean_acc = {n: statistics.fmean(r["acc"][n] for r in rs) for n in names}
        worst = min(mean_acc, key=mean_acc.get)
        return f"{worst} {100 * mean_acc[worst]:.0f}"

    for title, cell in (("Per target: ESR / PSR (mean over seeds, %)", esr_psr),
                        ("Per target: the kept concept hurt most (lowest accuracy, mean over seeds, %)",
                         hurt_most)):
        lines += ["", f"## {title}", "", "| target | " + " | ".join(methods) + " |",
                  "|" + "---|" * (len(methods) + 1)]
        for t in targets:
            runs = {m: [r for r in main if r["method"] == m and r["target"] == t] for m in methods}
            lines.append(f"| {t} | " + " | ".join(cell(rs, t) if rs else "–" for rs in runs.values()) + " |")
    lines += ["", "## What the erased concept's images became (classifier labels, counts summed over seeds)",
              "", "| target | method | labels |", "|---|---|---|"]
    for t in targets:
        for m in methods:
            rs = [r for r in main if r["method"] == m and r["target"] == t]
            if not rs:
                continue
            tot = {k: sum(r["became"][k] for r in rs) for k in rs[0]["became"]}
            labels = ", ".join(f"{k} {v}" for k, v in sorted(tot.items(), key=lambda kv: -kv[1]) if v)
            lines.append(f"| {t} | {m} | {labels} |")
    lines += ["", "## Preserved concepts drawn (outer updates, summed over seeds; top 6)", "",
              "| target | method | drawn |", "|---|---|---|"]
    for t in targets:
        for m in methods:
            rs = [r for r in main if r["method"] == m and r["target"] == t and r.get("picks")]
            if not rs:
                continue
            tot: dict[str, int] = {}
            for r in rs:
                for k, v in r["picks"].items():
                    tot[k] = tot.get(k, 0) + v
            top = sorted(tot.items(), key=lambda kv: -kv[1])[:6]
            lines.append(f"| {t} | {m} | " + ", ".join(f"'{k}' {v}" for k, v in top) + " |")
    # the curves: the learning-rate sweep's (target, seed) pairs, or without one every pair; a
    # curve is the base model, then the erasures by strength (the step budgets judged on the
    # way, the learning rates)
    swept = [r for r in rows if r["lr"] != args.lr and r["method"] != "base"]
    ct, cs = (args.sweep_targets, args.sweep_seeds) if swept else (targets, seeds)
    on_curve = [r for r in rows if r["target"] in ct and r["seed"] in cs]
    points = sorted({(r["lr"], r["steps"]) for r in on_curve if r["method"] != "base"},
                    key=lambda p: _point({"lr": p[0], "steps": p[1]}))
    if len(points) > 1:
        lines += ["", f"## Erasure strength: ESR / PSR (%, mean over the curves' targets {', '.join(ct)} and "
                      f"seeds {', '.join(map(str, cs))})", "",
                  f"![ESR vs PSR]({stem.name}_sweep.png)", "",
                  "| lr | steps | " + " | ".join(m for m in methods if m != "base") + " |",
                  "|" + "---|" * (len(methods) + 1)]
        for lr, st in points:
            cells = []
            for m in methods:
                if m == "base":
                    continue
                rs = [r for r in on_curve if r["method"] == m and r["lr"] == lr and r["steps"] == st]
                cells.append(f"{100 * statistics.fmean(r['esr'] for r in rs):.0f} / "
                             f"{100 * statistics.fmean(r['psr'] for r in rs):.0f}" if rs else "–")
            lines.append(f"| {lr:g} | {st} | " + " | ".join(cells) + " |")
        _plot_sweep(on_curve, args, points, stem.with_name(stem.name + "_sweep.png"))
    lines += ["", "## PSR at matched erasure (%, mean ± std over the target × seed curves)", "",
              "Each (target, seed) curve starts at the base model (learning rate 0) and runs over the "
              "method's erasures from the weakest to the strongest (lr × steps: step budgets judged on the "
              "way, learning rates); PSR is interpolated linearly where the curve first reaches the ESR "
              "level. A curve that never reaches it (or starts above it) is counted, not extrapolated.", "",
              "| method | " + " | ".join(f"PSR @ ESR {100 * lv:.0f} % (curves)" for lv in MATCHED_ESR) + " |",
              "|" + "---|" * (len(MATCHED_ESR) + 1)]
    for m in methods:
        if m == "base":
            continue
        cells = []
        for lv in MATCHED_ESR:
            vals, missed = matched_erasure(rows, m, ct, cs, lv)
            cell = _mean_std(vals) + f" ({len(vals)})" if vals else "–"
            cells.append(cell + (f", {missed} not reached" if missed else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if split:
        lines += ["", "## Held-out PSR-near and PSR-far at matched erasure "
                  "(%, mean ± std over the target × seed curves)", "",
                  "Near: the kept concepts plain ESD damages most (table below); far: the others. "
                  "Interpolated as above.", "",
                  "| method | " + " | ".join(f"{part} @ ESR {100 * lv:.0f} %" for lv in MATCHED_ESR
                                             for part in ("PSR-near", "PSR-far")) + " |",
                  "|" + "---|" * (2 * len(MATCHED_ESR) + 1)]
        for m in methods:
            if m == "base":
                continue
            cells = []
            for lv in MATCHED_ESR:
                for metric in ("psr_near", "psr_far"):
                    vals, missed = matched_erasure(rows, m, ct, cs, lv, metric)
                    cell = _mean_std(vals) + f" ({len(vals)})" if vals else "–"
                    cells.append(cell + (f", {missed} not reached" if missed else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        _plot_near_far(on_curve, args, points, stem.with_name(stem.name + "_near_far.png"))
        lines += ["", f"![PSR-near and PSR-far against ESR]({stem.name}_near_far.png)"]
    lines += paired_section(rows, methods, ct, cs, ("psr_near", "psr_far") if split else ("psr",))
    if getattr(args, "confirm", None) and split:
        lines += confirmation_section(rows, *args.confirm.split(":"), ct, cs)
    if getattr(args, "trajectory_table", False) and split:
        lines += trajectory_section(rows, methods, ct, cs, args.steps)
        lines += draws_section(rows, methods, ct, cs, args.steps)
    if split:
        lines += search_finds_near(main, methods, sets)
        lines += search_over_training(rows, methods, sets, args.lr)
        lines += ["", f"## Near sets (esd at lr {args.lr:g} against base; accuracy lost, %)", "",
                  "| target | near set | next most damaged | esd seeds |", "|---|---|---|---|"]
        for t, ns in sets.items():
            ranked = sorted(ns["damage"], key=lambda n: -ns["damage"][n])
            rest = [n for n in ranked if n not in ns["near"]][:3]
            lines.append(f"| {t} | " + ", ".join(f"{n} {100 * ns['damage'][n]:.0f}" for n in ns["near"])
                         + " | " + ", ".join(f"{n} {100 * ns['damage'][n]:.0f}" for n in rest)
                         + f" | {ns['esd_seeds']} |")
        with open(stem.with_name(stem.name + "_near.json"), "w") as fh:
            json.dump(sets, fh, indent=1)
    if grid_images:
        _save_grid(grid_images, stem.with_name(stem.name + "_grid.png"))
    if grid_images or stem.with_name(stem.name + "_grid.png").exists():  # --report-only keeps the grid
        lines += ["", f"Samples (first target, seed {seeds[0]}; rows: methods; columns: the {len(shapes)} shape "
                  f"prompts, two images each): ![grid]({stem.name}_grid.png)"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    _log(f"wrote {stem}.csv, {stem}.md")


def paired_section(rows, methods, targets, seeds, metrics) -> list[str]:
    """The report's paired comparison: each method against preserving a random member of R (does
    the search pay off?) and each AP method against the oracle (how close does it get?), on the
    same (target, seed) curves at every matched ESR level."""
    pairs = [(m, "preserve_random") for m in methods if m not in ("base", "preserve_random")
             and "preserve_random" in methods]
    pairs += [(m, "oracle") for m in methods if m.startswith("ap_") and "oracle" in methods]
    if not pairs:
        return []
    names = {"psr": "PSR", "psr_near": "PSR-near", "psr_far": "PSR-far"}
    cols = [(lv, mt) for lv in MATCHED_ESR for mt in metrics]
    lines = ["", "## Paired at matched erasure: method − control on the same (target, seed) curves", "",
             "Percentage points, mean ± standard error over the curves on which both reach the level; "
             "in brackets wins / losses / ties of the method, the two-sided sign test's p and that p "
             f"Holm-adjusted over the column's {len(pairs)} comparisons (a column is one family: read a "
             "single p as significant only where its Holm value is small).", "",
             "| method − control | " + " | ".join(f"{names[mt]} @ ESR {100 * lv:.0f} %" for lv, mt in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    table = [[paired_difference(rows, m, c, targets, seeds, lv, mt) for lv, mt in cols] for m, c in pairs]
    adjusted = [[None] * len(pairs) for _ in cols]
    for j in range(len(cols)):
        tested = [i for i in range(len(pairs)) if table[i][j]["n"]]
        for i, q in zip(tested, holm([table[i][j]["p"] for i in tested])):
            adjusted[j][i] = q
    for i, (m, c) in enumerate(pairs):
        cells = [_paired_cell(table[i][j], adjusted[j][i]) for j in range(len(cols))]
        lines.append(f"| {m} − {c} | " + " | ".join(cells) + " |")
    return lines


def confirmation_section(rows, method: str, control: str, targets, seeds, alpha: float = 0.05) -> list[str]:
    """The pre-registered test of ``method`` against ``control``: PSR-near differences on the same
    (target, seed) curves at every matched ESR level, each level's two-sided sign test adjusted by
    Holm-Bonferroni over the levels; confirmed where the adjusted p is below ``alpha`` and the mean
    difference is positive."""
    diffs = [paired_difference(rows, method, control, targets, seeds, lv, "psr_near") for lv in MATCHED_ESR]
    adjusted = holm([d["p"] for d in diffs])
    lines = ["", f"## Confirmation: {method} − {control}, PSR-near (pre-registered)", "",
             f"{len(MATCHED_ESR)} comparisons (one per matched ESR level), two-sided exact sign tests, "
             f"Holm-Bonferroni adjusted, family-wise α = {alpha}. Confirmed: adjusted p < {alpha} and a "
             "positive mean difference.", "",
             "| ESR level | difference, points (wins/losses/ties, p) | curves | Holm-adjusted p | confirmed |",
             "|---|---|---|---|---|"]
    for lv, d, q in zip(MATCHED_ESR, diffs, adjusted):
        ok = d["n"] > 0 and q < alpha and d["mean"] > 0
        lines.append(f"| {100 * lv:.0f} % | {_paired_cell(d)} | {d['n']} | {q:.2g} | {'yes' if ok else 'no'} |")
    return lines


def _ci_cell(values: list[float]) -> str:
    ci = t_interval([100 * v for v in values])
    if ci is None:
        return "–"
    return f"{ci[0]:+.1f} [{ci[1]:+.1f}, {ci[2]:+.1f}]"


def trajectory_section(rows, methods, targets, seeds, steps: int) -> list[str]:
    """Where the trajectories come from: each ``<m>_bank`` / ``<m>_base`` against ``<m>``
    (student) on the same (target, seed) curves, with the pre-registered non-inferiority test
    (lower end of the 95 % t-interval ≥ the margin) on PSR-near at each matched ESR level and on
    ESR after the last step; PSR-far, the sign tests and the steps to ESR 95 % are reported."""
    pairs = [(f"{m}_{src}", m, src) for src in ("bank", "base") for m in TRAJECTORY_METHODS
             if f"{m}_{src}" in methods and m in methods]
    if not pairs:
        return []
    lines = ["", "## Trajectory source: bank / base − student on the same (target, seed) curves", "",
             "Points; mean [95 % t-interval] (curves: both reach the level). Non-inferior (fixed before the "
             f"run): the interval's lower end ≥ {PSR_NEAR_MARGIN:g} points for PSR-near at each ESR level and "
             f"≥ {ESR_MARGIN:g} points for ESR after {steps} steps; a source is called non-inferior only if "
             "every comparison of its three methods passes (intersection-union test). PSR-far and the sign "
             "tests (wins/losses, p, uncorrected) are reported, not tested.", "",
             "| comparison | " + " | ".join(f"PSR-near @ ESR {100 * lv:.0f} %" for lv in MATCHED_ESR)
             + " | " + " | ".join(f"PSR-far @ ESR {100 * lv:.0f} %" for lv in MATCHED_ESR)
             + f" | ESR after {steps} steps | non-inferior |", "|" + "---|" * (2 * len(MATCHED_ESR) + 3)]
    verdicts: dict[str, list[bool]] = {}
    coverage: dict[str, set] = {}
    for name, m, src in pairs:
        cells, near, esr = _comparison_cells(rows, name, m, targets, seeds, steps)
        ok = [ci is not None and ci[1] >= PSR_NEAR_MARGIN for ci in near]
        ok.append(esr is not None and esr[1] >= ESR_MARGIN)
        verdicts.setdefault(src, []).extend(ok)
        coverage.setdefault(src, set()).update((r["target"], r["seed"]) for r in rows if r["method"] == name)
        lines.append(f"| {name} − {m} | " + " | ".join(cells) + f" | {'yes' if all(ok) else 'no'} |")
    lines += _steps_to_esr_table(rows, [m for m in TRAJECTORY_METHODS if m in methods] + [p[0] for p in pairs],
                                 targets, seeds)
    lines.append("")
    for src, ok in verdicts.items():
        n_curves = len(coverage[src])
        lines.append(f"* **{src}**: {'non-inferior' if all(ok) else 'not shown non-inferior'} "
                     f"({sum(ok)} of {len(ok)} comparisons pass; {n_curves} (target, seed) curves of "
                     f"{len(targets) * len(seeds)} run).")
    return lines


def _comparison_cells(rows, name, against, targets, seeds, steps):
    """The cells of one paired comparison row (PSR-near, then PSR-far at each matched ESR level,
    then ESR after ``steps``) and the t-intervals of PSR-near (one per level) and of ESR."""
    cells, near = [], []
    for metric in ("psr_near", "psr_far"):
        for lv in MATCHED_ESR:
            d = paired_difference(rows, name, against, targets, seeds, lv, metric)
            if metric == "psr_near":
                near.append(t_interval([100 * v for v in d["diffs"]]))
            cells.append(_ci_cell(d["diffs"]) + f" ({d['n']}; {d['wins']}/{d['losses']}, p {d['p']:.2g})"
                         if d["n"] else "–")
    esr = [(esr_after(rows, name, t, s_, steps), esr_after(rows, against, t, s_, steps))
           for t in targets for s_ in seeds]
    esr = [a - b for a, b in esr if a is not None and b is not None]
    cells.append(_ci_cell(esr) + f" ({len(esr)})")
    return cells, near, t_interval([100 * v for v in esr])


def _steps_to_esr_table(rows, names, targets, seeds) -> list[str]:
    lines = ["", "| method | curves reaching ESR 95 % | steps to ESR 95 %, mean ± std (those that reach it) |",
             "|---|---|---|"]
    for name in names:
        got = [steps_to_esr(rows, name, t, s_, 0.95) for t in targets for s_ in seeds
               if any(r["method"] == name and r["target"] == t and r["seed"] == s_ for r in rows)]
        reached = [v for v in got if v is not None]
        spread = (f"{statistics.fmean(reached):.1f} ± {statistics.stdev(reached) if len(reached) > 1 else 0:.1f}"
                  if reached else "–")
        lines.append(f"| {name} | {len(reached)} of {len(got)} | {spread} |")
    return lines


def draws_section(rows, methods, targets, seeds, steps: int) -> list[str]:
    """Spending the bank's savings on more draws: each ``<m>_bank_draws<K>`` (θ′'s preservation
    term averaged over K candidates per sample) against ``<m>_bank`` (one draw, the same bank)
    and against ``<m>`` (the authors' student loop) on the same (target, seed) curves. Fixed
    before running: K draws *improve* preservation where the lower end of the 95 % t-interval of
    PSR-near(K) − PSR-near(bank) is > 0 at both ESR levels; the rest is reported."""
    pairs = [(name, against) for name in methods if "_bank_draws" in name
             for against in (name.split("_draws")[0], name.split("_bank_draws")[0]) if against in methods]
    if not pairs:
        return []
    lines = ["", "## Spending the bank's savings: K draws per sample for θ′'s preservation term", "",
             "Points; mean [95 % t-interval] (curves: both reach the level; wins/losses, sign-test p, "
             "uncorrected). Fixed before the run: K draws improve preservation where the interval's lower end "
             "of PSR-near against the one-draw bank run is above 0 at both ESR levels (2 comparisons per "
             "method; a method is called better only if both pass). Against the student runs: reported.", "",
             "| comparison | " + " | ".join(f"PSR-near @ ESR {100 * lv:.0f} %" for lv in MATCHED_ESR)
             + " | " + " | ".join(f"PSR-far @ ESR {100 * lv:.0f} %" for lv in MATCHED_ESR)
             + f" | ESR after {steps} steps | better |", "|" + "---|" * (2 * len(MATCHED_ESR) + 3)]
    for name, against in pairs:
        cells, near, _ = _comparison_cells(rows, name, against, targets, seeds, steps)
        better = ("yes" if all(ci is not None and ci[1] > 0 for ci in near) else "no") \
            if against.endswith("_bank") else "(reported)"
        lines.append(f"| {name} − {against} | " + " | ".join(cells) + f" | {better} |")
    names = list(dict.fromkeys(x for p in pairs for x in reversed(p)))
    lines += _steps_to_esr_table(rows, names, targets, seeds)
    curves = {(r["target"], r["seed"]) for r in rows if r["method"] in {p[0] for p in pairs}}
    lines += ["", f"{len(curves)} (target, seed) curves of {len(targets) * len(seeds)} run."]
    return lines


def search_finds_near(main, methods, sets) -> list[str]:
    """Does the search find the near set? Per method, over its main-setting rows: the draws that
    name a near concept, π's final mass on the near set and π's peak against a uniform draw (both
    under the draw distribution of the mode in use, :func:`~ap_erase_fast.search.draw_distribution`;
    only rows that recorded it), the near share of π's top 5, the logit gap between π's first and
    fifth candidate, and the near set's share of R."""
    lines = ["", "## Does the search find the near set? (main lr, mean over targets and seeds, %)", "",
             "Draws: share of the preservation draws (outer updates) whose candidate names a near "
             "concept (what was actually preserved). π: where π's draw distribution ends (for the hard "
             "draw softmax(π), whatever τ; rows recorded before this measure show –): its mass on "
             "those candidates and its largest probability over a uniform draw's; the share of π's 5 "
             "most likely candidates that name a near concept; π₁ − π₅, the logit gap between its "
             "first and fifth candidate (τ-free: the first is drawn exp(π₁ − π₅) times as often as the "
             "fifth). R: the near candidates' share of R (what a uniform draw gives).", "",
             "| method | draws naming a near concept | π mass on the near set | π's top 5 naming a near "
             "concept | π's peak ÷ uniform | π₁ − π₅ | near set's share of R |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        st = search_stats([r for r in main if r["method"] == m], sets)
        if st is None:
            continue
        lines.append(f"| {m} | {_pct(st['draws'])} | {_pct(st['mass'])} | {_pct(st['top'])} | "
                     + _mean(st["peak"], 1) + " | " + _mean(st["gap"], 2) + f" | {_pct(st['share'])} |")
    return lines


def _pct(xs) -> str:
    return f"{100 * statistics.fmean(xs):.1f}" if xs else "–"


def _mean(xs, digits: int) -> str:
    return f"{statistics.fmean(xs):.{digits}f}" if xs else "–"


def search_over_training(rows, methods, sets, lr) -> list[str]:
    """Where the search goes as the erasure proceeds: at each judged step budget of the main
    learning rate, π's mass on the near set and the share of the draws so far that name a near
    concept, against the near set's share of R (a uniform draw), mean over targets and seeds."""
    runs = [r for r in rows if r["method"] in methods and r["method"] != "base" and r.get("lr") == lr
            and r["target"] in sets and r.get("r_share")]
    budgets = sorted({r["steps"] for r in runs})
    if not runs:
        return []
    lines = ["", "## Where the search goes over training (main lr; mean over targets and seeds, %)", "",
             "Per judged step budget: π's mass on the near set under its draw distribution (softmax(π) for the "
             "hard draw; – for rows recorded before this measure) / the share of the draws so far that "
             "name a near concept. A uniform draw gives the near set's share of R.", "",
             "| method | " + " | ".join(f"after {b} steps" for b in budgets) + " | near set's share of R |",
             "|" + "---|" * (len(budgets) + 2)]

    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs or not (m.startswith("ap_") or any(r.get("picks") for r in rs)):  # ESD draws nothing
            continue
        cells = []
        for b in budgets:
            at = [r for r in rs if r["steps"] == b]
            mass = [sum(r["pi_mass"].get(n, 0.0) for n in sets[r["target"]]["near"]) for r in at
                    if m.startswith("ap_") and r.get("pi_measure") == PI_MEASURE]  # others' π never moves
            draws = [_near_share(r["picks"], sets[r["target"]]["near"]) for r in at if r.get("picks")]
            cells.append(" / ".join(f"{100 * statistics.fmean(x):.1f}" if x else "–" for x in (mass, draws)))
        share = statistics.fmean(sum(r["r_share"].get(n, 0.0) for n in sets[r["target"]]["near"]) for r in rs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * share:.1f} |")
    return lines
