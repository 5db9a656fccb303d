"""Train ShapesWorld 2 flow (``shapes2-flow``): an SD3-shaped rectified-flow model on ShapesWorld 2,
on CPU, reusing the ShapesWorld 2 model's classifier, VAE and text encoder.

    python -m ap_erase_fast.shapes.train_flow --out runs/shapes2_flow --seed 0 [--ship ap_erase_fast/models/shapes2_flow]
    python -m ap_erase_fast.shapes.train_flow --out runs/shapes2_flow --benchmark-steps 20   (time a step, then stop)

``--shapes2 DIR`` (default: the shipped ShapesWorld 2 model) gives the classifier
(``classifier.safetensors``), the VAE (``vae/``), the text encoder that initialises the CLIP-L
slot (``text_encoder/`` or ``model/text_encoder/``) and, in a ``train --world 2`` work folder,
the encoded training set (``latents.safetensors``). Stages (each skipped when its output exists
in ``--out``, so an interrupted run resumes):

1. latents: the ``--images`` training images encoded once (unless DIR has them);
2. transformer: ``SD3Transformer2DModel`` and both CLIP encoders trained jointly on the
   rectified-flow objective (σ logit-normal through the scheduler's shift, target ε − x0), AdamW
   with warmup and cosine decay, EMA; captions drawn fresh each step, 10 % empty; the fp32
   ``StableDiffusion3Pipeline`` goes to ``--out/model``, the loss curve to ``curve.jsonl``;
3. eval: prompt following of the EMA weights as shipped (fp16-rounded): the pipeline's Euler
   sampler with CFG, scored by the classifier as ShapesWorld 2 is (``report.md``).

``--ship DIR`` writes the fp16 pipeline folder, the classifier, the curve and
``train_report.json`` into DIR (docs/SHAPESWORLD_FLOW.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

from . import flow_nets as fn
from .nets import world_module
from .train import _cpu_name, _log, drop_local_paths, encode_dataset, load_classifier, ema_step, warmup_cosine

WORLD = 2
DEFAULTS = dict(steps=10000, batch=64, lr=3e-4, warmup=500, layers=6, heads=6, head_dim=32, patch=2, images=60000,
                eval_per_shape=256, eval_steps=25, guidance=5.0)
PIPELINE_KEYS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class UsageError(Exception):
    """Bad command-line input: printed as one ``error:`` line, exit code 2."""


# --------------------------------------------------------------------------- the source model


def source_paths(src: str) -> dict:
    """Classifier, VAE, text encoder and (optional) latents of a ShapesWorld 2 folder (the shipped
    model or a ``train --world 2`` work folder)."""
    if not os.path.isdir(src):
        raise UsageError(f"--shapes2 {src!r} is not a folder")
    te = next((os.path.join(src, *p) for p in (("text_encoder",), ("model", "text_encoder"))
               if os.path.isfile(os.path.join(src, *p, "config.json"))), None)
    out = {"classifier": os.path.join(src, "classifier.safetensors"), "vae": os.path.join(src, "vae"),
           "text_encoder": te, "latents": os.path.join(src, "latents.safetensors")}
    missing = [name for name, path in (("classifier.safetensors", out["classifier"]),
                                       ("vae/config.json", os.path.join(out["vae"], "config.json")),
                                       ("text_encoder/config.json", te and os.path.join(te, "config.json")))
               if not path or not os.path.isfile(path)]
    if missing:
        raise UsageError(f"--shapes2 {src!r} is not a ShapesWorld 2 model or work folder: it lacks {', '.join(missing)}")
    info = json.loads(_safetensors_meta(out["classifier"]).get("info", "{}"))
    if info.get("world") != WORLD:
        raise UsageError(f"--shapes2 {src!r}: its classifier is not ShapesWorld 2's (world {info.get('world')!r})")
    if not os.path.isfile(out["latents"]):
        out["latents"] = None
    return out


def _safetensors_meta(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return fh.metadata() or {}


def load_vae(path):
    """The ShapesWorld 2 VAE in fp32 with ``shift_factor`` 0 (the SD3 pipeline adds it on decoding)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).to(torch.float32).eval()
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return vae


# --------------------------------------------------------------------------- training


class BatchSampler:
    """Training batches: latents z0 = (mean + std·e)·scaling_factor of random training images,
    fresh captions (10 % empty), noise ε and σ (:func:`flow_nets.sample_sigmas`), in this order
    from one seeded torch generator (latent draw, noise, σ) and one numpy generator (images,
    captions)."""

    def __init__(self, data: dict, scaling_factor: float, seed: int, batch: int, shift: float):
        self.data, self.sf, self.batch, self.shift = data, float(scaling_factor), batch, shift
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng([seed, 5])
        self.labels = [k for k in data if k not in ("mean", "std")]
        self.world = world_module(WORLD)

    def draw(self):
        d, b = self.data, self.batch
        idx = torch.from_numpy(self.rng.integers(0, len(d["mean"]), b))
        mean, std = d["mean"][idx], d["std"][idx]
        z0 = (mean + std * torch.randn(mean.shape, generator=self.gen)) * self.sf
        captions = self.world.draw_captions({k: d[k][idx].numpy() for k in self.labels}, self.rng)
        noise = torch.randn(z0.shape, generator=self.gen)
        sigma = fn.sample_sigmas(b, self.shift, self.gen)
        return z0, noise, sigma, captions


class CaptionIds:
    """Token ids of captions per tokenizer, each caption tokenized once (on first sight)."""

    def __init__(self, tokenizers):
        self.tokenizers, self.rows = tokenizers, {}

    def __call__(self, captions) -> dict:
        new = sorted({c for c in captions if c not in self.rows})
        if new:
            ids = fn.caption_ids(self.tokenizers, new)
            for i, c in enumerate(new):
                self.rows[c] = {k: v[i] for k, v in ids.items()}
        return {k: torch.stack([self.rows[c][k] for c in captions]) for k in self.tokenizers}


def train_flow(seed, data, scaling_factor, mods, tokenizers, *, steps, batch=64, lr=3e-4, warmup=500,
               ema_decay=0.999, shift=fn.SHIFT, curve=None, on_step=None):
    """Train ``mods`` (see :func:`flow_nets.build_modules`) in place; the EMA weights are copied
    into them at the end. ``on_step(step, loss)`` sees each step's loss. Returns the mean seconds
    per step (the first 5 steps left out when there are more than 10)."""
    torch.manual_seed(seed)
    named = fn.trained_parameters(mods)
    params = [p for _, p in named]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, steps))
    caption_ids = CaptionIds(tokenizers)
    sampler = BatchSampler(data, scaling_factor, seed, batch, shift)
    for key in PIPELINE_KEYS:
        mods[key].train()
    mods["text_encoder_3"].eval()
    t0 = time.time()
    stamps = []
    run_loss = None
    for step in range(steps):
        stamps.append(time.perf_counter())
        z0, noise, sigma, captions = sampler.draw()
        states, pooled = fn.encode_ids(mods, caption_ids(captions))
        loss = fn.flow_matching_loss(mods["transformer"], z0, noise, sigma, states, pooled)
        ema_step(loss, params, opt, sched, ema, ema_decay, step)
        value = loss.item()
        if on_step is not None:
            on_step(step, value)
        run_loss = value if run_loss is None else 0.98 * run_loss + 0.02 * value
        if curve is not None and (step % 50 == 0 or step == steps - 1):
            row = {"step": step, "loss": round(value, 5), "loss_ema": round(run_loss, 5),
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            if step % 250 == 0:
                _log(f"transformer step {step} loss {run_loss:.4f} ({row['elapsed_s']} s)")
    stamps.append(time.perf_counter())
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in mods.values():
        m.eval()
    skip = 5 if steps > 10 else 0
    return (stamps[-1] - stamps[skip]) / max(1, steps - skip)


# --------------------------------------------------------------------------- the pipeline folder


def save_pipeline(mods, tokenizers, vae, sched_cfg, folder, dtype=torch.float32):
    """Write the ``StableDiffusion3Pipeline`` folder (weights in ``dtype``) to ``folder``
    atomically (a ``.tmp`` sibling renamed into place)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    parts = {k: mods[k] for k in PIPELINE_KEYS}
    parts["vae"] = vae
    if dtype != torch.float32:  # cast copies: the caller's modules stay as they are
        parts = {k: copy.deepcopy(m).to(dtype) for k, m in parts.items()}
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_cfg), **parts,
                                    **tokenizers)
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    drop_local_paths(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_pipeline_parts(folder, fp16_weights=False):
    """(mods, tokenizers, vae, scheduler config) of a pipeline folder, fp32, eval mode; with
    ``fp16_weights`` the weights are rounded through fp16 first, as the shipped files are."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    mods = {k: getattr(pipe, k) for k in PIPELINE_KEYS}
    vae = pipe.vae
    for m in (*mods.values(), vae):
        if m.dtype != torch.float32:
            m.to(torch.float32)
        m.eval()
    if fp16_weights:
        with torch.no_grad():
            for m in (*mods.values(), vae):
                for p in m.parameters():
                    p.copy_(p.half().float())
    tokenizers = {k: getattr(pipe, k) for k in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    return mods, tokenizers, vae, dict(pipe.scheduler.config)


# --------------------------------------------------------------------------- prompt following


def prompt_following(mods, tokenizers, vae, sched_cfg, clf, *, per_shape, per_pair, seed=0, steps=25,
                     guidance=5.0, batch_size=64):
    """ShapesWorld 2's prompt-following scores (``shapes.sample.prompt_following``: the same
    prompts, seeds and classifier), images made by the SD3 pipeline's sampler."""
    from .sample import _prefix, labelled, pair_rows, shape_rows

    w = world_module(WORLD)
    base = seed * 1_000_003
    prompts, seeds, want_s, want_c = labelled([
        *shape_rows(per_shape, lambda si, j: base + si * 1000 + j, world=WORLD),
        *pair_rows(per_pair, lambda si, ci, j: base + 500_000 + si * 10_000 + ci * 100 + j, world=WORLD),
    ])
    z = fn.denoise(mods, tokenizers, sched_cfg, prompts, seeds, steps=steps, guidance=guidance,
                   batch_size=batch_size)
    images = torch.cat([fn.decode(vae, z[i:i + 256]) for i in range(0, len(z), 256)])
    ps, pc, _, _ = clf.predict(images)
    shape_only = want_c < 0
    per = {s: float((ps[shape_only & (want_s == si)] == si).float().mean()) for si, s in enumerate(w.SHAPES)}
    pair = ~shape_only
    ok_s, ok_c = ps[pair] == want_s[pair], pc[pair] == want_c[pair]
    per_colour = {c: float(ok_c[want_c[pair] == ci].float().mean()) for ci, c in enumerate(w.COLOURS)}
    pre = _prefix(WORLD)
    return {"prompts": {"shape": f"{pre} <shape>", "pair": f"{pre} <colour> <shape>"},
            "colour_prompts": per_colour, "colour_min": min(per_colour.values()),
            "shape_prompts": per, "shape_mean": sum(per.values()) / len(per), "shape_min": min(per.values()),
            "pair_shape": float(ok_s.float().mean()), "pair_colour": float(ok_c.float().mean()),
            "pair_both": float((ok_s & ok_c).float().mean()),
            "images": {"per_shape": per_shape, "per_pair": per_pair, "seed": seed},
            "sampler": {"steps": steps, "guidance": guidance}}, images


def report_markdown(report) -> str:
    """The training report as markdown (machine, command, model, timings, scores)."""
    pf, t, m = report["prompt_following"], report["timings_s"], report["transformer"]

    def table(scores, label):
        return ["| " + label + " | " + " | ".join(scores) + " | min |", "|" + "---|" * (len(scores) + 2),
                "| top-1 | " + " | ".join(f"{100 * v:.1f} %" for v in scores.values())
                + f" | {100 * min(scores.values()):.1f} % |"]

    n_pairs = len(pf["shape_prompts"]) * len(pf["colour_prompts"])
    smp = pf["sampler"]
    lines = ["# ShapesWorld 2 flow model: training and scores", "",
             f"* machine: {report['machine']}, torch {report['torch']}, {report['threads']} threads",
             f"* command: `{report['command']}`",
             f"* source (classifier, VAE, CLIP-L initialisation): `{report['source']}`",
             f"* transformer: SD3Transformer2DModel, {m['layers']} joint blocks, width {m['width']}, patch "
             f"{m['patch']}, {m['params_m']:.2f} M parameters; trained text encoders {m['text_params_m']:.2f} M "
             f"(token embeddings frozen); batch {m['batch']}, {m['steps']} steps, lr {m['lr']}, shift {m['shift']}",
             f"* measured: {m['s_per_step']:.3f} s per training step",
             "* stage times (s): " + ", ".join(f"{k} {v}" for k, v in t.items())
             + f"; total {sum(t.values()) / 60:.1f} min", "",
             f"Prompt following ({pf['images']['per_shape']} images per '{pf['prompts']['shape']}' prompt, "
             f"Euler {smp['steps']} steps (StableDiffusion3Pipeline's sampler), CFG {smp['guidance']:g}, "
             "fp16-rounded EMA weights, classifier top-1):", "",
             *table(pf["shape_prompts"], "shape"), "",
             f"'{pf['prompts']['pair']}', all {n_pairs} pairs × {pf['images']['per_pair']}: shape "
             f"{100 * pf['pair_shape']:.1f} %, colour {100 * pf['pair_colour']:.1f} %, both {100 * pf['pair_both']:.1f} %",
             "", f"Colour accuracy per colour on '{pf['prompts']['pair']}':", "", *table(pf["colour_prompts"], "colour")]
    return "\n".join(lines) + "\n"


def ship(work, dest, report):
    """Write the fp16 pipeline folder, the classifier, the curve and the report into ``dest``."""
    mods, tokenizers, vae, sched_cfg = load_pipeline_parts(os.path.join(work, "model"))
    tmp = dest.rstrip("/") + ".ship"
    save_pipeline(mods, tokenizers, vae, sched_cfg, tmp, dtype=torch.float16)
    for name in ("classifier.safetensors", "curve.jsonl"):
        shutil.copy(os.path.join(work, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "train_report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    _log(f"shipped to {dest}")


# --------------------------------------------------------------------------- command line


def _parser():
    ap = argparse.ArgumentParser(prog="python -m ap_erase_fast.shapes.train_flow", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="work folder (stages resume from it)")
    ap.add_argument("--shapes2", default=None,
                    help="ShapesWorld 2 model or work folder giving the classifier, VAE and text encoder "
                         "(default: the shipped model)")
    ap.add_argument("--seed", type=int, default=0)
    d = DEFAULTS
    ap.add_argument("--steps", type=int, default=d["steps"], help=f"training steps (default {d['steps']})")
    ap.add_argument("--batch", type=int, default=d["batch"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--warmup", type=int, default=d["warmup"])
    ap.add_argument("--layers", type=int, default=d["layers"], help="joint transformer blocks")
    ap.add_argument("--heads", type=int, default=d["heads"])
    ap.add_argument("--head-dim", type=int, default=d["head_dim"])
    ap.add_argument("--patch", type=int, default=d["patch"], choices=(1, 2), help="latent patch size")
    ap.add_argument("--shift", type=float, default=fn.SHIFT, help="the flow scheduler's shift (training and sampling)")
    ap.add_argument("--images", type=int, default=d["images"], help="training images (when encoded here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-per-shape", type=int, default=d["eval_per_shape"],
                    help="images per 'an image of a <shape>' prompt (pairs get an eighth of it)")
    ap.add_argument("--eval-steps", type=int, default=d["eval_steps"], help="Euler steps of the evaluation sampler")
    ap.add_argument("--guidance", type=float, default=d["guidance"], help="CFG scale of the evaluation sampler")
    ap.add_argument("--benchmark-steps", type=int, default=None,
                    help="only time this many training steps and one sampling batch, print the projected run "
                         "time and stop (nothing but the latents is written)")
    ap.add_argument("--ship", default=None, help="folder to write the fp16 pipeline and classifier into")
    return ap


def _check(args):
    for name in ("steps", "batch", "layers", "heads", "head_dim", "images", "threads", "eval_per_shape", "eval_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or not args.lr > 0 or not args.shift > 0:
        raise UsageError("--warmup must be >= 0, --lr and --shift > 0")
    if args.benchmark_steps is not None and args.benchmark_steps < 1:
        raise UsageError(f"--benchmark-steps must be at least 1, got {args.benchmark_steps}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        _check(args)
        from .loading import shipped_dir

        src_dir = args.shapes2 or shipped_dir("shapes2")
        src = source_paths(src_dir)
        return _run(args, src_dir, src, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args, src_dir, src, argv):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    report.update({"command": "python -m ap_erase_fast.shapes.train_flow "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
                   "world": WORLD, "seed": args.seed, "torch": torch.__version__, "threads": args.threads,
                   "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "source": src_dir})
    timings = report.setdefault("timings_s", {})

    def save_report():
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=2)

    vae = load_vae(src["vae"])
    lat_path = src["latents"] or os.path.join(args.out, "latents.safetensors")
    if not os.path.exists(lat_path):
        t = time.time()
        save_file(encode_dataset(vae, args.seed, args.images, world=WORLD), lat_path)
        timings["latents"] = round(time.time() - t, 1)
        save_report()
    data = load_file(lat_path)
    tokenizers = fn.build_tokenizers()
    sched_cfg = fn.scheduler_config(args.shift)
    tr_kwargs = dict(layers=args.layers, heads=args.heads, head_dim=args.head_dim, patch=args.patch,
                     sample_size=int(data["mean"].shape[-1]))

    def fresh_modules():
        return fn.build_modules(args.seed, tr_kwargs, CLIPTextModel.from_pretrained(src["text_encoder"]))

    if args.benchmark_steps is not None:
        return _benchmark(args, data, vae, tokenizers, sched_cfg, fresh_modules)

    model_dir = os.path.join(args.out, "model")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        mods = fresh_modules()
        t = time.time()
        with open(os.path.join(args.out, "curve.jsonl"), "w") as curve:
            s_per_step = train_flow(args.seed, data, vae.config.scaling_factor, mods, tokenizers, steps=args.steps,
                                    batch=args.batch, lr=args.lr, warmup=args.warmup, shift=args.shift, curve=curve)
        timings["transformer"] = round(time.time() - t, 1)
        report["transformer"] = _model_summary(args, mods, s_per_step)
        save_pipeline(mods, tokenizers, vae, sched_cfg, model_dir)
        save_report()
    shutil.copy(src["classifier"], os.path.join(args.out, "classifier.safetensors"))
    clf = load_classifier(src["classifier"])
    mods, tokenizers, vae, sched_cfg = load_pipeline_parts(model_dir, fp16_weights=True)
    t = time.time()
    scores, images = prompt_following(mods, tokenizers, vae, sched_cfg, clf, per_shape=args.eval_per_shape,
                                      per_pair=max(1, args.eval_per_shape // 8), steps=args.eval_steps,
                                      guidance=args.guidance)
    timings["eval"] = round(time.time() - t, 1)
    report["prompt_following"] = scores
    save_report()
    _log(f"prompt following {json.dumps(scores)}")
    from .train import _save_grid

    cols = min(8, args.eval_per_shape)
    _save_grid(images, os.path.join(args.out, "grid_shapes.png"), args.eval_per_shape,
               len(world_module(WORLD).SHAPES), cols=cols)
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(report_markdown(report))
    if args.ship:
        ship(args.out, args.ship, report)
    return 0


def _model_summary(args, mods, s_per_step):
    def count(m, trained_only=False):
        return sum(p.numel() for n, p in m.named_parameters() if not (trained_only and "token_embedding" in n)) / 1e6

    return {"layers": args.layers, "width": args.heads * args.head_dim, "patch": args.patch,
            "params_m": count(mods["transformer"]),
            "text_params_m": count(mods["text_encoder"], True) + count(mods["text_encoder_2"], True),
            "batch": args.batch, "steps": args.steps, "lr": args.lr, "shift": args.shift,
            "s_per_step": s_per_step}


def _benchmark(args, data, vae, tokenizers, sched_cfg, fresh_modules):
    """Time ``--benchmark-steps`` training steps and one evaluation batch; print the projection."""
    mods = fresh_modules()
    s_step = train_flow(args.seed, data, vae.config.scaling_factor, mods, tokenizers, steps=args.benchmark_steps,
                        batch=args.batch, lr=args.lr, warmup=args.warmup, shift=args.shift)
    n_eval = len(world_module(WORLD).SHAPES) * (args.eval_per_shape + 8 * max(1, args.eval_per_shape // 8))
    t = time.perf_counter()
    fn.denoise(mods, tokenizers, sched_cfg, ["an image of a red circle"] * 64, list(range(64)), steps=2,
               guidance=args.guidance)
    s_eval_batch_step = (time.perf_counter() - t) / 2
    train_s = s_step * args.steps
    eval_s = s_eval_batch_step * args.eval_steps * math.ceil(n_eval / 64)
    summary = _model_summary(args, mods, s_step)
    print(json.dumps({"s_per_step": round(s_step, 4), "batch": args.batch,
                      "transformer_params_m": round(summary["params_m"], 3),
                      "s_per_sampling_step_of_64_images": round(s_eval_batch_step, 4),
                      "projected_transformer_s": round(train_s), "projected_eval_s": round(eval_s),
                      "projected_total_min": round((train_s + eval_s) / 60, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
