"""The quality benchmark's report arithmetic and bookkeeping, on synthetic rows (no model): paired
differences at matched erasure and their sign test, the search's course over training, and the
reuse of control runs by an ablation (``--controls-from``)."""
import itertools
import json

import numpy as np
import pytest
import torch

from ap_erase_fast.quality import cli as bench_quality
from ap_erase_fast.quality import metrics, report, runs, worlds
from ap_erase_fast.quality import statistics as stats


def _curves(rng, methods, targets, seeds, steps=(10, 20, 40)):
    """base + each method's rows at the step budgets: ESR rising from 0 to 1, random PSR-near."""
    rows = []
    for t, s in itertools.product(targets, seeds):
        rows.append({"method": "base", "target": t, "seed": s, "lr": 1e-3, "steps": 40, "esr": 0.0,
                     "psr_near": float(rng.uniform(0.9, 1.0))})
        for m in methods:
            esr = np.sort(rng.uniform(0.0, 1.0, len(steps)))
            esr[-1] = 1.0
            for st, e in zip(steps, esr):
                rows.append({"method": m, "target": t, "seed": s, "lr": 1e-3, "steps": st, "esr": float(e),
                             "psr_near": float(rng.uniform(0.3, 1.0))})
    return rows


def _reference_at(rows, m, t, s, level, metric):
    """PSR at ``level`` by np.interp on the first rising segment that crosses it (an independent
    implementation of the reading)."""
    base = [r for r in rows if r["method"] == "base" and r["target"] == t and r["seed"] == s]
    own = sorted((r for r in rows if r["method"] == m and r["target"] == t and r["seed"] == s),
                 key=lambda r: r["steps"])
    pts = [(r["esr"], r[metric]) for r in base + own]
    for (e0, p0), (e1, p1) in zip(pts, pts[1:]):
        if e0 < level <= e1:
            return float(np.interp(level, [e0, e1], [p0, p1]))
    return None


def test_sign_test_matches_enumeration():
    for n in range(0, 9):
        for wins in range(n + 1):
            losses = n - wins
            # every sequence of n fair coin flips whose split is at least as uneven
            extreme = sum(abs(2 * sum(seq) - n) >= abs(wins - losses) for seq in itertools.product((0, 1), repeat=n))
            assert stats.sign_test(wins, losses) == pytest.approx(min(1.0, extreme / 2 ** n))
    assert stats.sign_test(10, 0) == pytest.approx(2 / 1024)


def test_paired_difference_on_the_same_curves():
    """method − control per (target, seed) at matched ESR, against an independent interpolation;
    a curve one side never reaches is left out of the pairs. Mutations checked: control − method,
    pairing across seeds, counting ties as wins."""
    rng = np.random.default_rng(7)
    targets, seeds = ["circle", "ring", "star"], [0, 1, 2]
    rows = _curves(rng, ["ap_faithful", "preserve_random"], targets, seeds)
    # one random curve never reaches 95 %
    for r in rows:
        if r["method"] == "preserve_random" and r["target"] == "ring" and r["seed"] == 1:
            r["esr"] = min(r["esr"], 0.9)
    for level in (0.8, 0.95):
        got = stats.paired_difference(rows, "ap_faithful", "preserve_random", targets, seeds, level, "psr_near")
        diffs = []
        for t, s in itertools.product(targets, seeds):
            a = _reference_at(rows, "ap_faithful", t, s, level, "psr_near")
            b = _reference_at(rows, "preserve_random", t, s, level, "psr_near")
            if a is not None and b is not None:
                diffs.append(a - b)
        assert got["n"] == len(diffs) == (8 if level == 0.95 else 9)
        assert got["mean"] == pytest.approx(np.mean(diffs))
        assert got["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
        assert (got["wins"], got["losses"], got["ties"]) == (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), 0)
        assert got["p"] == pytest.approx(stats.sign_test(got["wins"], got["losses"]))
    # a method against itself: all ties, no difference
    same = stats.paired_difference(rows, "ap_faithful", "ap_faithful", targets, seeds, 0.8, "psr_near")
    assert (same["mean"], same["wins"], same["losses"], same["ties"], same["p"]) == (0.0, 0, 0, 9, 1.0)
    lines = report.paired_section(rows, ["base", "preserve_random", "ap_faithful"], targets, seeds, ("psr_near",))
    row = next(x for x in lines if x.startswith("| ap_faithful − preserve_random |"))
    d = stats.paired_difference(rows, "ap_faithful", "preserve_random", targets, seeds, 0.8, "psr_near")
    assert f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f} ({d['wins']}/{d['losses']}/0" in row


def test_search_over_training_follows_pi_and_the_draws():
    sets = {"circle": {"near": ["ring", "ellipse"]}}
    rows = [{"method": "ap_faithful", "target": "circle", "seed": s, "lr": 1e-3, "steps": st,
             "pi_measure": metrics.PI_MEASURE, "pi_mass": {"ring": 0.1 * st / 10, "ellipse": 0.05, "star": 0.5},
             "r_share": {"ring": 0.1, "ellipse": 0.1, "star": 0.8},
             "picks": {"a ring": st, "a red ellipse": 1, "a star": 3 * st}} for s in (0, 1) for st in (10, 20)]
    rows += [{"method": "ap_faithful", "target": "circle", "seed": 0, "lr": 1e-2, "steps": 10,  # another lr
              "pi_mass": {"ring": 1.0}, "r_share": {"ring": 0.1}, "picks": {"a ring": 100}}]
    lines = report.search_over_training(rows, ["base", "ap_faithful"], sets, 1e-3)
    row = next(x for x in lines if x.startswith("| ap_faithful |"))
    # after 10 steps: π mass 0.1 + 0.05, draws (10 + 1) / 41; after 20: 0.25, 21 / 81; R share 0.2
    assert row == f"| ap_faithful | 15.0 / {100 * 11 / 41:.1f} | 25.0 / {100 * 21 / 81:.1f} | 20.0 |"
    # rows recorded before π's draw distribution was: no mass (softmax(π/τ) is not what is drawn)
    for r in rows:
        r.pop("pi_measure", None)
    row = next(x for x in report.search_over_training(rows, ["ap_faithful"], sets, 1e-3) if x.startswith("| ap_"))
    assert row == f"| ap_faithful | – / {100 * 11 / 41:.1f} | – / {100 * 21 / 81:.1f} | 20.0 |"


def _fake_run_one(calls):
    def run_one(world, target, method, seed, args, lr, near=None):
        calls.append((target, method, seed, dict(runs._ablation(vars(args))) if method.startswith("ap_")
                      else {}, args.search_lr, args.preserve_weight))
        row = {"model": args.model, "target": target, "method": method, "seed": seed, "lr": lr,
               "steps": args.steps, "batch_size": args.batch_size, "loss_space": args.loss_space,
               "search_lr": args.search_lr, "preserve_weight": args.preserve_weight, "images": args.images,
               "eval_steps": args.eval_steps, "train_method": args.train_method, "lora_rank": args.lora_rank,
               "ablation": runs._ablation(vars(args)) if method.startswith("ap_") else {}}
        acc = {s: 1.0 for s in worlds.world_of(args.model).SHAPES}
        extra = {"acc": acc, "became": {s: 0 for s in acc}, "esr": 0.0 if method == "base" else 1.0, "psr": 1.0,
                 "drift_erased": 0.0, "drift_kept": 0.0, "wall_s": 0.0}
        budgets = [args.steps] if runs.METHODS[method] is None else [*runs.budgets_below(args), args.steps]
        return [({**row, **extra, "steps": b}, torch.zeros(15, 3, 4, 4)) for b in budgets]
    return run_one


def test_controls_from_reruns_only_what_an_ablation_changes(tmp_path, monkeypatch):
    """An ablation tag reuses the control runs of the main tag (copied into its own results) and
    re-runs only the AP runs; π's lr changes only AP, λ everything but ESD. Mutations checked:
    search_lr kept in the controls' identity (the controls re-run), the copy left out."""
    calls = []
    monkeypatch.setattr(bench_quality, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(bench_quality, "World", lambda model: object())
    common = ["--model", "shapes2", "--targets", "circle", "--seeds", "0", "--steps", "4", "--budgets", "2",
              "--images", "1", "--out", str(tmp_path)]
    methods = ["--methods", "base,esd,preserve_random,ap_faithful"]
    assert bench_quality.main([*common, *methods, "--tag", "main"]) == 0
    assert [c[1] for c in calls] == ["base", "esd", "preserve_random", "ap_faithful"]
    calls.clear()
    assert bench_quality.main([*common, *methods, "--tag", "tau1", "--tau", "1", "--controls-from", "main"]) == 0
    assert [(c[1], c[3]) for c in calls] == [("ap_faithful", {"tau": 1.0})]
    rows = [json.loads(x) for x in (tmp_path / "quality_tau1.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["steps"]) for r in rows) == sorted(
        [("base", 4)] + [(m, s) for m in ("esd", "preserve_random", "ap_faithful") for s in (2, 4)])
    assert "| preserve_random |" in (tmp_path / "quality_tau1.md").read_text()
    calls.clear()
    assert bench_quality.main([*common, *methods, "--tag", "slr", "--search-lr", "0.3", "--controls-from", "main"]) == 0
    assert [c[1] for c in calls] == ["ap_faithful"]
    calls.clear()
    assert bench_quality.main([*common, *methods, "--tag", "lam", "--preserve-weight", "0.5",
                         "--controls-from", "main"]) == 0
    assert [c[1] for c in calls] == ["preserve_random", "ap_faithful"]
    # in shards, then collected: the collecting run re-runs nothing (not even for the sample grid)
    calls.clear()
    tau3 = [*common, *methods, "--tag", "tau3", "--tau", "3", "--controls-from", "main"]
    assert bench_quality.main([*tau3, "--shard", "0/2"]) == 0 and bench_quality.main([*tau3, "--shard", "1/2"]) == 0
    assert [c[1] for c in calls] == ["ap_faithful"]
    assert bench_quality.main(tau3) == 0 and len(calls) == 1
    assert len((tmp_path / "quality_tau3.jsonl").read_text().splitlines()) == 7
    # a tag with nothing to borrow is one clear error
    from ap_erase_fast.errors import UserError

    with pytest.raises(UserError, match="no finished runs"):
        bench_quality.main([*common, *methods, "--tag", "x", "--controls-from", "nothing"])


def test_shards_of_a_resumed_table_split_what_is_left(tmp_path, monkeypatch):
    """Shards stride over the runs not yet finished, so that a resumed table splits evenly: with
    the 1st and 3rd of four runs done, each of two shards runs one of the other two (striding over
    all four gave one shard both). Mutation checked: striding over every job."""
    calls = []
    monkeypatch.setattr(bench_quality, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(bench_quality, "World", lambda model: object())
    common = ["--model", "shapes2", "--targets", "circle", "--seeds", "0", "--steps", "4", "--images", "1",
              "--out", str(tmp_path)]
    assert bench_quality.main([*common, "--methods", "base,preserve_random"]) == 0
    calls.clear()
    every = [*common, "--methods", "base,esd,preserve_random,ap_faithful"]
    # shards start together: the second does not see what the first has finished meanwhile
    first = tmp_path / "quality_shapes2_cpu.shard0of2.jsonl"
    assert bench_quality.main([*every, "--shard", "0/2"]) == 0 and len(calls) == 1
    first.rename(tmp_path / "aside")
    assert bench_quality.main([*every, "--shard", "1/2"]) == 0 and len(calls) == 2
    (tmp_path / "aside").rename(first)
    assert sorted(c[1] for c in calls) == ["ap_faithful", "esd"]
    assert bench_quality.main(every) == 0 and len(calls) == 2  # the collecting run has nothing left
    assert len((tmp_path / "quality_shapes2_cpu.jsonl").read_text().splitlines()) == 4


def test_search_finds_near_reads_pi_and_the_draws():
    """The end-of-training table: draws naming a near concept, π's mass on the near set and its
    peak over uniform (only from rows that recorded π's draw distribution), the near share of π's
    top 5, π₁ − π₅, the near set's share of R; π only for AP. A row recorded before the measure
    (softmax(π/τ) at τ 2) gives its logit gap 2·ln(q₁/q₅) and no mass or peak. Mutations checked:
    old rows' mass shown as if it were the draw distribution; the gap without τ."""
    import math

    sets = {"circle": {"near": ["ring", "heart"]}}
    base = {"target": "circle", "r_share": {"ring": 0.2, "heart": 0.1, "star": 0.7}, "pi_uniform": 0.02,
            "pi_mass": {"ring": 0.3, "heart": 0.2, "star": 0.5}}
    top = {"a ring": 0.08, "a star": 0.06, "a heart": 0.05, "a red star": 0.04, "a plus": 0.03}
    old = {**base, "method": "ap_faithful", "picks": {"a ring": 3, "a small heart": 1, "a star": 4},
           "pi_top": top}
    rows = [old, {**base, "method": "preserve_random", "picks": {"a ring": 1, "a star": 3},
                  "pi_top": {"a ring": 0.02}}]
    lines = report.search_finds_near(rows, ["base", "preserve_random", "ap_faithful"], sets)
    assert f"| ap_faithful | 50.0 | – | 40.0 | – | {2 * math.log(0.08 / 0.03):.2f} | 30.0 |" in lines
    assert "| preserve_random | 25.0 | – | – | – | – | 30.0 |" in lines
    new = {**old, "pi_measure": metrics.PI_MEASURE, "pi_logits": [1.5, 1.0, 0.9, 0.2, 0.1, 0.0, -1.0]}
    lines = report.search_finds_near([new], ["ap_faithful"], sets)
    assert "| ap_faithful | 50.0 | 50.0 | 40.0 | 4.0 | 1.40 | 30.0 |" in lines


def test_draw_distribution_is_what_the_draw_uses():
    """Hard draw: softmax(π) at any τ, the frequencies of the Gumbel-max draw; soft and top-k: the
    mean mixture weight, against the reference mix over independent noise. Mutation checked:
    softmax(π/τ) for the hard draw (τ 0.5 and 8 then differ from the frequencies)."""
    from ap_erase_fast.ops.reference import gumbel_from_uniform, gumbel_scores, mix_weights
    from ap_erase_fast.search import draw_distribution

    g = torch.Generator().manual_seed(11)
    pi = torch.randn(7, generator=g, dtype=torch.float64)
    noise = gumbel_from_uniform(torch.rand(200_000, 7, generator=g, dtype=torch.float64))
    freq = torch.bincount(torch.argmax(pi + noise, 1), minlength=7).double() / len(noise)
    for tau in (0.5, 2.0, 8.0):
        assert (draw_distribution(pi, "hard", tau) - freq).abs().max() < 5e-3
        for mode, k in (("soft", None), ("topk", 3)):
            want = mix_weights(gumbel_scores(pi[None], noise, tau), k).mean(0)
            got = draw_distribution(pi, mode, tau, topk=k)
            assert (got - want).abs().max() < 0.02, (mode, tau)
            assert float(got.sum()) == pytest.approx(1.0)


def test_matched_erasure_follows_the_step_budgets_of_each_learning_rate():
    """A curve's points run from the weakest erasure to the strongest by lr × steps, whatever
    order the rows come in: two learning rates, budgets 10 and 40, rows shuffled. Hand-computed:
    base (0, 1.0), then 1e-3×10 → (0.2, 0.9), 3e-3×10 → (0.6, 0.8), 1e-3×40 → (0.9, 0.4),
    3e-3×40 → (1.0, 0.3). ESR 0.8 lies between 0.6 and 0.9: 0.8 − 0.4·(0.2/0.3); ESR 0.5 between
    0.2 and 0.6: 0.9 − 0.1·(0.3/0.4). Mutation checked: ordering by learning rate only (then
    1e-3×40 comes first: 0.467 and 0.667)."""
    def row(lr, steps, esr, psr):
        return {"method": "ap_faithful", "target": "circle", "seed": 0, "lr": lr, "steps": steps,
                "esr": esr, "psr": psr}
    rows = [row(3e-3, 40, 1.0, 0.3), row(1e-3, 40, 0.9, 0.4), row(3e-3, 10, 0.6, 0.8),
            row(1e-3, 10, 0.2, 0.9),
            {"method": "base", "target": "circle", "seed": 0, "lr": 1e-3, "steps": 40, "esr": 0.0, "psr": 1.0}]
    at = {lv: stats.matched_by_curve(rows, "ap_faithful", ["circle"], [0], lv)[("circle", 0)] for lv in (0.8, 0.5)}
    assert at[0.8] == pytest.approx(0.8 - 0.4 * 0.2 / 0.3)
    assert at[0.5] == pytest.approx(0.9 - 0.1 * 0.3 / 0.4)


def test_holm_and_the_confirmation_section():
    """Holm-Bonferroni by hand: p (0.01, 0.04, 0.03) → (0.03, 0.06, 0.06); capped at 1. The
    confirmation says yes only where the adjusted p is below 0.05 and the difference positive.
    Mutations checked: Bonferroni's m·p for every rank; no monotone step."""
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.02, 0.01]) == pytest.approx([0.02, 0.02])
    rows = []
    for i, t in enumerate(["circle", "ring", "star", "heart", "cross", "plus", "arrow", "square"]):
        for s in (3, 4):
            rows.append({"method": "base", "target": t, "seed": s, "lr": 1e-3, "steps": 40, "esr": 0.0,
                         "psr_near": 1.0})
            for m, near in (("ap_score", 0.8), ("preserve_random", 0.7)):
                for st, e in ((10, 0.5), (40, 1.0)):
                    rows.append({"method": m, "target": t, "seed": s, "lr": 1e-3, "steps": st, "esr": e,
                                 "psr_near": near})
    lines = report.confirmation_section(rows, "ap_score", "preserve_random",
                                         sorted({r["target"] for r in rows}), [3, 4])
    body = [x for x in lines if x.startswith("| 80 %") or x.startswith("| 95 %")]
    # 16 wins of 16: p = 2 / 2^16 at each level, Holm ×2 for the smaller (equal) one
    assert all(x.endswith("| yes |") and "(16/0/0" in x for x in body), body
    flipped = report.confirmation_section(rows, "preserve_random", "ap_score",
                                           sorted({r["target"] for r in rows}), [3, 4])
    assert all(x.endswith("| no |") for x in flipped if x.startswith("| 8") or x.startswith("| 9"))


def _world_rows(method, target, seed, near_acc, steps=(10, 20, 40), esr=(0.5, 0.9, 1.0), **extra):
    """Rows of one ShapesWorld 2 curve whose near concepts (ring, ellipse, heart: what the esd row
    below damages most) have accuracy ``near_acc`` at every budget and the other shapes 0.95."""
    from ap_erase_fast.shapes.loading import world_of

    shapes = [s for s in world_of("shapes2").SHAPES if s != target]
    rows = []
    for st, e in zip(steps, esr):
        acc = {s: (near_acc if s in ("ring", "ellipse", "heart") else 0.95) for s in shapes}
        rows.append({"method": method, "target": target, "seed": seed, "lr": 1e-3, "steps": st, "esr": e,
                     "acc": acc, "search_lr": 0.1, "preserve_weight": 1.0, **extra})
    return rows


def _setting(ap_method, ap_near, seeds=(0, 1, 2), target="circle", **ap_extra):
    """One setting's rows: base, esd (damages ring, ellipse, heart), the random control at PSR-near
    0.7, the oracle at 0.9 and the AP method at ``ap_near``."""
    rows = []
    for s in seeds:
        rows += _world_rows("base", target, s, 1.0, steps=(40,), esr=(0.0,))
        rows += _world_rows("esd", target, s, 0.2, steps=(40,), esr=(1.0,))
        rows += _world_rows("preserve_random", target, s, 0.7)
        rows += _world_rows("oracle", target, s, 0.9)
        pi = {"pi_mass": {"ring": 0.3, "ellipse": 0.1, "square": 0.6}, "r_share": {"ring": 0.2, "ellipse": 0.1},
              "pi_top": {"a ring": 0.1, "a square": 0.05, "an ellipse": 0.05, "a star": 0.02, "a cross": 0.02},
              "pi_uniform": 0.02}
        rows += _world_rows(ap_method, target, s, ap_near + 0.01 * s, **pi, **ap_extra)
    return rows


def test_ablation_table_reads_each_setting_against_its_own_controls(tmp_path):
    """``ap-erase bench ablations``: per setting the AP method − its random control / oracle in
    PSR-near at matched erasure, PSR-near after the full budget and π's numbers; the defaults row
    from the main table on the same targets and seeds; the setting named by what it changed.
    Mutations checked: pairing against the main table's controls, method and control swapped, λ
    left out of the setting's name."""
    from ap_erase_fast.cli import main as cli
    from ap_erase_fast.quality import ablations

    main_rows = _setting("ap_faithful", 0.6, ablation={})
    tau = _setting("ap_faithful", 0.8, ablation={"tau": 0.5})
    # λ 3: its controls re-run and keep less of the near set (AP is paired against them)
    lam = _setting("ap_faithful", 0.5, ablation={}, preserve_weight=3.0)
    for r in lam:
        if r["method"] in ("preserve_random", "oracle"):
            r["preserve_weight"] = 3.0
            r["acc"] = {k: (v - 0.3 if k in ("ring", "ellipse", "heart") else v) for k, v in r["acc"].items()}
    lines = ablations.summary_lines(main_rows, [("tau0.5", tau), ("lam3", lam)])
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("| ").split(" | ")] for line in lines[2:])}
    assert list(rows) == ["defaults (main table)", "tau0.5 (tau 0.5)", "lam3 (λ 3)"]
    # AP's near accuracy 0.6 + 0.01 s against 0.7 / 0.9 on every point of every curve: −9 / −29
    d, t, lm = rows["defaults (main table)"], rows["tau0.5 (tau 0.5)"], rows["lam3 (λ 3)"]
    assert d[2].startswith("-9.0 ± 0.6 (0/3/0") and d[4].startswith("-29.0 ± 0.6 (0/3/0")
    assert t[2].startswith("+11.0 ± 0.6 (3/0/0") and t[5].startswith("-9.0 ± 0.6 (0/3/0")
    assert lm[2].startswith("+11.0 ± 0.6 (3/0/0") and lm[4].startswith("-9.0 ± 0.6")
    assert t[6] == "81.0 / 70.0" and lm[6] == "51.0 / 40.0"
    # π: mass and peak only from rows that recorded the draw distribution (these did not), top 5
    # naming ring, ellipse or heart, π₁ − π₅ = τ·ln(0.1 / 0.02) at the setting's τ 0.5, R share
    assert t[7:13] == ["–", "–", "40.0", "–", "0.80", "30.0"]  # (these rows drew nothing)
    measured = _setting("ap_faithful", 0.8, ablation={"tau": 0.5}, pi_measure=metrics.PI_MEASURE,
                        pi_logits=[2.0, 1.0, 0.5, 0.4, 0.3, 0.0])
    row = ablations.setting_row("m", measured, "ap_faithful", 40, 1e-3, "shapes2", ["circle"], [0, 1, 2])
    assert row[8:13] == ["40.0", "40.0", "5.0", "1.70", "30.0"]
    # the command: written from the results files, one clear error without them
    for tag, rows_ in (("shapes2_cpu", main_rows), ("shapes2_abl_tau0.5", tau)):
        (tmp_path / f"quality_{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    assert cli(["bench", "ablations", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "quality_shapes2_ablations.md").read_text()
    assert "| tau0.5 (tau 0.5) | ap_faithful | +11.0 ± 0.6" in text
    assert cli(["bench", "ablations", "--out", str(tmp_path), "--names", "nothing"]) == 2


def test_near_sets_and_confirm_options_refuse_bad_input(tmp_path, capsys):
    """--near-sets must be a near-set file of an earlier table and --confirm name two of the run's
    methods: one line, exit 2, nothing run."""
    from ap_erase_fast.cli import main as cli

    bad = tmp_path / "near.json"
    bad.write_text('{"circle": [1, 2]}')
    common = ["bench", "quality", "--model", "shapes2", "--targets", "circle", "--seeds", "3",
              "--methods", "base,preserve_random,ap_score", "--out", str(tmp_path / "out")]
    assert cli([*common, "--near-sets", str(bad)]) == 2
    assert "--near-sets" in capsys.readouterr().err
    assert cli([*common, "--confirm", "ap_score:oracle"]) == 2
    assert "--confirm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_t_interval_and_steps_to_esr():
    """The t quantile against tabulated values, the interval's width, and the step at which a
    curve reaches an ESR level (interpolated from the base model at step 0)."""
    for df, exact in ((4, 2.7764), (10, 2.2281), (44, 2.0154), (100, 1.9840)):
        assert stats.t_quantile(0.975, df) == pytest.approx(exact, abs=2e-3)
    m, lo, hi = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and hi - m == pytest.approx(2.7764 * np.std([1, 2, 3, 4, 5], ddof=1) / 5 ** 0.5, rel=1e-3)
    assert lo == pytest.approx(2 * m - hi)
    rows = [{"method": "base", "target": "a", "seed": 0, "steps": 40, "esr": 0.0},
            {"method": "m", "target": "a", "seed": 0, "steps": 10, "esr": 0.5},
            {"method": "m", "target": "a", "seed": 0, "steps": 20, "esr": 1.0}]
    assert stats.steps_to_esr(rows, "m", "a", 0, 0.95) == pytest.approx(19.0)
    assert stats.steps_to_esr(rows, "m", "a", 0, 0.25) == pytest.approx(5.0)
    assert stats.steps_to_esr(rows[:2], "m", "a", 0, 0.95) is None
    assert stats.esr_after(rows, "m", "a", 0, 20) == 1.0 and stats.esr_after(rows, "m", "a", 0, 30) is None


def test_trajectory_section_applies_the_fixed_margins():
    """A bank that equals the student passes; a bank 1.5 points worse in PSR-near on average,
    with an interval reaching below the -2 margin, or 10 points worse in final ESR (beyond -5)
    is not non-inferior.
    Mutation checked: the margin's sign flipped, or the interval's upper end tested, passes the
    worse bank and the test fails."""
    rng = np.random.default_rng(3)
    targets, seeds = ["a", "b", "c", "d", "e"], [0, 1, 2]
    rows = _curves(rng, ["esd"], targets, seeds)
    for r in rows:
        r["psr_far"] = r["psr_near"]

    def with_bank(near_shift=0.0, esr_shift=0.0, sd=0.002):
        bank = []
        for r in rows:
            if r["method"] == "esd":
                b = dict(r, method="esd_bank", psr_near=r["psr_near"] + near_shift + float(rng.normal(0, sd)))
                if r["steps"] == 40:
                    b["esr"] = r["esr"] + esr_shift
                bank.append(b)
        return rows + bank

    same = report.trajectory_section(with_bank(), ["base", "esd", "esd_bank"], targets, seeds, 40)
    assert any(line.startswith("| esd_bank − esd |") and line.endswith("| yes |") for line in same)
    assert "* **bank**: non-inferior (3 of 3 comparisons pass; 15 (target, seed) curves of 15 run)." in same
    worse = report.trajectory_section(with_bank(near_shift=-0.015, sd=0.02), ["base", "esd", "esd_bank"],
                                      targets, seeds, 40)
    cell = [line for line in worse if line.startswith("| esd_bank − esd |")][0].split(" | ")[1]
    mean, lo, hi = (float(x) for x in cell.replace("[", "").replace(",", "").replace("]", "").split()[:3])
    assert lo < -2 < hi and mean < 0  # the margin inside the interval: not shown non-inferior
    assert any(line.startswith("| esd_bank − esd |") and line.endswith("| no |") for line in worse)
    assert any(line.startswith("* **bank**: not shown non-inferior") for line in worse)
    erases_less = report.trajectory_section(with_bank(esr_shift=-0.1), ["base", "esd", "esd_bank"],
                                            targets, seeds, 40)
    assert any(line.startswith("* **bank**: not shown non-inferior") for line in erases_less)
    assert any("| -10.0 [-10.0, -10.0] (15) | no |" in line for line in erases_less)
