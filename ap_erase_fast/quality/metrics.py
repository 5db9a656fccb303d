"""What a judged erasure scores, row by row: ESR and PSR from the classifier's labels
(:func:`score`), the near set of each target (the kept concepts plain ESD damages most) and the
PSR-near / PSR-far split, and where the search's π went relative to the near set."""
from __future__ import annotations

import dataclasses
import math
import statistics

from ..config import EraseConfig
from .worlds import world_of

# how a row's pi_top / pi_mass were measured: 2 = the draw distribution of the mode in use
# (draw_distribution). Rows without the key were measured as softmax(π/τ), which is not what a
# hard draw uses; the reports leave those out.
PI_MEASURE = 2
# the Gumbel-Softmax temperature of every run that does not ablate it
COMMON_TAU = {f.name: f.default for f in dataclasses.fields(EraseConfig)}["tau"]
NEAR_K = {"shape": 3, "colour": 2}  # size of the near set: shapes / colours ESD damages most


def score(target: str, pred_s, pred_c, want_s, want_c, model: str = "shapes") -> dict:
    """ESR, PSR, per-concept accuracy and what the target's images became."""
    w = world_of(model)
    if target in w.SHAPES:
        names, pred, want = w.SHAPES, pred_s, want_s
    else:
        names, pred, want = w.COLOURS, pred_c, want_c
    ti = names.index(target)
    acc = {n: float((pred[want == i] == i).float().mean()) for i, n in enumerate(names)}
    became = {n: int((pred[want == ti] == i).sum()) for i, n in enumerate(names)}
    others = [acc[n] for n in names if n != target]
    out = {"esr": 1.0 - acc[target], "psr": sum(others) / len(others), "acc": acc, "became": became}
    if target not in w.SHAPES:  # the shapes of the colour prompts should survive a colour erasure
        out["shape_acc"] = float((pred_s == want_s).float().mean())
    return out


def near_sets(rows: list[dict], targets: list[str], lr: float, model: str = "shapes",
              k: int | None = None, steps: int | None = None) -> dict:
    """Per target, the near set: the ``k`` kept concepts (default :data:`NEAR_K`) whose accuracy
    plain ESD erasure (λ = 0, at the main learning rate ``lr`` and, when given, after ``steps``
    outer steps) lowers most against the base model, averaged over the seeds run. Targets without both base and esd rows are left out."""
    w = world_of(model)
    out = {}
    for t in targets:
        base = [r for r in rows if r["method"] == "base" and r["target"] == t]
        esd = [r for r in rows if r["method"] == "esd" and r["target"] == t and r["lr"] == lr
               and (steps is None or r["steps"] == steps)]
        if not base or not esd:
            continue
        names = [n for n in base[0]["acc"] if n != t]
        dmg = {n: statistics.fmean(r["acc"][n] for r in base) - statistics.fmean(r["acc"][n] for r in esd)
               for n in names}
        kk = k or NEAR_K["shape" if t in w.SHAPES else "colour"]
        near = sorted(names, key=lambda n: (-dmg[n], names.index(n)))[:kk]
        out[t] = {"near": near, "damage": {n: round(dmg[n], 4) for n in names},
                  "esd_seeds": sorted(r["seed"] for r in esd), "lr": lr}
    return out


def add_near_far(rows: list[dict], sets: dict) -> None:
    """``psr_near`` / ``psr_far``: mean accuracy over the target's near set / over the other kept
    concepts, added to every row whose target has a near set."""
    for r in rows:
        ns = sets.get(r["target"])
        if ns is None:
            continue
        far = [n for n in r["acc"] if n != r["target"] and n not in ns["near"]]
        r["psr_near"] = statistics.fmean(r["acc"][n] for n in ns["near"])
        r["psr_far"] = statistics.fmean(r["acc"][n] for n in far)


def _is_main(r: dict, lr: float, steps: int | None = None) -> bool:
    """A row of the main setting: the base model, or an erasure at ``lr`` (and ``steps``)."""
    return r["method"] == "base" or (r["lr"] == lr and (steps is None or r["steps"] == steps))


def _near_share(counts: dict[str, float], near: list[str]) -> float:
    """The share of ``counts`` (candidate → count) whose candidate names a near concept."""
    return sum(v for k, v in counts.items() if any(n in k.split() for n in near)) / max(1, sum(counts.values()))


def logit_gap(row: dict) -> float | None:
    """π₁ − π₅ of a row: from its logits where recorded, else from its top 5 as recorded before
    (softmax(π/τ): π₁ − π₅ = τ·ln(q₁/q₅), exact up to the 4-digit rounding). ``None`` when the
    row holds neither."""
    if row.get("pi_logits"):
        top = sorted(row["pi_logits"], reverse=True)
        return top[0] - top[4] if len(top) >= 5 else None
    q = sorted((row.get("pi_top") or {}).values(), reverse=True)
    if len(q) < 5 or q[4] <= 0:
        return None
    tau = (row.get("ablation") or {}).get("tau", COMMON_TAU)
    return tau * math.log(q[0] / q[4])


def search_stats(rows, sets) -> dict | None:
    """Per row of one method (targets with a near set and a recorded R): the share of its draws
    that name a near concept, the near set's share of R and, for AP methods (the others' π never
    moves), the near share of π's top 5 and π₁ − π₅ (:func:`logit_gap`), and, where the row
    recorded π's draw distribution (``pi_measure``), π's mass on the near set and its peak over
    uniform. ``None`` when no row qualifies."""
    rs = [r for r in rows if r["target"] in sets and r.get("r_share")]
    if not rs:
        return None
    out = {"draws": [], "mass": [], "share": [], "top": [], "peak": [], "gap": []}
    for r in rs:
        near = sets[r["target"]]["near"]
        if r.get("picks"):
            out["draws"].append(_near_share(r["picks"], near))
        out["share"].append(sum(r["r_share"].get(n, 0.0) for n in near))
        if r["method"].startswith("ap_"):
            named = [any(n in k.split() for n in near) for k in r["pi_top"]]
            out["top"].append(sum(named) / len(named))
            gap = logit_gap(r)
            if gap is not None:
                out["gap"].append(gap)
            if r.get("pi_measure") == PI_MEASURE:
                out["mass"].append(sum(r["pi_mass"].get(n, 0.0) for n in near))
                out["peak"].append(max(r["pi_top"].values()) / r["pi_uniform"])
    return out
