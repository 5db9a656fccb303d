"""The committed ShapesWorld 2 reports regenerate from their committed runs: the main table (its
near sets included), the confirmation, the trajectory-source and K-draws tables and the ablations table, written again by today's code into a temporary
folder, match the committed files line for line, apart from the lines that describe the machine
and the moment (date, commit, versions, the command). A change to the report arithmetic (the
order of a matched-ESR curve, which ESD budget defines the near sets, a statistic) shows up here
as a changed committed number."""
import json
import re
import shutil
from pathlib import Path

import pytest

from ap_erase_fast.cli import main as cli

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ENV = re.compile(r"^\* (ap_erase_fast|python|torch|diffusers|transformers|bitsandbytes|date|commit|cpu|"
                 r"cpu cores|device|torch threads|command|peft|deepspeed|triton|numpy): ")


def _body(text: str) -> list[str]:
    return [line for line in text.splitlines() if not ENV.match(line)]


def _command(md: Path) -> list[str]:
    """The command a committed report records, as arguments after ``ap-erase`` (an empty
    ``--sweep-lrs`` value is recorded as two spaces)."""
    cmd = re.search(r"\* command: `ap-erase (.*)`", md.read_text()).group(1)
    if "--sweep-lrs  " not in cmd:
        return cmd.split()
    head, tail = cmd.split("--sweep-lrs  ", 1)
    return [*head.split(), "--sweep-lrs", "", *tail.split()]


@pytest.mark.parametrize("tag", ["shapes2_cpu", "shapes2_confirm", "shapes2_traj", "shapes2_draws"])
def test_main_table_and_near_sets_regenerate_from_the_committed_runs(tmp_path, tag):
    """Mutation checked: the near sets from every ESD budget instead of the main one (9 of 15
    sets change). (A curve ordered by learning rate only: test_quality_report's
    test_matched_erasure_follows_the_step_budgets_of_each_learning_rate.)"""
    if not (RESULTS / f"quality_{tag}.jsonl").exists():
        pytest.skip("no committed table")
    for suffix in (".jsonl", "_grid.png"):
        shutil.copy(RESULTS / f"quality_{tag}{suffix}", tmp_path / f"quality_{tag}{suffix}")
    args = _command(RESULTS / f"quality_{tag}.md")
    args[args.index("--out") + 1] = str(tmp_path)
    if "--controls-from" in args:  # the runs it borrowed are read from their own table
        for other in args[args.index("--controls-from") + 1].split(","):
            shutil.copy(RESULTS / f"quality_{other}.jsonl", tmp_path / f"quality_{other}.jsonl")
    if "--near-sets" in args:  # the confirmation's fixed near sets, wherever the tests run from
        i = args.index("--near-sets") + 1
        args[i] = str(RESULTS / Path(args[i]).name)
    assert cli([*[a for a in args if a != "--report-only"], "--report-only"]) == 0
    want = json.loads((RESULTS / f"quality_{tag}_near.json").read_text())
    got = json.loads((tmp_path / f"quality_{tag}_near.json").read_text())
    assert {t: v["near"] for t, v in got.items()} == {t: v["near"] for t, v in want.items()}
    assert _body((tmp_path / f"quality_{tag}.md").read_text()) == _body((RESULTS / f"quality_{tag}.md").read_text())


@pytest.mark.skipif(not (RESULTS / "quality_shapes2_ablations.md").exists(), reason="no committed table")
def test_ablations_table_regenerates_from_the_committed_runs(tmp_path):
    """Mutation checked: an ablation's near sets from every ESD budget."""
    args = _command(RESULTS / "quality_shapes2_ablations.md")
    args[args.index("--out") + 1] = str(RESULTS)
    report = tmp_path / "ablations.md"
    assert cli([*args, "--report", str(report)]) == 0
    assert _body(report.read_text()) == _body((RESULTS / "quality_shapes2_ablations.md").read_text())
