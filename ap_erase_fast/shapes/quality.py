"""``ap-erase bench quality``: erasure and preservation measured end to end on ShapesWorld.

For every target (each shape in turn, and one colour), every method and every seed, the built-in
``shapes`` model is erased with the same step budget, then images are generated from fixed
seeds (paired across methods) and labelled by the shipped classifier:

* shape target S: 'a <shape>' prompts, ``--images`` per shape. ESR = share of 'a S' images not
  classified S; PSR = mean over the other five shapes of the share classified correctly.
* colour target C: 'a <colour> <shape>' prompts for all 36 pairs. ESR = share of 'a C <shape>'
  images whose colour is not C; PSR = mean over the other colours of colour accuracy.

Also recorded: what the erased concept's images became (label histogram), the ε-space measures
of ``ap-erase eval`` (drift of the erased and of the kept prompts), the size of R and the
preserved concepts drawn, and the training time. Methods (all xattn, same steps, lr, batch):

* ``base`` — the model as shipped;
* ``esd`` — negative-guidance erasure without preservation (λ = 0);
* ``preserve_null`` — preservation of the fixed neutral prompt "" (R = {""});
* ``preserve_random`` — preservation of a uniformly random member of R each sample, at the cost
  of the shared schedule (the control that tells whether the search itself pays off);
* ``ap_faithful`` — AP, the authors' alternating loop;
* ``ap_shared`` — AP, the shared schedule;
* ``oracle`` — preservation of the measured near set (the kept concepts plain ESD damages most),
  drawn uniformly: an upper bound for any search over R (runs after the target's base and esd);
* ``ap_normalised`` — AP faithful with ``--search-score normalised``;
* ``ap_topk`` — AP faithful preserving a mixture of π's top-k candidates (``--gumbel-mode topk``);
* ``ap_score`` — AP faithful whose π follows the score-function estimate of the gradient of the
  expected preservation error over the hard draw (``--search-estimator score``).

``--model shapes2`` judges on ShapesWorld 2's held-out prompts ("an image of a ..."; asserted
out of R in every run) and splits PSR into PSR-near (the near set) and PSR-far (the rest); the
ablation flags (``--tau``, ``--gumbel-mode``, ``--pgd-steps``, ``--num-centers``) change the
search of every AP run (``ap_*``; the controls keep their settings and are not re-run) and become
part of each row's identity.

``--budgets`` judges every erasure also after fewer steps on the way (exactly a shorter run), and
``--sweep-lrs`` adds runs at other learning rates (``--sweep-targets``, ``--sweep-seeds``): the
points of each (target, seed) curve, from the base model to the strongest erasure, on which PSR
is read at matched erasure (ESR 80 % and 95 %) and ESR is plotted against PSR per method. Everything goes to ``--out DIR`` as
``quality_<tag>.{jsonl,csv,md}``, ``quality_<tag>_sweep.png`` and ``quality_<tag>_grid.png``
(default: a new ``bench-quality-<date-time>`` folder under the current one; the committed
report is regenerated with ``--out benchmarks/results``). Finished runs are read back from the
jsonl, so an interrupted benchmark resumes when it is given the same ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..config import TRAIN_METHODS, EraseConfig
from ..search import draw_distribution
from .loading import WORLDS, world_of
from .world import SHAPES

# how a row's pi_top / pi_mass were measured: 2 = the draw distribution of the mode in use
# (draw_distribution). Rows without the key were measured as softmax(π/τ), which is not what a
# hard draw uses; the reports leave those out.
PI_MEASURE = 2
# the Gumbel-Softmax temperature of every run that does not ablate it
COMMON_TAU = {f.name: f.default for f in dataclasses.fields(EraseConfig)}["tau"]

METHODS: dict[str, dict | None] = {
    "base": None,
    "esd": {"preserve_weight": 0.0, "schedule": "shared"},
    "preserve_null": {"preserve_set": [""], "schedule": "shared"},
    "preserve_random": {"search": "random", "schedule": "shared"},
    "ap_faithful": {"schedule": "faithful"},
    "ap_shared": {"schedule": "shared"},
    # preserve the measured near set (R = the near concepts' training captions, drawn uniformly):
    # an upper bound on what any search over R can reach; needs the target's esd runs first
    "oracle": {"search": "random", "schedule": "shared"},
    # AP faithful whose search ascends each candidate's damage divided by its own base signal
    "ap_normalised": {"schedule": "faithful", "search_score": "normalised"},
    # AP faithful preserving a mixture of π's most likely candidates instead of one draw
    "ap_topk": {"schedule": "faithful", "gumbel_mode": "topk"},
    # AP faithful whose π follows the score-function estimate of ∇ E_k[ℓ(k)] over the hard draw
    "ap_score": {"schedule": "faithful", "search_estimator": "score"},
}
# Search settings an ablation may change for every AP method (None: the EraseConfig default).
ABLATIONS = {"tau": float, "gumbel_mode": str, "gumbel_topk": int, "pgd_steps": int, "num_centers": int}
DEFAULT_TARGETS = list(SHAPES) + ["red"]
NEAR_K = {"shape": 3, "colour": 2}  # size of the near set: shapes / colours ESD damages most
# Settings every erasure shares (the rest are EraseConfig defaults or flags of this command).
COMMON = dict(ddim_steps=25, start_guidance=3.0,
              k_closest=200, num_centers=60, exclude_erased=True, device="cpu", quiet=True,
              mixed_precision="no")
EVAL_STEPS, EVAL_GUIDANCE = 25, 5.0
# --quick: small, but a visible erasure (ESR well above the base model's) in about a minute
QUICK = dict(targets=["circle"], seeds=[0], steps=12, lr=4e-3, images=8,
             methods=["base", "esd", "preserve_random", "ap_shared"], sweep_lrs=[])


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class World:
    """The base model, its text encoder and VAE, and the classifier, loaded once."""

    def __init__(self, model: str = "shapes"):
        from ..models import load_components
        from .loading import shipped_dir
        from .train import load_classifier

        self.model = model
        self.comps = load_components(model)
        self.base_unet = self.comps.unet
        self.classifier = load_classifier(os.path.join(shipped_dir(model), "classifier.safetensors"))

    def components_for_run(self):
        """A components object whose UNet is a fresh copy of the base (the engine trains it)."""
        return dataclasses.replace(self.comps, unet=copy.deepcopy(self.base_unet))

    def generate(self, unet, prompts, seeds, steps: int = EVAL_STEPS):
        from .sample import generate

        c = self.comps
        return generate(unet, c.text_encoder, c.tokenizer, c.vae, c.scheduler.config, prompts, seeds,
                        steps=steps, guidance=EVAL_GUIDANCE)


def eval_prompts(target: str, images: int, seed: int, model: str = "shapes"):
    """(prompts, seeds, shape index, colour index or -1) of the evaluation of ``target``: the
    world's evaluation prompts ('a <shape>' in ShapesWorld; the held-out 'an image of a <shape>'
    in ShapesWorld 2), ``images`` per shape, or per colour spread over the colour-shape pairs."""
    from .sample import labelled, pair_rows, shape_rows

    w, n = world_of(model), WORLDS[model]
    base = 7_919 * (seed + 1) * 100_000
    if target in w.SHAPES:
        return labelled(shape_rows(images, lambda si, j: base + si * 1_000 + j, world=n))
    per_pair = max(1, images // len(w.SHAPES))
    return labelled(pair_rows(per_pair, lambda si, ci, j: base + 50_000 + ci * 1_000 + si * 100 + j,
                              colour_major=True, world=n))


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


def eps_measures_for(world: World, unet, target: str, seed: int, steps: int = EVAL_STEPS) -> dict:
    """ε-space drift of the erased prompt and of the kept prompts (``ap-erase eval``'s measures)."""
    from ..concepts import encode_prompts
    from ..eval.eps import EpsSettings, eps_measures

    from .sample import _prefix

    c, w = world.comps, world_of(world.model)
    pre = _prefix(WORLDS[world.model])
    if target in w.SHAPES:
        prompts = [f"{pre} {s}" for s in w.SHAPES]
    else:
        prompts = [f"{pre} {col} square" for col in w.COLOURS]
    erased_i = [i for i, p in enumerate(prompts) if target in p.split()][0]
    cond = encode_prompts(c.text_encoder, c.tokenizer, prompts)
    uncond = encode_prompts(c.text_encoder, c.tokenizer, [""])
    size = world.base_unet.config.sample_size
    m = eps_measures(world.base_unet, unet, cond, uncond, c.scheduler,
                     (world.base_unet.config.in_channels, size, size),
                     EpsSettings(seeds=(seed, seed + 1), ddim_steps=steps, num_timesteps=5,
                                 guidance=EVAL_GUIDANCE))
    kept = [d for i, d in enumerate(m["drift"]) if i != erased_i]
    return {"drift_erased": m["drift"][erased_i], "drift_kept": sum(kept) / len(kept),
            "gap_erased": m["gap_erased"][erased_i], "gap_base": m["gap_base"][erased_i]}


def oracle_set(model: str, target: str, near: list[str]) -> list[str]:
    """The oracle's R: training captions of the near concepts (members of the vocabulary, never
    evaluation prompts): 'a <shape>' per near shape, 'a <colour> <shape>' over every shape per
    near colour."""
    w = world_of(model)
    if target in w.SHAPES:
        return [f"a {s}" for s in near]
    return [f"a {c} {s}" for c in near for s in w.SHAPES]


def run_one(world: World, target: str, method: str, seed: int, args, lr: float,
            near: list[str] | None = None) -> list[tuple[dict, torch.Tensor]]:
    """Erase ``target`` with ``method`` (the base model: nothing) and judge it: one (row, images)
    per step budget of ``args.budgets`` below ``args.steps`` (the same erasure, evaluated on the
    way, then continued) and one for ``args.steps``, the last."""
    from ..config import EraseConfig
    from ..engine import Eraser

    t0 = time.perf_counter()
    w = world_of(world.model)
    prompts, seeds, want_s, want_c = eval_prompts(target, args.images, seed, world.model)
    row = {"model": world.model, "target": target, "method": method, "seed": seed, "lr": lr, "steps": args.steps,
           "batch_size": args.batch_size, "loss_space": args.loss_space, "search_lr": args.search_lr,
           "preserve_weight": args.preserve_weight, "images": args.images, "eval_steps": args.eval_steps,
           "train_method": args.train_method, "lora_rank": args.lora_rank,
           "ablation": _ablation(vars(args)) if method.startswith("ap_") else {}}

    def judge(unet, extra, eps: bool = True):
        images = world.generate(unet, prompts, seeds, args.eval_steps)
        pred_s, pred_c, _, _ = world.classifier.predict(images)
        out = {**row, **extra}
        out.update(score(target, pred_s, pred_c, want_s, want_c, world.model))
        if eps:  # the ε-space measures (a third of the judging) of the full-length erasure only
            out.update(eps_measures_for(world, unet, target, seed, args.eval_steps))
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        return out, images

    if METHODS[method] is None:
        return [judge(world.base_unet, {})]
    extra = dict(METHODS[method])
    if method == "oracle":
        extra["preserve_set"] = oracle_set(world.model, target, near)
        row["near"] = list(near)
    cfg = EraseConfig(**{**COMMON, "model": world.model, "erase": [target], "steps": args.steps, "lr": lr,
                         "batch_size": args.batch_size, "seed": seed,
                         "loss_space": args.loss_space, "search_lr": args.search_lr,
                         "preserve_weight": args.preserve_weight, "train_method": args.train_method,
                         "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                         **row["ablation"], **extra})
    comps = world.components_for_run()
    er = Eraser(cfg, progress=sys.stderr.isatty(), components=comps)
    er.setup()
    if hasattr(w, "assert_held_out"):  # ShapesWorld 2: no evaluation prompt is a member of R
        w.assert_held_out(prompts, er.sets[0].words)
    out = []
    for budget in [*budgets_below(args), args.steps]:
        er.train(until=budget)
        # the engine's own generator drives the erasure: judging on the way changes nothing of it
        out.append(judge(comps.unet.eval(), {"steps": budget, **_search_state(er, cfg, w, budget)},
                         eps=budget == args.steps))
        comps.unet.train()
    return out


def budgets_below(args) -> list[int]:
    """The step budgets judged inside each erasure before its last step."""
    return sorted({b for b in (args.budgets or []) if 0 < b < args.steps})


def _search_state(er, cfg, w, steps: int) -> dict:
    """What the search did so far: the draws, π's top candidates, π's mass and R's make-up per
    concept the candidates name, the training time."""
    picks: dict[str, int] = {}
    for rec in er.log:
        if rec["kind"] in ("outer", "shared"):
            for s in rec["samples"]:
                picks[s["adv_word"]] = picks.get(s["adv_word"], 0) + 1
    if cfg.preserve_weight == 0:  # nothing is preserved: the draws are unused
        picks = {}
    # where the search is: the expected weight of each candidate in the preserved c_a under the
    # draw in use (the hard draw: softmax(π), whatever τ), and π's logits themselves, so that any
    # other measure can be recomputed from the rows
    prob = draw_distribution(er.pi[0], cfg.gumbel_mode, cfg.tau, cfg.gumbel_topk).float()
    words = er.sets[0].words
    top = torch.argsort(prob, descending=True)[:5].tolist()
    out = {"pi_top": {words[i]: round(float(prob[i]), 4) for i in top}, "pi_uniform": round(1.0 / len(prob), 4),
           "pi_measure": PI_MEASURE, "pi_logits": [round(float(v), 5) for v in er.pi[0].detach().float()],
           "pi_mass": {}, "r_share": {}}
    for name in (*w.SHAPES, *w.COLOURS):
        sel = [i for i, word in enumerate(words) if name in word.split()]
        if sel:
            out["pi_mass"][name] = round(float(prob[sel].sum()), 4)
            out["r_share"][name] = round(len(sel) / len(words), 4)
    out.update(train_s=round(er.timings["train_s"], 2), r_size=len(words),
               picks=dict(sorted(picks.items(), key=lambda kv: -kv[1])),
               unet_evals_per_step=round(sum(er.calls.values()) / max(1, steps), 1))
    return out


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


MATCHED_ESR = (0.8, 0.95)


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
    return {"n": len(diffs), "mean": statistics.fmean(diffs) if diffs else None,
            "se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
            "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses, "p": sign_test(wins, losses)}


def _paired_cell(d: dict, adjusted: float | None = None) -> str:
    """``mean ± se (wins/losses/ties, p P)``; with ``adjusted``, also the Holm-adjusted p."""
    if not d["n"]:
        return "–"
    se = f" ± {100 * d['se']:.1f}" if d["se"] is not None else ""
    mean = 100 * d["mean"] if abs(d["mean"]) >= 5e-4 else 0.0  # no "-0.0"
    holm_p = f"; Holm {adjusted:.2g}" if adjusted is not None else ""
    return f"{mean:+.1f}{se} ({d['wins']}/{d['losses']}/{d['ties']}, p {d['p']:.2g}{holm_p})"


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


def _point(r: dict) -> tuple:
    """Where a row sits on its method's curve, weakest first: by lr × steps (how far Adam's
    constant-size steps can take the weights), then by lr."""
    return (r["lr"] * r.get("steps", 1), r["lr"])


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
            vals = [r[key] for r in main if r["method"] == m]
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
    world_name = "ShapesWorld" if args.model == "shapes" else "ShapesWorld 2"
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
        f"{max(1, args.images // len(shapes))} per colour-shape pair), DDIM {args.eval_steps} steps, CFG {EVAL_GUIDANCE}, "
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


def _near_share(counts: dict[str, float], near: list[str]) -> float:
    """The share of ``counts`` (candidate → count) whose candidate names a near concept."""
    return sum(v for k, v in counts.items() if any(n in k.split() for n in near)) / max(1, sum(counts.values()))


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


def _mean_curve(rows, method: str, points, metric: str = "psr") -> list[tuple[float, float, str]]:
    """(ESR, ``metric``, label) of ``method`` at each (lr, steps) point, averaged over ``rows``."""
    out = []
    for lr, st in points:
        rs = [r for r in rows if r["method"] == method and metric in r and r["lr"] == lr and r["steps"] == st]
        if rs:
            out.append((statistics.fmean(r["esr"] for r in rs), statistics.fmean(r[metric] for r in rs),
                        f"{lr:g}×{st}"))
    return out


def _plot_curves(ax, rows, args, points, metric: str, labels: bool) -> None:
    base = [r for r in rows if r["method"] == "base" and metric in r]
    if base:
        ax.scatter([statistics.fmean(r["esr"] for r in base)], [statistics.fmean(r[metric] for r in base)],
                   marker="*", s=120, color="black", label="base")
    for m in args.methods:
        pts = _mean_curve(rows, m, points, metric) if m != "base" else []
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            for x, y, text in pts if labels else ():
                ax.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")


def _plot_sweep(rows, args, points, path: Path) -> None:
    """PSR against ESR: one curve per method over the (lr, steps) points (mean over ``rows``),
    each point labelled lr×steps, the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    _plot_curves(ax, rows, args, points, "psr", labels=True)
    ax.set_xlabel("ESR (erased concept no longer recognised)")
    ax.set_ylabel("PSR (other concepts still recognised)")
    targets = sorted({r["target"] for r in rows})
    ax.set_title(f"{args.model}, targets {', '.join(targets) if len(targets) <= 4 else len(targets)}: "
                 "erasure strength (lr×steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _plot_near_far(rows, args, points, path: Path) -> None:
    """Two panels, PSR-near and PSR-far against ESR: one curve per method over the (lr, steps)
    points (mean over ``rows``), the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True, sharey=True)
    for ax, metric, title in zip(axes, ("psr_near", "psr_far"), ("PSR-near", "PSR-far")):
        _plot_curves(ax, rows, args, points, metric, labels=False)
        for lv in MATCHED_ESR:
            ax.axvline(lv, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("ESR (erased concept no longer recognised)")
        ax.set_ylabel(f"{title} (held-out prompts)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _save_grid(grid_images: dict, path: Path, per_prompt: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(grid_images)
    fig, axes = plt.subplots(len(names), 1, figsize=(6 * per_prompt, 1.1 * len(names) + 0.3))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        imgs, n = grid_images[name]
        pick = torch.cat([imgs[i * n: i * n + per_prompt] for i in range(len(imgs) // n)])
        strip = pick.permute(2, 0, 3, 1).reshape(pick.shape[2], -1, 3).numpy()
        ax.imshow(strip, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _environment(command: str) -> dict:
    from ..runtime import environment as bench_env

    env = bench_env("cpu")
    env["torch threads"] = str(torch.get_num_threads())
    env["command"] = command
    return env


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _key(target, method, seed, lr, settings) -> tuple:
    """What identifies a finished run (the base model's evaluation depends on none of the
    erasure settings but the evaluation ones)."""
    common = (settings.get("model") or "shapes", target, method, seed, settings["images"])
    if settings.get("eval_steps", EVAL_STEPS) != EVAL_STEPS:
        common += (("eval_steps", settings["eval_steps"]),)
    if method == "base":
        return common
    # π's learning rate moves only AP's search, λ only the methods that preserve: a control run is
    # the same run whatever they are (an ablation of them reuses it)
    key = common + (settings["steps"], lr, settings["batch_size"], settings["loss_space"],
                    settings["search_lr"] if method.startswith("ap_") else None,
                    settings["preserve_weight"] if method != "esd" else None,
                    settings.get("train_method", "xattn"), settings.get("lora_rank") or 0)
    ablation = _ablation(settings) if method.startswith("ap_") else {}
    return key + (tuple(sorted(ablation.items())),) if ablation else key


def _load_done(out: Path, tag: str) -> dict[tuple, dict]:
    """The rows already in the results folder (its results file and any shards'), by identity."""
    done = {}
    main_file = out / f"quality_{tag}.jsonl"
    for path in [main_file] * main_file.exists() + sorted(out.glob(f"quality_{tag}.shard*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[_key(r["target"], r["method"], r["seed"], r["lr"], r)] = r
    return done


def _ablation(settings) -> dict:
    """The search settings changed from their defaults (an args namespace's dict or a row)."""
    if "ablation" in settings:
        return dict(settings["ablation"] or {})
    return {k: settings[k] for k in ABLATIONS if settings.get(k) is not None}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ap-erase bench quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(WORLDS), default="shapes",
                    help="the built-in world: shapes (ShapesWorld) or shapes2 (ShapesWorld 2: held-out "
                         "evaluation prompts, PSR-near / PSR-far, the oracle method)")
    ap.add_argument("--targets", type=_names, default=None,
                    help="concepts to erase, one run each (shapes and/or colours); default: every "
                         "shape and red")
    ap.add_argument("--methods", type=_names, default=list(METHODS), help=f"of: {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="outer steps of every erasure")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--loss-space", choices=("x0", "eps"), default="x0")
    ap.add_argument("--search-lr", type=float, default=0.1,
                    help="Adam lr of π (AP methods); 0.1 because π gets as many updates as the "
                         "short budget has steps (the paper: 1e-2 over 1000 steps)")
    ap.add_argument("--preserve-weight", type=float, default=1.0,
                    help="λ of the methods that preserve (ESD has λ = 0)")
    ap.add_argument("--train-method", default="xattn", choices=TRAIN_METHODS,
                    help="parameters every erasure trains (as in train)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train LoRA adapters of this rank instead of the weights (0: full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    ap.add_argument("--images", type=int, default=24, help="evaluation images per shape prompt")
    ap.add_argument("--eval-steps", type=int, default=EVAL_STEPS,
                    help=f"DDIM steps of the evaluation images and ε measures (default {EVAL_STEPS})")
    abl = ap.add_argument_group("ablations (every erasure of the run; recorded per row and part of its identity)")
    abl.add_argument("--tau", type=float, default=None, help="Gumbel-Softmax temperature τ (default 2)")
    abl.add_argument("--gumbel-mode", choices=("hard", "soft", "topk"), default=None,
                     help="hard draw (default), soft mixture, or mixture of the top k")
    abl.add_argument("--gumbel-topk", type=int, default=None, help="k of --gumbel-mode topk (default 5)")
    abl.add_argument("--pgd-steps", type=int, default=None, help="P: loop iterations per outer step (default 2)")
    abl.add_argument("--num-centers", type=int, default=None,
                     help=f"|R| bound: k-means centres over the k closest (default {COMMON['num_centers']})")
    ap.add_argument("--budgets", type=_ints, default=[],
                    help="step budgets below --steps at which every erasure is also judged (it then "
                         "continues, exactly as without): points of its ESR-PSR curve for the price "
                         "of their evaluation, e.g. 10,20")
    ap.add_argument("--sweep-lrs", type=_floats, default=[], help="extra learning rates for the ESR-PSR plot")
    ap.add_argument("--sweep-targets", type=_names, default=["circle"])
    ap.add_argument("--sweep-seeds", type=_ints, default=[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None,
                    help="results folder (default: a new bench-quality-<date-time> folder under "
                         "the current one; give the same folder again to resume or to collect "
                         "shards; --out benchmarks/results regenerates the committed report)")
    ap.add_argument("--tag", default=None,
                    help="file name stem after 'quality_' (default: shapes_cpu, shapes_quick "
                         "with --quick)")
    ap.add_argument("--controls-from", type=_names, default=[], metavar="TAG[,TAG]",
                    help="reuse the finished runs of these tags in the same --out folder (copied into "
                         "this tag's results): an ablation then re-runs only what it changes, e.g. "
                         "--tag shapes2_tau1 --tau 1 --controls-from shapes2_cpu")
    ap.add_argument("--near-sets", default=None, metavar="FILE",
                    help="take the near sets from this *_near.json of an earlier table instead of "
                         "measuring them from this table's esd runs (a confirmation on fresh seeds "
                         "keeps the sets it was planned with)")
    ap.add_argument("--confirm", default=None, metavar="METHOD:CONTROL",
                    help="add the pre-registered confirmation section: METHOD − CONTROL in PSR-near at "
                         "each matched ESR level, sign tests adjusted by Holm-Bonferroni over the levels")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the finished runs in --out and run nothing (runs not "
                         "finished are left out; the sample grid PNG already there is kept)")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="run only every N-th of the runs not yet finished, starting at I (0-based), "
                         "e.g. two processes started together with --threads 1 and --shard 0/2, 1/2; "
                         "a last run without --shard collects every shard's results, runs anything "
                         "left and writes the report")
    ap.add_argument("--quick", action="store_true",
                    help=f"a small real erasure in about a minute: target circle, seed 0, "
                         f"{QUICK['steps']} steps at lr {QUICK['lr']:g}, {QUICK['images']} images "
                         f"per shape, methods {', '.join(QUICK['methods'])}, no sweep (each "
                         f"setting can still be given)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    quick = parser.parse_known_args(argv)[0].quick
    # --quick: its settings stand in for the defaults (argparse keeps values already in the
    # namespace unless their flag is given)
    args = parser.parse_args(argv, argparse.Namespace(**copy.deepcopy(QUICK)) if quick else None)
    args.tag = args.tag or (f"{args.model}_quick" if args.quick else f"{args.model}_cpu")
    w = world_of(args.model)
    if args.targets is None:
        args.targets = list(w.SHAPES) + ["red"]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    bad = [t for t in args.targets + args.sweep_targets if t not in w.SHAPES and t not in w.COLOURS]
    if bad:
        raise UserError(f"unknown target(s) {', '.join(bad)}; --model {args.model} has the shapes "
                        f"{', '.join(w.SHAPES)} and the colours {', '.join(w.COLOURS)}")
    if "oracle" in args.methods and not {"base", "esd"} <= set(args.methods):
        raise UserError("the oracle preserves the near set that esd measures against base: "
                        "--methods needs base and esd with oracle")
    if args.steps < 1 or args.images < 1 or args.batch_size < 1 or args.eval_steps < 1:
        raise UserError("--steps, --images, --eval-steps and --batch-size must be at least 1")
    if any(not 0 < b < args.steps for b in args.budgets):
        raise UserError(f"--budgets must lie between 1 and --steps - 1 ({args.steps - 1}); got "
                        f"{','.join(map(str, args.budgets))}")
    if args.lora_rank < 0 or (args.lora_alpha is not None and not args.lora_alpha > 0):
        raise UserError("--lora-rank must be 0 (full fine-tuning) or positive, and --lora-alpha positive")
    if args.near_sets:
        try:
            fixed = json.loads(Path(args.near_sets).read_text())
            assert isinstance(fixed, dict) and all(isinstance(v.get("near"), list) for v in fixed.values())
        except (OSError, ValueError, AssertionError, AttributeError) as exc:
            raise UserError(f"--near-sets {args.near_sets}: not a near-set file written by an earlier "
                            f"table (quality_<tag>_near.json): {exc}") from None
    if args.confirm:
        pair = args.confirm.split(":")
        if len(pair) != 2 or any(m not in args.methods for m in pair):
            raise UserError(f"--confirm must be METHOD:CONTROL with both in --methods (got {args.confirm!r})")
    if args.report_only and args.shard:
        raise UserError("--report-only writes the report of every shard's runs: leave out --shard")
    shard = None
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise UserError(f"--shard must look like I/N with 0 <= I < N (got {args.shard!r})") from None
        shard = (i, n)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..runtime import new_results_dir

    out = Path(args.out) if args.out else new_results_dir("quality")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / (f"quality_{args.tag}.jsonl" if shard is None else f"quality_{args.tag}.shard{shard[0]}of{shard[1]}.jsonl")
    grid_dir = out / f".quality_{args.tag}_grid"  # sample images of the grid, for the report
    done = _load_done(out, args.tag)
    borrowed = {}  # finished runs of --controls-from tags that this tag lacks
    for other in args.controls_from:
        theirs = _load_done(out, other) if other != args.tag else {}
        if not theirs:
            raise UserError(f"--controls-from {other}: no finished runs of that tag in {out} "
                            f"(quality_{other}.jsonl or its shards)")
        borrowed.update({k: r for k, r in theirs.items() if k not in borrowed})
    if shard is None:  # collect the shards' results into the one results file
        shards = sorted(out.glob(f"quality_{args.tag}.shard*.jsonl"))
        if shards:
            tmp = raw.with_name(raw.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
            os.replace(tmp, raw)
            for path in shards:
                path.unlink()
    command = "ap-erase bench quality " + " ".join(argv)
    jobs = [(t, m, s, args.lr) for s in args.seeds for t in args.targets for m in args.methods]
    jobs += [(t, m, s, lr) for lr in args.sweep_lrs if lr != args.lr for s in args.sweep_seeds
             for t in args.sweep_targets for m in args.methods if m != "base"]
    # the oracle runs last: its R is the near set the target's base and esd runs measure
    jobs.sort(key=lambda j: j[1] == "oracle")

    def keys(t, m, s, lr):
        """The identities of a job's rows: one per step budget (the base model: one)."""
        steps = [args.steps] if METHODS[m] is None else [*budgets_below(args), args.steps]
        return [_key(t, m, s, lr, {**vars(args), "steps": b}) for b in steps]

    def finished(t, m, s, lr):
        """Whether a job has nothing left to do: its rows are in (this tag's or a --controls-from
        tag's), and so is its sample grid where the report shows one (a borrowed run is not re-run
        for this tag's grid)."""
        ks = keys(t, m, s, lr)
        if not all(k in done or k in borrowed for k in ks):
            return False
        want_grid = t == args.targets[0] and s == args.seeds[0] and lr == args.lr
        return not want_grid or (grid_dir / f"{m}.pt").exists() or any(k in borrowed for k in ks)

    if shard is not None:
        # every N-th of the jobs still to run, so that a resumed table splits evenly (shards
        # started together see the same finished runs; the collecting run picks up any leftover)
        jobs = [j for j in jobs if not finished(*j)][shard[0]::shard[1]]
    todo = sum(not finished(*j) for j in jobs)

    def oracle_needs(t):
        """The runs whose near set the oracle of ``t`` preserves: base and esd of every seed."""
        return {f"{mm} seed {ss}": _key(t, mm, ss, args.lr, vars(args)) for ss in args.seeds for mm in ("base", "esd")}

    # the oracle's near set comes from runs finished before it (in this process, which runs
    # the oracle last, or earlier): one shard cannot wait for another's
    own = {k for j in jobs for k in keys(*j)}
    for t in dict.fromkeys(t for t, m, _, _ in jobs if m == "oracle"):
        lacking = [name for name, k in oracle_needs(t).items() if k not in done and k not in borrowed
                   and k not in own]
        if lacking:
            raise UserError(f"the oracle for {t} needs the base and esd runs of {t} at lr {args.lr:g} for every "
                            f"seed (missing: {', '.join(lacking)}); run the other methods first (every shard), "
                            "then the oracle")
    budgets = budgets_below(args)
    _log(f"{len(jobs)} runs ({len(jobs) - todo} already in {raw.name}), {args.steps} steps each"
         + (f", judged also after {', '.join(map(str, budgets))}" if budgets else "") + f"; results in {out}")
    world = None
    rows = []
    t_all = time.perf_counter()
    with open(raw, "a") as fh:
        for i, (t, m, s, lr) in enumerate(jobs):
            ks = keys(t, m, s, lr)
            want_grid = t == args.targets[0] and s == args.seeds[0] and lr == args.lr
            grid_file = grid_dir / f"{m}.pt"
            if args.report_only and shard is None:
                rows += [done[k] if k in done else borrowed[k] for k in ks if k in done or k in borrowed]
                continue
            if finished(t, m, s, lr):
                for k in ks:
                    if k not in done:  # copied, so that this tag's results stand on their own
                        fh.write(json.dumps(borrowed[k]) + "\n")
                        done[k] = borrowed[k]
                rows += [done[k] for k in ks]
                continue
            near = None
            if m == "oracle":  # every seed's base and esd run are in by now (checked above)
                found = {**borrowed, **_load_done(out, args.tag), **done}
                known = [found[k] for k in oracle_needs(t).values()]
                near = near_sets(known, [t], args.lr, args.model, steps=args.steps)[t]["near"]
            if world is None:
                _log("loading the ShapesWorld model and its classifier")
                world = World(args.model)
            _log(f"{i + 1}/{len(jobs)} {t:>8} {m:<16} seed {s} lr {lr:g}: "
                 + ("generating and classifying images" if METHODS[m] is None else
                    f"erasing ({args.steps} steps), then generating and classifying images"))
            results = run_one(world, t, m, s, args, lr, near)
            row, images = results[-1]
            if want_grid:
                grid_dir.mkdir(exist_ok=True)
                per = args.images if t in w.SHAPES else max(1, args.images // len(w.SHAPES)) * len(w.SHAPES)
                torch.save({"images": images, "per_prompt": torch.tensor(per)}, grid_file)
            for k, (r, _) in zip(ks, results):
                if k not in done:
                    fh.write(json.dumps(r) + "\n")
                rows.append(done.get(k, r))
            fh.flush()
            _log(f"{i + 1}/{len(jobs)} {t:>8} {m:<16} seed {s} lr {lr:g}: ESR "
                 + " / ".join(f"{r['esr']:.2f}" for r, _ in results) + " PSR "
                 + " / ".join(f"{r['psr']:.2f}" for r, _ in results)
                 + (f" (after {', '.join(str(r['steps']) for r, _ in results)} steps)" if len(results) > 1 else "")
                 + f" ({row['wall_s']:.0f} s; {time.perf_counter() - t_all:.0f} s total)")
    if shard is not None:
        _log(f"shard {args.shard} done; run again without --shard to write the report")
        return 0
    grid = {}
    for m in args.methods:
        if (grid_dir / f"{m}.pt").exists():
            saved = torch.load(grid_dir / f"{m}.pt", weights_only=True)
            grid[m] = (saved["images"], int(saved["per_prompt"]))
    write_outputs(rows, args, _environment(command), grid, out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
