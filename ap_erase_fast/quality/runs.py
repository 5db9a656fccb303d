"""One erasure judged at its step budgets: the methods compared, the settings every erasure
shares, :func:`run_one` (erase, then generate, classify and score after each budget) and the
identity of a finished run (:func:`_key`) by which an interrupted table resumes and an ablation
borrows its controls."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..search import draw_distribution
from .metrics import PI_MEASURE, score
from .worlds import (
    EVAL_GUIDANCE,
    EVAL_STEPS,
    WORLDS,
    World,
    eval_prompts,
    oracle_set,
    world_of,
)

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
# The trajectory sources (--trajectories) of ESD, the random control and AP faithful: "<method>"
# samples with the model being trained (student), "<method>_base" with the frozen base model,
# "<method>_bank" reads a bank of base-model trajectories (M = BANK_SIZE, built once per
# (target, seed) and shared by the three methods through a bank file).
TRAJECTORY_METHODS = ("esd", "preserve_random", "ap_faithful")
BANK_SIZE = 4
for _m in TRAJECTORY_METHODS:
    for _source in ("base", "bank"):
        METHODS[f"{_m}_{_source}"] = {**METHODS[_m], "trajectories": _source}
# Spending the bank's savings (--preserve-draws): "<method>_bank_draws<K>" averages θ′'s
# preservation term over K candidates per sample, on the same bank as "<method>_bank".
PRESERVE_DRAWS = 8
for _m in ("preserve_random", "ap_faithful"):
    METHODS[f"{_m}_bank_draws{PRESERVE_DRAWS}"] = {**METHODS[f"{_m}_bank"], "preserve_draws": PRESERVE_DRAWS}
# Search settings an ablation may change for every AP method (None: the EraseConfig default).
ABLATIONS = {"tau": float, "gumbel_mode": str, "gumbel_topk": int, "pgd_steps": int, "num_centers": int}
# Settings every erasure shares (the rest are EraseConfig defaults or flags of this command).
COMMON = dict(ddim_steps=25, start_guidance=3.0,
              k_closest=200, num_centers=60, exclude_erased=True, device="cpu", quiet=True,
              mixed_precision="no")


def eps_measures_for(world: World, unet, target: str, seed: int, steps: int = EVAL_STEPS) -> dict:
    """ε-space drift of the erased prompt and of the kept prompts (``ap-erase eval``'s measures)."""
    from ..concepts import encode_prompts
    from ..eval.eps import EpsSettings, eps_measures
    from ..shapes.sample import _prefix

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
        if eps and not world.flow:  # the ε-space measures (a third of the judging) of the
            # full-length erasure only; DDIM ε measures: not defined for a velocity model
            out.update(eps_measures_for(world, unet, target, seed, args.eval_steps))
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        return out, images

    if METHODS[method] is None:
        return [judge(world.base_unet, {})]
    extra = dict(METHODS[method])
    if extra.get("trajectories") == "bank":  # one bank per (target, seed), shared by the methods
        extra.update(bank_size=BANK_SIZE, bank_file=str(
            Path(getattr(args, "out_dir", None) or args.out or ".") / ".banks" / f"{world.model}-{target}-seed{seed}-m{BANK_SIZE}.safetensors"))
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
        w.assert_held_out(prompts, er.search.sets[0].words)
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
    prob = draw_distribution(er.search.pi[0], cfg.gumbel_mode, cfg.tau, cfg.gumbel_topk).float()
    words = er.search.sets[0].words
    top = torch.argsort(prob, descending=True)[:5].tolist()
    out = {"pi_top": {words[i]: round(float(prob[i]), 4) for i in top}, "pi_uniform": round(1.0 / len(prob), 4),
           "pi_measure": PI_MEASURE, "pi_logits": [round(float(v), 5) for v in er.search.pi[0].detach().float()],
           "pi_mass": {}, "r_share": {}}
    for name in (*w.SHAPES, *w.COLOURS):
        sel = [i for i, word in enumerate(words) if name in word.split()]
        if sel:
            out["pi_mass"][name] = round(float(prob[sel].sum()), 4)
            out["r_share"][name] = round(len(sel) / len(words), 4)
    out.update(train_s=round(er.timings["train_s"], 2), r_size=len(words),
               picks=dict(sorted(picks.items(), key=lambda kv: -kv[1])),
               unet_evals_per_step=round(sum(er.models.calls.values()) / max(1, steps), 1))
    return out


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
