"""Train a ShapesWorld model and its classifier from a seed, on CPU.

    python -m ap_erase_fast.shapes.train --out runs/shapes --seed 0 [--ship ap_erase_fast/models/shapes]
    python -m ap_erase_fast.shapes.train --world 2 --out runs/shapes2 --seed 0 [--ship ap_erase_fast/models/shapes2]

Stages (each is skipped when its output exists in ``--out``, so an interrupted run resumes):
1. classifier: a CNN with one head per attribute (shape, colour; in ShapesWorld 2 also fill,
   size, background) on freshly drawn images; held-out accuracy on 10k images.
2. vae: AutoencoderKL 32x32x3 -> 8x8x4, L1 + MSE + 1e-6 KL; scaling factor = 1 / latent std.
3. latents: the training set (``--images`` images) encoded once (posterior mean and std).
4. unet: UNet2DConditionModel and CLIPTextModel trained jointly (epsilon prediction, SD noise
   schedule, AdamW with warmup and cosine decay, EMA); captions drawn fresh from the templates
   each step, 10 % empty. The loss curve goes to ``curve.jsonl``.
5. eval: prompt following of the EMA weights as shipped (fp16-rounded), per shape and colour.
``--ship DIR`` writes the fp16 diffusers folders (unet, text_encoder, vae, scheduler), the
classifier and ``train_report.json`` (command, timings, curve summary, scores) into DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import nets


def _log(msg):
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _images(n, rng, w):
    """``n`` images of world module ``w`` and their labels, as tensors."""
    x, labels = w.render_labelled(n, rng)
    return torch.from_numpy(x), {k: torch.from_numpy(np.asarray(v)).long() for k, v in labels.items()}


def _blur(x):
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)


def train_classifier(seed, steps=700, batch=96, lr=3e-3, world=1):
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    w = nets.world_module(world)
    clf = nets.ShapeClassifier(heads=nets.classifier_heads(world))
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    clf.train()
    for step in range(steps):
        x, labels = _images(batch, rng, w)
        # Half the batch softened: generated images are smoother than the renderer's edges.
        x[: batch // 2] = _blur(x[: batch // 2])
        loss = sum(F.cross_entropy(lg, labels[name]) for name, lg in zip(clf.heads, clf(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            _log(f"classifier step {step} loss {loss.item():.4f}")
    return clf


def classifier_accuracy(clf, images, labels, w):
    """Held-out top-1 accuracy per head, and per shape."""
    probs = clf.predict_all(images)
    pred = {name: p.argmax(-1) for name, p in probs.items()}
    out = {name: float((pred[name] == labels[name]).float().mean()) for name in clf.heads}
    ps, shapes = pred["shape"], labels["shape"]
    out["per_shape"] = {name: float((ps[shapes == i] == i).float().mean()) for i, name in enumerate(w.SHAPES)}
    return out


def train_vae(seed, steps=2000, batch=32, lr=2e-3, world=1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    w = nets.world_module(world)
    vae = AutoencoderKL(**nets.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    vae.train()
    for step in range(steps):
        x, _ = _images(batch, rng, w)
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            _log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_dataset(vae, seed, n, chunk=1000, world=1):
    """Posterior mean and std of ``n`` fresh images, with their labels (one tensor per key)."""
    rng = np.random.default_rng([seed, 3])
    w = nets.world_module(world)
    cols = {"mean": [], "std": []}
    for i in range(0, n, chunk):
        x, labels = _images(min(chunk, n - i), rng, w)
        post = vae.encode(x * 2 - 1).latent_dist
        cols["mean"].append(post.mean)
        cols["std"].append(post.std)
        for k, v in labels.items():
            cols.setdefault(k, []).append(v)
    return {k: torch.cat(v).contiguous() for k, v in cols.items()}


@torch.no_grad()
def reconstruct(vae, x):
    return ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)


def _caption_table(tokenizer, w):
    caps = w.all_captions()
    ids = tokenizer(caps, padding="max_length", max_length=nets.MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    return {c: i for i, c in enumerate(caps)}, ids


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """The learning-rate factor of the ShapesWorld trainers: linear warm-up over ``warmup`` steps,
    then a cosine decay to 5 % at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog))


def ema_step(loss, params, opt, sched, ema, ema_decay: float, step: int) -> None:
    """One optimiser step of the ShapesWorld trainers: backward, gradient norm clipped at 1, the
    step and the schedule, then the EMA weights (decay warmed up as min(decay, (1+s)/(10+s)))."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)


def train_unet(seed, data, scaling_factor, tokenizer, *, steps, batch=64, lr=6e-4, warmup=200, ema_decay=0.999, curve=None,
               world=1):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 4])
    w = nets.world_module(world)
    label_keys = [k for k in data if k not in ("mean", "std")]
    unet, text_encoder, _ = nets.build_modules(world)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, steps))
    noise_sched = DDPMScheduler(**{k: v for k, v in nets.SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    index, ids = _caption_table(tokenizer, w)
    n = len(data["shape"])
    unet.train()
    text_encoder.train()
    t0 = time.time()
    run_loss = None
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, n, batch))
        z = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * scaling_factor
        caps = w.draw_captions({k: data[k][idx].numpy() for k in label_keys}, rng)
        tok = ids[[index[c] for c in caps]]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        zt = noise_sched.add_noise(z, noise, t)
        pred = unet(zt, t, text_encoder(tok)[0]).sample
        loss = F.mse_loss(pred, noise)
        ema_step(loss, params, opt, sched, ema, ema_decay, step)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if curve is not None and (step % 50 == 0 or step == steps - 1):
            row = {"step": step, "loss": round(loss.item(), 5), "loss_ema": round(run_loss, 5),
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            if step % 250 == 0:
                _log(f"unet step {step} loss {run_loss:.4f} ({row['elapsed_s']} s)")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def _save_classifier(clf, path, meta):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, path, metadata={"info": json.dumps(meta)})


def load_classifier(path):
    """The classifier in ``path``; its heads come from the file's metadata (ShapesWorld 1's shape
    and colour when the file names none)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as fh:
        info = json.loads((fh.metadata() or {}).get("info", "{}"))
    clf = nets.ShapeClassifier(heads=info.get("heads"))
    clf.load_state_dict(load_file(path))
    return clf.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ap_erase_fast.shapes.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="work folder (stages resume from it)")
    ap.add_argument("--world", type=int, choices=(1, 2), default=1,
                    help="1: ShapesWorld (6 shapes x 6 colours, --model shapes); 2: ShapesWorld 2 (15 shapes, "
                         "8 colours, fill, size, background; --model shapes2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet-steps", type=int, default=None, help="default: 3000 (world 1), 8000 (world 2)")
    ap.add_argument("--vae-steps", type=int, default=None, help="default: 2000 (world 1), 4000 (world 2)")
    ap.add_argument("--clf-steps", type=int, default=None, help="default: 700 (world 1), 1500 (world 2)")
    ap.add_argument("--images", type=int, default=None,
                    help="training set size for the UNet; default: 40000 (world 1), 60000 (world 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-per-shape", type=int, default=None,
                    help="images per '<prefix> <shape>' prompt in the final prompt-following check; default: "
                         "64 (world 1), 256 (world 2: a 90 %% bar needs the binomial error of 256 images, "
                         "1.9 points, not the 3.8 of 64)")
    ap.add_argument("--heldout", type=int, default=10000, help="held-out images for the classifier")
    ap.add_argument("--ship", default=None, help="folder to write the fp16 model and classifier into")
    args = ap.parse_args(argv)
    for name, defaults in (("unet_steps", (3000, 8000)), ("vae_steps", (2000, 4000)), ("clf_steps", (700, 1500)),
                           ("images", (40000, 60000)), ("eval_per_shape", (64, 256))):
        if getattr(args, name) is None:
            setattr(args, name, defaults[args.world - 1])
    w = nets.world_module(args.world)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    report.update({"command": "python -m ap_erase_fast.shapes.train " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "world": args.world, "seed": args.seed, "torch": torch.__version__, "threads": args.threads,
                   "machine": f"{_cpu_name()}, {os.cpu_count()} cores"})
    timings = report.setdefault("timings_s", {})

    def save_report():
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=2)

    from diffusers import AutoencoderKL

    from ..models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=nets.MAX_LENGTH)
    held = _images(args.heldout, np.random.default_rng([args.seed, 99]), w)

    clf_path = os.path.join(args.out, "classifier.safetensors")
    if not os.path.exists(clf_path):
        t = time.time()
        clf = train_classifier(args.seed, steps=args.clf_steps, world=args.world)
        timings["classifier"] = round(time.time() - t, 1)
        report["classifier_heldout"] = classifier_accuracy(clf, *held, w)
        _save_classifier(clf, clf_path, {"seed": args.seed, "world": args.world,
                                         "heads": nets.classifier_heads(args.world),
                                         "heldout": report["classifier_heldout"]})
        save_report()
        _log(f"classifier held-out {report['classifier_heldout']}")
    clf = load_classifier(clf_path)

    vae_dir = os.path.join(args.out, "vae")
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        t = time.time()
        vae = train_vae(args.seed, steps=args.vae_steps, world=args.world)
        lat = encode_dataset(vae, args.seed + 1000, min(4000, args.images), world=args.world)["mean"]
        sf = float(1.0 / lat.std())
        vae.register_to_config(scaling_factor=sf)
        timings["vae"] = round(time.time() - t, 1)
        n_rec = min(4000, args.heldout)
        rec = reconstruct(vae, held[0][:n_rec])
        mse = F.mse_loss(rec, held[0][:n_rec]).item()
        report["vae"] = {"psnr_db": round(10 * math.log10(1 / mse), 2), "scaling_factor": sf,
                         "classifier_on_reconstructions": classifier_accuracy(
                             clf, rec, {k: v[:n_rec] for k, v in held[1].items()}, w)}
        vae.save_pretrained(vae_dir)
        save_report()
        _log(f"vae {report['vae']}")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    lat_path = os.path.join(args.out, "latents.safetensors")
    if not os.path.exists(lat_path):
        from safetensors.torch import save_file

        t = time.time()
        save_file(encode_dataset(vae, args.seed, args.images, world=args.world), lat_path)
        timings["latents"] = round(time.time() - t, 1)
        save_report()
    from safetensors.torch import load_file

    data = load_file(lat_path)

    model_dir = os.path.join(args.out, "model")
    if not os.path.exists(os.path.join(model_dir, "unet", "config.json")):
        t = time.time()
        with open(os.path.join(args.out, "curve.jsonl"), "w") as curve:
            unet, text_encoder = train_unet(args.seed, data, vae.config.scaling_factor, tokenizer,
                                            steps=args.unet_steps, curve=curve, world=args.world)
        timings["unet"] = round(time.time() - t, 1)
        unet.save_pretrained(os.path.join(model_dir, "unet"))
        text_encoder.save_pretrained(os.path.join(model_dir, "text_encoder"))
        save_report()

    from .loading import load_shapes_folder

    comps = load_shapes_folder(model_dir, vae_dir=vae_dir, fp16_weights=True)
    t = time.time()
    scores, images = _prompt_following(comps, clf, args.eval_per_shape, args.world)
    timings["eval"] = round(time.time() - t, 1)
    report["prompt_following"] = scores
    save_report()
    _log(f"prompt following {json.dumps(scores)}")
    _save_grid(images, os.path.join(args.out, "grid_shapes.png"), args.eval_per_shape, len(w.SHAPES))
    _save_curve_plot(os.path.join(args.out, "curve.jsonl"), os.path.join(args.out, "curve.png"))
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(report_markdown(report))
    if args.ship:
        ship(args.out, args.ship, report)
    return 0


def _prompt_following(comps, clf, per_shape, world=1):
    from .sample import prompt_following

    return prompt_following(
        (comps.unet, comps.text_encoder, comps.tokenizer, comps.vae, comps.scheduler.config), clf,
        per_shape=per_shape, per_pair=max(1, per_shape // 8), world=world,
    )


def _save_grid(images, path, per_shape, n_shapes, cols=8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for si in range(n_shapes):
        rows.append(images[si * per_shape : si * per_shape + cols])
    g = torch.stack(rows)  # [shapes, cols, 3, 32, 32]
    g = g.permute(0, 3, 1, 4, 2).reshape(len(rows) * 32, cols * 32, 3).numpy()
    plt.imsave(path, np.kron(g, np.ones((2, 2, 1))))


# The tokenizer is not shipped: it is the vendored CLIP BPE with 16 positions, built at load time.
_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "tokenizer": [None, None],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def report_markdown(report) -> str:
    """The training report as markdown (machine, command, timings, scores)."""
    pf = report["prompt_following"]
    t = report["timings_s"]
    world = report.get("world", 1)
    heads = [k for k in report["classifier_heldout"] if k != "per_shape"]

    def pct(d):
        return ", ".join(f"{k} {100 * d[k]:.1f} %" for k in heads)

    def table(scores, label):
        return ["| " + label + " | " + " | ".join(scores) + " | min |", "|" + "---|" * (len(scores) + 2),
                "| top-1 | " + " | ".join(f"{100 * v:.1f} %" for v in scores.values())
                + f" | {100 * min(scores.values()):.1f} % |"]

    prompts = pf.get("prompts", {"shape": "a <shape>", "pair": "a <colour> <shape>"})
    n_pairs = len(pf["shape_prompts"]) * (len(pf["colour_prompts"]) if "colour_prompts" in pf else 6)
    title = "ShapesWorld model" if world == 1 else "ShapesWorld 2 model"
    lines = [f"# {title}: training and scores", "",
             f"* machine: {report['machine']}, torch {report['torch']}, {report['threads']} threads",
             f"* command: `{report['command']}`",
             "* stage times (s): " + ", ".join(f"{k} {v}" for k, v in t.items())
             + f"; total {sum(t.values()) / 60:.1f} min",
             f"* classifier, held out: {pct(report['classifier_heldout'])}",
             f"* VAE: PSNR {report['vae']['psnr_db']} dB; classifier on reconstructions: "
             f"{pct(report['vae']['classifier_on_reconstructions'])}", "",
             f"Prompt following ({pf['images']['per_shape']} images per '{prompts['shape']}' prompt, DDIM 25 steps, "
             "CFG 5, fp16-rounded EMA weights, classifier top-1):", "",
             *table(pf["shape_prompts"], "shape"), "",
             f"'{prompts['pair']}', all {n_pairs} pairs × {pf['images']['per_pair']}: shape {100 * pf['pair_shape']:.1f} %, "
             f"colour {100 * pf['pair_colour']:.1f} %, both {100 * pf['pair_both']:.1f} %"]
    if "colour_prompts" in pf:
        lines += ["", f"Colour accuracy per colour on '{prompts['pair']}':", "", *table(pf["colour_prompts"], "colour")]
    return "\n".join(lines) + "\n"


def _save_curve_plot(curve_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(curve_path)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, alpha=0.5, label="batch loss")
    ax.plot([r["step"] for r in rows], [r["loss_ema"] for r in rows], lw=1.5, label="running mean")
    ax.set_xlabel("step (batch 64)")
    ax.set_ylabel("ε-prediction MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("ShapesWorld UNet + text encoder training")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def drop_local_paths(folder):
    """Remove ``_name_or_path`` (the training machine's folder, which diffusers records on save)
    from every ``config.json`` under ``folder``: a shipped model names no path of the machine it
    was trained on."""
    for d, _, files in os.walk(folder):
        if "config.json" in files:
            path = os.path.join(d, "config.json")
            with open(path) as fh:
                cfg = json.load(fh)
            if cfg.pop("_name_or_path", None) is not None:
                with open(path, "w") as fh:
                    json.dump(cfg, fh, indent=2, sort_keys=True)
                    fh.write("\n")


def ship(work, dest, report):
    """Write the fp16 model folders, the classifier and the training report into ``dest``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tmp = dest.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    m = os.path.join(work, "model")
    UNet2DConditionModel.from_pretrained(os.path.join(m, "unet")).half().save_pretrained(os.path.join(tmp, "unet"))
    CLIPTextModel.from_pretrained(os.path.join(m, "text_encoder")).half().save_pretrained(os.path.join(tmp, "text_encoder"))
    AutoencoderKL.from_pretrained(os.path.join(work, "vae")).half().save_pretrained(os.path.join(tmp, "vae"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as fh:
        json.dump({"_class_name": "DDIMScheduler", **nets.SCHEDULER_CONFIG}, fh, indent=2)
    with open(os.path.join(tmp, "model_index.json"), "w") as fh:
        json.dump(_MODEL_INDEX, fh, indent=2)
    shutil.copy(os.path.join(work, "classifier.safetensors"), os.path.join(tmp, "classifier.safetensors"))
    for name in ("curve.jsonl",):
        shutil.copy(os.path.join(work, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "train_report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    drop_local_paths(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    _log(f"shipped to {dest}")


if __name__ == "__main__":
    raise SystemExit(main())
