"""The instrument's statistics, pure functions of result rows: PSR at matched erasure (linear
interpolation along each (target, seed) curve), paired differences between two methods on the same
curves, the two-sided exact sign test, the Holm-Bonferroni adjustment and t-intervals of paired
means."""
from __future__ import annotations

import math
import statistics

MATCHED_ESR = (0.8, 0.95)  # the ESR levels at which PSR is read (and methods are paired)


def psr_at_esr(points: list[tuple[float, float]], level: float) -> float | None:
    """PSR where a curve of (ESR, PSR) points, ordered from the weakest erasure to the strongest,
    first reaches ``level`` ESR, linearly interpolated between the two points around that
    crossing. ``None`` when the curve never reaches the level, or is above it already at its
    weakest point (nothing is extrapolated). A curve that is not monotone (a stronger setting
    that erases less) is followed as it is: the first crossing counts."""
    if not points or points[0][0] > level:
        return None
    if points[0][0] == level:
        return points[0][1]
    for (e0, p0), (e1, p1) in zip(points, points[1:]):
        if e0 < level <= e1:
            return p0 + (p1 - p0) * (level - e0) / (e1 - e0)
    return None


def _point(r: dict) -> tuple:
    """Where a row sits on its method's curve, weakest first: by lr × steps (how far Adam's
    constant-size steps can take the weights), then by lr."""
    return (r["lr"] * r.get("steps", 1), r["lr"])


def matched_by_curve(rows: list[dict], method: str, targets: list[str], seeds: list[int],
                     level: float, metric: str = "psr") -> dict[tuple[str, int], float | None]:
    """``metric`` (PSR, or PSR-near / PSR-far) at ``level`` ESR on each (target, seed) curve of
    ``method`` over its erasures, the weakest first (:func:`_point`: a learning-rate sweep, step
    budgets judged on the way, or both), by (target, seed); ``None`` where the curve does not
    reach the level, no entry where there is no curve. The base model's row of the same target
    and seed, where there is one, is the curve's first point: learning rate 0 leaves the base
    model, with the same evaluation images."""
    out: dict[tuple[str, int], float | None] = {}
    for t in targets:
        for s in seeds:
            own = sorted((r for r in rows if r["method"] == method and r["target"] == t and r["seed"] == s
                          and metric in r), key=_point)
            base = [r for r in rows if r["method"] == "base" and r["target"] == t and r["seed"] == s
                    and metric in r][:1] if method != "base" else []
            if not own or len({_point(r) for r in own}) + len(base) < 2:
                continue
            out[(t, s)] = psr_at_esr([(r["esr"], r[metric]) for r in base + own], level)
    return out


def matched_erasure(rows: list[dict], method: str, targets: list[str], seeds: list[int],
                    level: float, metric: str = "psr") -> tuple[list[float], int]:
    """The values of :func:`matched_by_curve` and how many curves did not reach the level."""
    by_curve = matched_by_curve(rows, method, targets, seeds, level, metric)
    return [v for v in by_curve.values() if v is not None], sum(v is None for v in by_curve.values())


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability of a split at least this uneven between wins
    and losses (ties left out) when either side is equally likely."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(rows: list[dict], method: str, against: str, targets: list[str], seeds: list[int],
                      level: float, metric: str) -> dict:
    """``method`` − ``against`` at ``level`` ESR on the same (target, seed) curves (the same
    evaluation images, the same near set): the mean difference, its standard error, wins / losses /
    ties, the sign test's p, and the curves compared (both reach the level)."""
    a = matched_by_curve(rows, method, targets, seeds, level, metric)
    b = matched_by_curve(rows, against, targets, seeds, level, metric)
    diffs = [a[k] - b[k] for k in a if k in b and a[k] is not None and b[k] is not None]
    eps = 1e-9
    wins, losses = sum(d > eps for d in diffs), sum(d < -eps for d in diffs)
    return {"n": len(diffs), "diffs": diffs, "mean": statistics.fmean(diffs) if diffs else None,
            "se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
            "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses, "p": sign_test(wins, losses)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): the k-th smallest of m is
    multiplied by m − k + 1, made monotone, and capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher expansion
    around the normal quantile; within 0.002 of the exact value for df >= 4)."""
    z = statistics.NormalDist().inv_cdf(p)
    v = float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * v ** 4))


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, lower, upper): the two-sided t-interval of the mean of ``values`` (None below 2)."""
    if len(values) < 2:
        return None
    m = statistics.fmean(values)
    half = t_quantile(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def steps_to_esr(rows: list[dict], method: str, target: str, seed: int, level: float) -> float | None:
    """The outer steps at which ``method``'s (target, seed) curve (the base model at 0 steps, then
    its step budgets) first reaches ``level`` ESR, linearly interpolated; None if it never does."""
    own = sorted((r for r in rows if r["method"] == method and r["target"] == target and r["seed"] == seed),
                 key=lambda r: r["steps"])
    base = [r for r in rows if r["method"] == "base" and r["target"] == target and r["seed"] == seed][:1]
    points = [(0, base[0]["esr"])] * bool(base) + [(r["steps"], r["esr"]) for r in own]
    if not own:
        return None
    if points[0][1] >= level:
        return float(points[0][0])
    for (s0, e0), (s1, e1) in zip(points, points[1:]):
        if e0 < level <= e1:
            return s0 + (s1 - s0) * (level - e0) / (e1 - e0)
    return None


def esr_after(rows: list[dict], method: str, target: str, seed: int, steps: int) -> float | None:
    """ESR of ``method``'s (target, seed) erasure after ``steps`` outer steps (None: no such row)."""
    for r in rows:
        if r["method"] == method and r["target"] == target and r["seed"] == seed and r["steps"] == steps:
            return r["esr"]
    return None
