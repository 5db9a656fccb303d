"""``ap-erase eval``: arguments and entry point (``ap_erase_fast/cli.py`` wires them in).

    ap-erase eval --run OUT                                   # ε-space + images, OUT/eval/
    ap-erase eval --run OUT --prompts imagenette.csv --detectors resnet50 --weights ~/eval-weights
    ap-erase eval --run OUT --base-only                      # the unmodified model, OUT/eval-base/
"""
from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--run", metavar="DIR", help="output folder of an 'ap-erase train' run")
    g.add_argument("--base-only", action="store_true",
                   help="evaluate the unmodified base model (erased = base); writes RUN/eval-base/")
    g.add_argument("--model", metavar="MODEL",
                   help="base model (default: the run's); with --base-only and no --run, the model to evaluate")
    g.add_argument("--erase", metavar="CONCEPTS",
                   help="comma-separated erased concepts (default: the run's)")
    g.add_argument("--single-file-weights", choices=("non-ema", "ema"), default=None,
                   help="UNet copy of a single-file base model (default: the run's)")
    g.add_argument("--allow-model-mismatch", action="store_true",
                   help="evaluate even if the base model's UNet hash differs from the run's record")
    g.add_argument("--output", metavar="DIR", help="report folder (default RUN/eval, RUN/eval-base)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder that ap-erase eval wrote (one holding "
                        "its report.json); any other folder is refused")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--quiet", action="store_true", help="no progress bars or summary")

    e = parser.add_argument_group("epsilon-space measures")
    e.add_argument("--concepts", metavar="FILE",
                   help="held-out concepts, one per line or CSV with 'concept' (default: the "
                        "model's: the world's prompts for shapes, else data/eval_concepts.txt)")
    e.add_argument("--eps-seeds", type=int, default=2, help="number of seeds (0..N-1)")
    e.add_argument("--eps-timesteps", type=int, default=5, help="DDIM timesteps queried per trajectory")
    e.add_argument("--eps-ddim-steps", type=int, default=None, help="trajectory DDIM steps (default: the run's)")
    e.add_argument("--eps-guidance", type=float, default=None, help="trajectory CFG (default: the run's start guidance)")
    e.add_argument("--negative-guidance", type=float, default=None, help="eta of the target (default: the run's)")
    e.add_argument("--eps-batch-size", type=int, default=8, help="concepts per UNet batch")

    i = parser.add_argument_group("image-level protocol")
    i.add_argument("--no-images", action="store_true", help="skip image generation (epsilon-space only)")
    i.add_argument("--prompts", metavar="FILE.csv",
                   help="CSV with prompt, seed and optional class, concept, id/case_number columns "
                        "(default: the model's: labelled world prompts for shapes, else the erased "
                        "and 6 held-out concepts as prompts)")
    i.add_argument("--images-per-prompt", type=int, default=None, metavar="N",
                   help="seeds 0..N-1 per default prompt (default: the model's: 8 for shapes, 2)")
    i.add_argument("--detectors", default=None, metavar="LIST",
                   help="comma list of nudenet, resnet50, clip, lpips, shapes, shapes2; 'none' for none "
                        "(default: the model's: shapes or shapes2 for those models, none otherwise)")
    i.add_argument("--weights", metavar="DIR",
                   help="folder with resnet50/, clip/, lpips/ (default: $AP_ERASE_EVAL_WEIGHTS or "
                        "<cache>/eval-weights)")
    i.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model's: 25 for shapes, 100 (the paper))")
    i.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's: 5 for shapes, 7.5)")
    i.add_argument("--scheduler", choices=("ddim", "lms"), default=None, help="(default: ddim)")
    i.add_argument("--resolution", type=int, default=None, help="image size (default: the run's / model's)")
    i.add_argument("--batch-size", type=int, default=None,
                   help="prompts per pipeline call (default: the model's: 16 for shapes, 4)")
    i.add_argument("--no-save-images", action="store_true", help="do not write every image (grids still)")
    i.add_argument("--grid-size", type=int, default=8, help="columns per base-vs-erased grid")
    i.add_argument("--nudenet-classes", default="ap",
                   help="'ap' (the authors' 8 exposed classes), 'strict' (5) or a comma list of classes")
    i.add_argument("--nudenet-model", metavar="FILE.onnx", help="another NudeNet ONNX model (default: bundled 320n)")


def config_from_args(args: argparse.Namespace):
    from .api import EvalConfig

    from ..config import parse_concepts

    erase = parse_concepts(args.erase) if args.erase is not None else None
    if erase == []:
        raise UserError(f"--erase {args.erase!r} names no concept; give the erased concepts, or "
                        f"leave --erase out to take the run's")
    detectors = None
    if args.detectors is not None:
        detectors = [d.strip().lower() for d in args.detectors.split(",")
                     if d.strip() and d.strip().lower() != "none"]
    return EvalConfig(
        run=args.run, output=args.output, overwrite=args.overwrite, base_only=args.base_only,
        model=args.model, erase=erase, single_file_weights=args.single_file_weights,
        allow_model_mismatch=args.allow_model_mismatch, device=args.device,
        concepts=args.concepts, eps_seeds=args.eps_seeds, eps_timesteps=args.eps_timesteps,
        eps_ddim_steps=args.eps_ddim_steps, eps_guidance=args.eps_guidance,
        negative_guidance=args.negative_guidance, eps_batch_size=args.eps_batch_size,
        images=not args.no_images, prompts=args.prompts,
        detectors=detectors, images_per_prompt=args.images_per_prompt, weights=args.weights,
        steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
        resolution=args.resolution, batch_size=args.batch_size, save_images=not args.no_save_images,
        grid_size=args.grid_size, nudenet_classes=args.nudenet_classes, nudenet_model=args.nudenet_model,
        quiet=args.quiet)


def summary(report: dict) -> list[str]:
    lines = []
    for c, e in report["eps_space"]["erasure"].items():
        lines.append(f"erasure gap {c!r}: base {e['gap_base']:.4g} -> erased {e['gap_erased']:.4g}; "
                     f"shift {e['shift']:.4g}")
    p = report["eps_space"]["preservation"]
    top = ", ".join(f"{d['concept']} {d['drift']:.3g}" for d in p["most_affected"][:3])
    lines.append(f"held-out drift: mean {p['mean']:.4g}, max {p['max']:.4g} (most affected: {top})")
    img = report.get("images") or {}
    for name, det in (img.get("detectors") or {}).items():
        res = det["results"]
        if name == "nudenet":
            lines.append("nudenet NER-0.5: base {:.2%} -> erased {:.2%}".format(
                res["base"]["ner"]["0.5"], res["erased"]["ner"]["0.5"]))
        elif name == "lpips":
            lines.append("lpips: " + ", ".join(f"{g} {v['lpips']:.4g}" for g, v in res.items()))
        else:
            parts = []
            for g, v in res["erased"].items():
                parts += [f"{g} {k} {x:.4g}" for k, x in v.items()
                          if k != "images" and isinstance(x, (int, float))]
            lines.append(f"{name} (erased model): " + ", ".join(parts))
    if report.get("notice"):
        lines.append("note: " + report["notice"])
    lines.append(f"report: {report['output']}/report.md")
    return lines


def run(args: argparse.Namespace) -> int:
    from .api import evaluate

    cfg = config_from_args(args)
    if cfg.base_only is False and args.run is None:
        raise UserError("pass --run DIR (the output folder of an 'ap-erase train' run), or --base-only")
    report = evaluate(cfg)
    if not cfg.quiet:
        print("\n".join(summary(report)))
    return 0
