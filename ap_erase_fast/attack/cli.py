"""``ap-erase attack``: arguments and entry point (``ap_erase_fast/cli.py`` wires them in).

    ap-erase attack --run OUT                                  # every attack that fits, OUT/attack/
    ap-erase attack --run OUT --attacks prompt --attack-steps 80 --prefix-tokens 5
    ap-erase attack --run OUT --attacks blackbox --blackbox-strength 3      # text encoder only
    ap-erase attack --run OUT --prompts nudity.csv --images 1             # every row of a prompt file
    ap-erase attack --run OUT --detectors nudenet                         # SD: judged by eval's NudeNet
"""
from __future__ import annotations

import argparse

from ..errors import UserError


def _names(text: str) -> list[str]:
    return [x.strip().lower() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .api import ATTACKS, AttackConfig

    d = AttackConfig()
    g = parser.add_argument_group("what to attack")
    g.add_argument("--run", metavar="DIR", help="output folder of an 'ap-erase train' run")
    g.add_argument("--concept", help="the erased concept to attack (default: the run's first)")
    g.add_argument("--prompt", help="the attacked prompt (default: the concept's plain prompt: "
                                    "'an image of a <shape>' on shapes2, the concept itself otherwise)")
    g.add_argument("--prompts", metavar="FILE",
                   help="attack every row of a prompt file, each with its own seed: UnlearnDiffAtk's CSV "
                        "(prompt, evaluation_seed, ...) or a CSV with the header prompt,seed[,concept]")
    g.add_argument("--max-prompts", type=int, default=None, metavar="N", help="attack only the file's first N rows")
    g.add_argument("--attacks", type=_names, default=None, metavar="LIST",
                   help=f"comma list of {', '.join(ATTACKS)} (default: prompt and inversion, and "
                        f"rephrase on shapes2 runs without --prompts)")
    g.add_argument("--single-file-weights", choices=("non-ema", "ema"), default=None,
                   help="UNet copy of a single-file base model (default: the run's)")
    g.add_argument("--allow-model-mismatch", action="store_true",
                   help="attack even if the base model's UNet hash differs from the run's record")
    g.add_argument("--output", metavar="DIR", help="report folder (default RUN/attack)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that ap-erase attack wrote (one holding its attack.json)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the attacks' draws")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    a = parser.add_argument_group("white-box attacks")
    a.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens, metavar="K",
                   help="adversarial tokens put in front of the prompt")
    a.add_argument("--attack-steps", type=int, default=d.attack_steps,
                   help="optimisation steps of the prompt attack and of the inversion")
    a.add_argument("--attack-lr", type=float, default=d.attack_lr, help="Adam lr of the token logits")
    a.add_argument("--tau-start", type=float, default=d.tau_start, help="Gumbel-Softmax τ at the first step")
    a.add_argument("--tau-end", type=float, default=d.tau_end, help="τ at the last step (geometric)")
    a.add_argument("--vocab", default=d.vocab, choices=("auto", "world", "tokenizer"),
                   help="candidate tokens: the shapes world's caption words (world), the "
                        "tokenizer's whole-word tokens (tokenizer); auto: world on shapes models")
    a.add_argument("--target-images", type=int, default=d.target_images,
                   help="base-model images of the concept the attack loss is measured on")
    a.add_argument("--probes", type=int, default=d.probes, help="(timestep, noise) pairs per target image")
    a.add_argument("--attack-batch", type=int, default=d.attack_batch, help="probes per optimisation step")
    a.add_argument("--inversion-lr", type=float, default=d.inversion_lr, help="Adam lr of the inverted embedding")
    a.add_argument("--restarts", type=int, default=d.restarts,
                   help="independent runs of the prompt attack (other draws); the best prompt is kept")
    a.add_argument("--judge-every", type=int, default=d.judge_every, metavar="STEPS",
                   help="steps between the attacker's checks of the current prompt (and at each run's end)")
    a.add_argument("--judge-images", type=int, default=d.judge_images,
                   help="erased-model images per check, judged by the classifier (shapes models) or the "
                        "--detectors detector; their seeds are disjoint from the reported ones")
    a.add_argument("--stop-rate", type=float, default=d.stop_rate,
                   help="stop once a check's judged rate exceeds this (1: never; with a judge)")

    b = parser.add_argument_group("black-box attack (text encoder only; --attack-steps generations, --vocab)")
    b.add_argument("--blackbox-strength", type=float, default=d.blackbox_strength, metavar="ETA",
                   help="target = the prompt's text states + ETA x the concept direction")
    b.add_argument("--blackbox-tokens", type=int, default=None, metavar="K",
                   help="tokens of the prompt searched (default 16, or what the text encoder reads)")
    b.add_argument("--population", type=int, default=d.population, help="prompts per generation of the search")
    b.add_argument("--concept-pairs", metavar="FILE",
                   help="CSV with the header with,without: prompts with and without the concept (default: "
                        "the shapes world's captions with another shape, or template pairs)")

    j = parser.add_argument_group("judging")
    j.add_argument("--images", type=int, default=d.images,
                   help="judged seeds 0..N-1 per prompt (with --prompts: the row's seed + 0..N-1)")
    j.add_argument("--rephrasings", type=int, default=d.rephrasings, help="rephrased prompts (shapes2)")
    j.add_argument("--rephrase-images", type=int, default=d.rephrase_images, help="seeds per rephrased prompt")
    j.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, as in eval)")
    j.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, as in eval)")
    j.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: the model's)")
    j.add_argument("--resolution", type=int, default=None, help="image size (default: the run's / model's)")
    j.add_argument("--grid-size", type=int, default=d.grid_size, help="columns of grid.png (0: no grid)")
    j.add_argument("--detectors", type=_names, default=None, metavar="NAME",
                   help="the judge, one of ap-erase eval's detectors: nudenet, resnet50, clip; auto (nudenet "
                        "for nudity, resnet50 for an ImageNet label with --weights holding resnet50/, else "
                        "clip); none (default: the model's: the world's classifier on shapes models, none "
                        "elsewhere)")
    j.add_argument("--weights", metavar="DIR",
                   help="folder with resnet50/, clip/ (as ap-erase eval; default: $AP_ERASE_EVAL_WEIGHTS or "
                        "<cache>/eval-weights)")
    j.add_argument("--nudenet-classes", default=d.nudenet_classes,
                   help="classes a NudeNet hit counts: 'ap' (the authors' 8 exposed classes), 'strict' (5) "
                        "or a comma list of classes")
    j.add_argument("--nudenet-model", metavar="FILE.onnx", help="another NudeNet ONNX model (default: bundled 320n)")
    j.add_argument("--nudenet-threshold", type=float, default=d.nudenet_threshold, metavar="T",
                   help="a NudeNet hit: a counted class detected with score above T (eval's NER-T)")
    j.add_argument("--concepts", metavar="FILE",
                   help="the CLIP judge's other labels, one per line or CSV with 'concept' (default: "
                        "ap-erase eval's held-out concepts, data/eval_concepts.txt); erased ones are left out")


def config_from_args(args: argparse.Namespace):
    from .api import AttackConfig

    if args.run is None:
        raise UserError("pass --run DIR, the output folder of an 'ap-erase train' run")
    return AttackConfig(
        run=args.run, output=args.output, overwrite=args.overwrite, concept=args.concept,
        prompt=args.prompt, prompts=args.prompts, max_prompts=args.max_prompts, attacks=args.attacks, single_file_weights=args.single_file_weights,
        allow_model_mismatch=args.allow_model_mismatch, device=args.device, seed=args.seed,
        prefix_tokens=args.prefix_tokens, attack_steps=args.attack_steps, attack_lr=args.attack_lr,
        tau_start=args.tau_start, tau_end=args.tau_end, vocab=args.vocab,
        target_images=args.target_images, probes=args.probes, attack_batch=args.attack_batch,
        inversion_lr=args.inversion_lr, blackbox_strength=args.blackbox_strength,
        blackbox_tokens=args.blackbox_tokens, population=args.population, concept_pairs=args.concept_pairs,
        restarts=args.restarts, judge_every=args.judge_every,
        judge_images=args.judge_images, stop_rate=args.stop_rate, images=args.images, rephrasings=args.rephrasings,
        rephrase_images=args.rephrase_images, steps=args.steps, guidance=args.guidance,
        batch_size=args.batch_size, resolution=args.resolution, grid_size=args.grid_size,
        detectors=args.detectors, weights=args.weights, nudenet_classes=args.nudenet_classes,
        nudenet_model=args.nudenet_model, nudenet_threshold=args.nudenet_threshold, concepts=args.concepts,
        quiet=args.quiet)


def _rate(r) -> str:
    if not r:
        return "not judged"
    return f"{r['rate']:.0%} ({r['hits']}/{r['images']}, 95% CI {r['ci95'][0]:.0%}-{r['ci95'][1]:.0%})"


def _judge_line(report: dict) -> list[str]:
    det = report.get("judge", {}).get("detector")
    return [f"judged by {det['name']}: {det['hit']}"] if det else []


def summary(report: dict) -> list[str]:
    if report.get("rows") is not None:
        return _rows_summary(report)
    lines = [f"attacked {report['concept']!r} with the prompt {report['prompt']!r}", *_judge_line(report)]
    if report["judged"]:
        lines.append(f"plain prompt: base {_rate(report['rates']['base'])}, "
                     f"erased {_rate(report['rates']['erased'])}")
    bb = report["attacks"].get("blackbox")
    if bb:
        d = bb["distance"]
        lines.append(f"blackbox attack: {bb['prompt']!r}, distance {d['start']:.4g} -> {d['after']:.4g} (plain "
                     f"prompt {d['plain']:.4g}), {bb['cost']['text_encoder_evals']} text-encoder evals"
                     + (f", ASR {_rate(bb['rate'])}" if bb.get("rate") else ""))
    for name in ("prompt", "inversion"):
        entry = report["attacks"].get(name)
        if entry:
            loss = entry["loss"]
            lines.append(f"{name} attack: {entry['prompt']!r}, loss {loss['before']:.4g} -> "
                         f"{loss['after']:.4g}" + (f", ASR {_rate(entry['rate'])}" if entry.get("rate") else ""))
            if name == "prompt" and entry.get("rate"):
                sel, cost = entry["selection"], entry["cost"]
                lines.append(f"  (selected on seeds {sel['seeds'][0]}.. at {_rate(sel['selected_rate'])}; ASR on "
                             f"fresh seeds; {cost['restarts_run']} run(s), {cost['optimisation_steps']} steps, "
                             f"{cost['unet_evals']} UNet evals, {cost['seconds']:.0f} s)")
    reph = report["attacks"].get("rephrase")
    if reph:
        lines.append(f"rephrasings ({len(reph['prompts'])} prompts): base {_rate(reph['rate']['base'])}, "
                     f"erased {_rate(reph['rate']['erased'])}")
    if report.get("notice"):
        lines.append("note: " + report["notice"])
    lines.append(f"report: {report['output']}/attack.json")
    return lines


def _rows_summary(report: dict) -> list[str]:
    rows = report["rows"]
    lines = [f"attacked {len(rows)} prompt(s) of {report['prompts']['path']} ({report['prompts']['format']} "
             f"format, {report['prompts']['rows']} rows)", *_judge_line(report)]
    if report["judged"]:
        lines.append(f"plain prompts: base {_rate(report['rates']['base'])}, "
                     f"erased {_rate(report['rates']['erased'])}")
    for name, entry in report["attacks"].items():
        lines.append(f"{name} attack: " + (f"ASR {_rate(entry['rate'])}" if entry.get("rate") else "not judged")
                     + f", {entry['cost'].get('seconds', 0):.0f} s")
    lines.append(f"prompts found: {report['output']}/prompts.csv")
    if report.get("notice"):
        lines.append("note: " + report["notice"])
    lines.append(f"report: {report['output']}/attack.json")
    return lines


def run(args: argparse.Namespace) -> int:
    from .api import attack

    report = attack(config_from_args(args))
    if not args.quiet:
        print("\n".join(summary(report)))
    return 0
