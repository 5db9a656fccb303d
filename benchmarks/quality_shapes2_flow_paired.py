"""Two readings of the shapes2-flow quality table that its report does not print: AP faithful −
ESD paired at matched erasure, and Holm over all 12 comparisons of the report's paired table
(PSR-near / PSR-far at ESR 80 % / 95 %, each method − the random control). Reads
benchmarks/results/quality_shapes2_flow_cpu.{jsonl,_near.json}; writes
benchmarks/results/quality_shapes2_flow_cpu_paired.md.

    python benchmarks/quality_shapes2_flow_paired.py
"""
import json
import platform
from pathlib import Path

from ap_erase_fast.quality.report import add_near_far
from ap_erase_fast.quality.statistics import MATCHED_ESR, holm, paired_difference

RES = Path(__file__).resolve().parent / "results"
rows = [json.loads(x) for x in (RES / "quality_shapes2_flow_cpu.jsonl").read_text().splitlines() if x.strip()]
add_near_far(rows, json.loads((RES / "quality_shapes2_flow_cpu_near.json").read_text()))
targets, seeds = sorted({r["target"] for r in rows}), sorted({r["seed"] for r in rows})
cols = [(lv, mt) for lv in MATCHED_ESR for mt in ("psr_near", "psr_far")]


def cell(d):
    return f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f} ({d['wins']}/{d['losses']}/{d['ties']}, p {d['p']:.2g}, n {d['n']})"


lines = ["# shapes2-flow quality table: further paired readings", "",
         f"* from: quality_shapes2_flow_cpu.jsonl (its report names the machine: 2-core Intel Xeon CPU); "
         f"written by benchmarks/quality_shapes2_flow_paired.py, python {platform.python_version()}",
         f"* targets {len(targets)}, seeds {seeds}; points, mean ± standard error over the curves where both "
         "reach the level (wins/losses/ties, two-sided sign test p, curves)", "",
         "## AP faithful − ESD", "", "| level | metric | difference |", "|---|---|---|"]
for lv, mt in cols:
    lines.append(f"| ESR {100 * lv:.0f} % | {mt} | {cell(paired_difference(rows, 'ap_faithful', 'esd', targets, seeds, lv, mt))} |")
lines += ["", "## Each method − random control, Holm over all 12 comparisons", "",
          "| method | level | metric | difference | Holm (12) |", "|---|---|---|---|---|"]
tests = [(m, lv, mt, paired_difference(rows, m, "preserve_random", targets, seeds, lv, mt))
         for m in ("esd", "ap_faithful", "ap_score") for lv, mt in cols]
for (m, lv, mt, d), q in zip(tests, holm([t[3]["p"] for t in tests])):
    lines.append(f"| {m} | ESR {100 * lv:.0f} % | {mt} | {cell(d)} | {q:.2g} |")
(RES / "quality_shapes2_flow_cpu_paired.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
