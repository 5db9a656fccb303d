"""The ShapesWorld 2 attack table's arithmetic (ap_erase_fast/attack/table.py) on hand-made rows:
which committed budget is matched, the paired differences and their sign tests, Holm over the
whole table, the verdict's direction, and the committed report regenerating from its rows."""
import json
from pathlib import Path

import pytest

from ap_erase_fast.attack import table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _curve(method, target="circle", seed=0, esrs=(0.0, 0.5, 0.875, 1.0), lr=1e-3, ablation=None):
    return [{"method": method, "target": target, "seed": seed, "lr": lr, "steps": s, "esr": e, "psr": 0.9,
             "ablation": ablation or {}} for s, e in zip((5, 10, 20, 30), esrs)]


def test_matched_steps_is_the_first_budget_at_the_level_on_the_main_curve():
    """Mutation checked: `>` for `>=` (0.8 is reached exactly at 20 steps of the second curve)
    and the ablation rows not left out both fail."""
    rows = (_curve("esd") + _curve("ap_faithful", esrs=(0.0, 0.25, 0.8, 1.0))
            + _curve("ap_faithful", esrs=(1.0, 1.0, 1.0, 1.0), ablation={"tau": 8.0})
            + _curve("ap_faithful", esrs=(1.0, 1.0, 1.0, 1.0), lr=1e-2)
            + _curve("oracle", esrs=(0.0, 0.1, 0.2, 0.3)))
    assert table.matched_steps(rows, "circle", 0, "esd")["steps"] == 20
    assert table.matched_steps(rows, "circle", 0, "ap_faithful")["steps"] == 20
    assert table.matched_steps(rows, "circle", 0, "oracle") is None
    assert table.matched_steps(rows, "circle", 1, "esd") is None


def _row(target, method, **rates):
    full = {k: rates.get(k, 0.0) for k in ("base", *table.MEASURES)}
    return {"target": target, "seed": 0, "method": method, "steps": 10, "prompt_found": "p",
            "unet_evals": {"prompt": 100},
            "rates": {k: {"hits": round(32 * v), "images": 32, "rate": v} for k, v in full.items()}}


def test_paired_differences_sign_test_and_verdict():
    """AP's prompt-attack ASR is lower than ESD's on 9 of 10 targets (one tie): the sign test
    p = 2/2^9, the interval below 0, the verdict "harder to undo"; the same rows read the other
    way round say "easier to undo". Mutation checked: the difference taken against − method, the
    ties counted as wins, and the verdict reading the interval's upper end as its lower end each fail."""
    rows = []
    for i in range(10):
        t = f"t{i}"
        rows += [_row(t, "esd", prompt=0.5), _row(t, "ap_faithful", prompt=0.5 if i == 0 else 0.25 + 0.01 * i)]
    d = table.paired(rows, "ap_faithful", "esd", "prompt")
    assert (d["n"], d["higher"], d["lower"], d["ties"]) == (10, 0, 9, 1)
    assert d["p"] == pytest.approx(2 / 2 ** 9)
    mean, lo, hi = d["interval"]
    assert mean == pytest.approx(sum(-0.25 + 0.01 * i for i in range(1, 10)) / 10)  # -0.18
    assert hi < 0 and lo < mean
    assert table.verdict({**d, "p_holm": d["p"]}) == "harder to undo"
    assert table.verdict({**d, "p_holm": 0.2}) == "not shown"
    assert table.verdict({**d, "p_holm": 0.01, "interval": (-0.1, -0.3, 0.1)}) == "not shown"  # spans 0
    back = table.paired(rows, "esd", "ap_faithful", "prompt")
    assert table.verdict({**back, "p_holm": back["p"]}) == "easier to undo"
    # the unattacked rate has its own words
    assert table.verdict({**d, "measure": "erased", "p_holm": d["p"]}) == "erases less"


def test_holm_is_over_every_comparison_of_the_table():
    rows = []
    for i in range(10):
        t = f"t{i}"
        rows += [_row(t, m, prompt=0.5) for m in table.METHODS if m != "ap_faithful"]
        rows.append(_row(t, "ap_faithful", prompt=0.1))
    out = table.comparisons(rows)
    assert len(out) == len(table.COMPARISONS) * len(table.MEASURES)
    ap = [d for d in out if d["method"] == "ap_faithful" and d["against"] == "esd" and d["measure"] == "prompt"][0]
    assert ap["p"] == pytest.approx(2 / 2 ** 10)
    # Holm: the smallest p of m comparisons is multiplied by m (both AP comparisons have it: × m for the first)
    assert ap["p_holm"] == pytest.approx(min(1.0, len(out) * ap["p"])) and ap["verdict"] == "harder to undo"
    others = [d for d in out if d is not ap and d["measure"] != "prompt"]
    assert all(d["verdict"] == "not shown" and d["n"] == 10 and d["ties"] == 10 for d in others)


def test_report_lines_and_skipped_rows(tmp_path):
    """The means table averages the cells every method ran in only. Mutation checked: the
    incomplete cell's ESD run counted (2 runs, 20.0 % erased) fails."""
    rows = [_row("circle", m, erased=0.1, prompt=0.3) for m in table.METHODS]
    rows.append({"target": "ring", "seed": 0, "method": "oracle", "steps": None, "skipped": "never"})
    rows.append(_row("star", "esd", erased=0.3))  # a cell still being attacked
    text = "\n".join(table.report_lines(rows, {"cpu": "x"}))
    assert "skipped (curve never reached the level): 1" in text and "| esd | 1 | 10.0 | 0.0 | 10.0 |" in text
    for p in tmp_path.glob("*"):
        p.unlink()
    assert table.main(["report", "--out", str(tmp_path)]) == 2  # nothing to report: one line


@pytest.mark.skipif(not (RESULTS / "attack_shapes2_cpu.md").exists(), reason="no committed table")
def test_committed_attack_table_regenerates_from_its_rows():
    rows = [json.loads(line) for line in (RESULTS / "attack_shapes2_cpu.jsonl").read_text().splitlines()]
    committed = (RESULTS / "attack_shapes2_cpu.md").read_text().splitlines()
    start = 4  # title, blank, the command line, blank; then "* key: value" up to the next blank line
    env = dict(line[2:].split(": ", 1) for line in committed[start:committed.index("", start)])
    assert table.report_lines(rows, env) == committed
