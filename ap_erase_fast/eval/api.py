"""``evaluate()``: the whole evaluation of a train run (or of a base model), as one call.

    from ap_erase_fast.eval import evaluate, EvalConfig
    report = evaluate(EvalConfig(run="outputs/garbage_truck", detectors=["resnet50"],
                                 prompts="imagenette.csv", weights="/models/eval"))

Writes ``report.json``, ``report.md``, ``per_image.jsonl``, plots and image grids into the output
folder (default ``RUN/eval/``, or ``RUN/eval-base/`` with ``base_only``) through a temporary
sibling folder renamed at the end, and returns the report dict.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from .detectors import DETECTORS
from .eps import EpsSettings
from .generate import SCHEDULERS
from .inputs import RunInfo, default_prompts, load_concepts, load_run, read_prompt_csv

REPORT_FORMAT = "ap_erase_fast.eval/v1"
WEIGHTS_ENV = "AP_ERASE_EVAL_WEIGHTS"


@dataclass
class EvalConfig:
    run: str | None = None  # output folder of an 'ap-erase train' run
    output: str | None = None  # default RUN/eval (RUN/eval-base with base_only)
    overwrite: bool = False
    base_only: bool = False  # evaluate the unmodified base model (θ' = θ)
    model: str | None = None  # base model; default: the run's (required without a run)
    erase: list[str] | None = None  # erased concepts; default: the run's (required without a run)
    single_file_weights: str | None = None
    allow_model_mismatch: bool = False
    device: str = "auto"
    # ε-space
    concepts: str | None = None  # held-out concept list; default data/eval_concepts.txt
    eps_seeds: int = 2
    eps_timesteps: int = 5
    eps_ddim_steps: int | None = None  # default: the run's ddim_steps (50)
    eps_guidance: float | None = None  # default: the run's start_guidance (3)
    negative_guidance: float | None = None  # default: the run's (1)
    eps_batch_size: int = 8
    # images (None: the model's default, see ap_erase_fast.eval.profiles)
    images: bool = True
    prompts: str | None = None  # CSV: prompt, seed[, class, concept, id]
    images_per_prompt: int | None = None  # seeds per default prompt (SD: 2, shapes: 8)
    detectors: list[str] | None = None  # SD: none, shapes: ["shapes"], shapes2: ["shapes2"]
    weights: str | None = None  # folder with resnet50/, clip/, lpips/
    steps: int | None = None  # SD: 100 (the paper), shapes: 25
    guidance: float | None = None  # SD: 7.5, shapes: 5
    scheduler: str | None = None  # ddim
    resolution: int | None = None
    batch_size: int | None = None  # SD: 4, shapes: 16
    save_images: bool = True
    grid_size: int = 8
    nudenet_classes: str = "ap"
    nudenet_model: str | None = None
    quiet: bool = False


def _device(name: str) -> str:
    from ..engine import resolve_device

    return str(resolve_device(name))


def _versions(detectors) -> dict:
    import diffusers
    import numpy
    import torch
    import transformers

    from .._version import __version__

    v = {"ap_erase_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "diffusers": diffusers.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__}
    if "nudenet" in detectors:
        for pkg in ("nudenet", "onnxruntime", "cv2"):
            mod = sys.modules.get(pkg)
            if mod is not None:
                v[pkg] = getattr(mod, "__version__", "installed")
    return v


def weights_dir(path: str | None) -> str:
    if path:
        return os.path.expanduser(path)
    if os.environ.get(WEIGHTS_ENV):
        return os.path.expanduser(os.environ[WEIGHTS_ENV])
    from ..models import cache_root

    return os.path.join(cache_root(), "eval-weights")


def check_config(cfg: EvalConfig) -> None:
    import math

    unknown = [d for d in cfg.detectors or [] if d not in DETECTORS]
    if unknown:
        raise UserError(f"unknown detector {', '.join(map(repr, unknown))}; choose from {', '.join(DETECTORS)}")
    if cfg.detectors and not cfg.images:
        raise UserError("detectors need images; drop --no-images or --detectors")
    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {cfg.scheduler!r}; choose {', '.join(SCHEDULERS)}")
    for name in ("eps_seeds", "eps_timesteps", "eps_batch_size", "steps", "batch_size",
                 "images_per_prompt", "eps_ddim_steps"):
        if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("guidance", "eps_guidance", "negative_guidance"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, 0 or more "
                            f"(got {value})")
    if cfg.eps_ddim_steps is not None and cfg.eps_ddim_steps < 2:
        raise UserError(f"--eps-ddim-steps must be at least 2 (got {cfg.eps_ddim_steps})")
    if cfg.resolution is not None and cfg.resolution <= 0:
        raise UserError(f"--resolution must be positive (got {cfg.resolution})")
    if cfg.grid_size < 0:
        raise UserError("grid-size must be >= 0")
    if cfg.run is None and not (cfg.base_only and cfg.model and cfg.erase):
        raise UserError("pass --run DIR (a train run's output folder), or --base-only with --model "
                        "and --erase to evaluate a base model without a run")
    if cfg.run is None and not cfg.output:
        raise UserError("without --run, pass --output DIR")


def _resolve_output(cfg: EvalConfig) -> str:
    if cfg.output:
        return cfg.output
    return os.path.join(cfg.run, "eval-base" if cfg.base_only else "eval")


class _Progress:
    """A progress bar that advances per UNet step (per denoising step of the images), so that
    it moves every few seconds even for a large model on a busy machine."""

    def __init__(self, total: int, desc: str, quiet: bool, unit: str = "step"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr,
                        leave=False, mininterval=0.5)

    def __call__(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def evaluate(config: EvalConfig | None = None, **overrides) -> dict:
    """Run the evaluation described by ``config`` (fields may also be given as keywords)."""
    cfg = config or EvalConfig()
    if overrides:
        cfg = EvalConfig(**{**asdict(cfg), **overrides})
    if isinstance(cfg.detectors, str):
        cfg.detectors = [d.strip() for d in cfg.detectors.split(",") if d.strip()]
    check_config(cfg)
    t_start = time.perf_counter()
    run = load_run(cfg.run) if cfg.run else RunInfo(path=None, info={"config": {}}, run_json_sha256=None)
    erased = list(cfg.erase) if cfg.erase else run.erased
    model_id = cfg.model or run.model
    from .profiles import profile_for

    profile = profile_for(model_id)
    cfg = _with_defaults(cfg, profile)
    if cfg.concepts or profile.heldout is None:
        heldout, concepts_info = load_concepts(cfg.concepts, exclude=erased)
    else:
        heldout, concepts_info = profile.heldout(erased)
    if cfg.prompts:
        rows, prompts_info = read_prompt_csv(cfg.prompts, erased)
    elif profile.prompts is not None:
        rows, source = profile.prompts(erased, heldout, cfg.images_per_prompt)
        prompts_info = {"path": None, "source": source, "rows": len(rows)}
    else:
        rows = default_prompts(erased, heldout, seeds=cfg.images_per_prompt)
        prompts_info = {"path": None, "source": f"default: each erased concept and the first 6 "
                        f"held-out concepts as prompts, seeds 0..{cfg.images_per_prompt - 1}",
                        "rows": len(rows)}
    from ..outdir import check_output_folder

    check_output_folder(_resolve_output(cfg), marker="report.json")
    device = _device(cfg.device)
    wdir = weights_dir(cfg.weights)
    options = {"nudenet_classes": cfg.nudenet_classes, "nudenet_model": cfg.nudenet_model}

    from .detectors import load_detector

    detectors = [load_detector(name, wdir, device, options) for name in dict.fromkeys(cfg.detectors)]
    for det in detectors:
        if hasattr(det, "prepare"):
            det.prepare(rows)

    from ..export import OutputDir

    out = OutputDir(_resolve_output(cfg), overwrite=cfg.overwrite, marker="report.json")
    try:
        report = _evaluate(cfg, run, erased, model_id, heldout, concepts_info, rows, prompts_info,
                           detectors, device, wdir, Path(out.tmp), t_start, profile.describe())
        report["output"] = str(out.path)
        (Path(out.tmp) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    except BaseException:
        out.abort()
        raise
    out.commit()
    run_dir = Path(run.path) if run.path else None
    if (not cfg.base_only and run_dir is not None and (run_dir / "run.json").is_file()
            and Path(out.path).resolve().parent == run_dir.resolve()):
        from ..modelcard import write_model_card

        write_model_card(run_dir, eval_report=report)  # the card now carries the summary
    return report


def _with_defaults(cfg: EvalConfig, profile) -> EvalConfig:
    """``cfg`` with every unset image setting taken from the model's evaluation profile."""
    import dataclasses

    fill = {"steps": profile.steps, "guidance": profile.guidance, "scheduler": profile.scheduler,
            "batch_size": profile.batch_size, "images_per_prompt": profile.images_per_prompt,
            "detectors": list(profile.detectors) if cfg.images else []}
    return dataclasses.replace(cfg, **{k: v for k, v in fill.items() if getattr(cfg, k) is None})


def _load_models(cfg, run, model_id, device):
    import torch

    from ..models import load_components

    sfw = cfg.single_file_weights or run.config.get("single_file_weights") or "non-ema"
    comps = load_components(model_id, single_file_weights=sfw, device=device, torch_dtype=torch.float32)
    if comps.family in ("sd3", "flux"):  # their erased transformer and LoRA would load as nothing
        raise UserError(f"{model_id!r} is an {comps.family.upper()} model: evaluating (and attacking) "
                        f"SD3/FLUX runs is not supported yet; generate with the run's transformer "
                        f"or LoRA in diffusers (the model card shows how)")
    recorded = run.info.get("model", {}).get("sha256")
    match = None if recorded is None else recorded == comps.content_hash
    if match is False and not cfg.allow_model_mismatch:
        raise UserError(f"the base model {model_id!r} loaded here (UNet sha256 {comps.content_hash[:12]}) is "
                        f"not the one the run was trained from ({recorded[:12]}); pass --model with the "
                        f"right weights, or --allow-model-mismatch")
    if cfg.base_only:
        return comps, comps.unet, match, None
    from diffusers import UNet2DConditionModel

    unet_dir = Path(run.path) / "unet"
    lora_dir = Path(run.path) / "lora"
    if not (unet_dir / "config.json").is_file() and lora_dir.is_dir():
        return comps, _base_with_lora(comps.unet, lora_dir), match, None
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{unet_dir} is missing; the run folder has no erased UNet (use --base-only to "
                        f"evaluate the base model)")
    try:
        erased = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the erased UNet from {unet_dir}: {str(exc).splitlines()[0]}") from None
    erased.to(device).eval()
    from ..models import module_content_hash

    return comps, erased, match, module_content_hash(erased)


def _base_with_lora(base_unet, lora_dir: Path):
    """The base UNet with a run's LoRA (``lora/``) loaded and merged: a plain UNet."""
    import copy

    unet = copy.deepcopy(base_unet)
    try:
        unet.load_lora_adapter(str(lora_dir), prefix="unet", adapter_name="erased",
                               weight_name="pytorch_lora_weights.safetensors")
        unet.fuse_lora(adapter_names=["erased"])
        unet.unload_lora()
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign LoRA file
        raise UserError(f"cannot load the run's LoRA from {lora_dir}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return unet.eval()


def _evaluate(cfg, run, erased, model_id, heldout, concepts_info, rows, prompts_info, detectors,
              device, wdir, folder: Path, t_start, defaults: dict) -> dict:
    from ..models.loading import vae_scale_factor
    from . import report as rep
    from .eps import eps_measures

    run_cfg = run.config
    comps, erased_unet, hash_match, erased_hash = _load_models(cfg, run, model_id, device)
    resolution = int(cfg.resolution or run_cfg.get("resolution") or comps.default_resolution)
    scale = vae_scale_factor(comps.vae) if comps.vae is not None else 8
    from ..model_bounds import MAX_RESOLUTION_FACTOR

    limit = MAX_RESOLUTION_FACTOR * comps.default_resolution
    if resolution > limit:
        raise UserError(f"--resolution {resolution} is far beyond what {model_id} supports: its "
                        f"native size is {comps.default_resolution} px and at most "
                        f"{MAX_RESOLUTION_FACTOR}x that ({limit} px) is accepted; use a smaller "
                        f"one, or leave --resolution out")
    if resolution % scale:
        raise UserError(f"resolution {resolution} is not a multiple of the VAE scale factor {scale}")
    latent_shape = (int(comps.unet.config.in_channels), resolution // scale, resolution // scale)
    timings = {"load_s": time.perf_counter() - t_start}

    # ---- ε-space -------------------------------------------------------------------------
    t0 = time.perf_counter()
    settings = EpsSettings(
        seeds=tuple(range(cfg.eps_seeds)),
        ddim_steps=int(cfg.eps_ddim_steps or run_cfg.get("ddim_steps") or 50),
        num_timesteps=cfg.eps_timesteps,
        guidance=float(cfg.eps_guidance if cfg.eps_guidance is not None else (3.0 if run_cfg.get("start_guidance") is None else run_cfg["start_guidance"])),
        negative_guidance=float(cfg.negative_guidance if cfg.negative_guidance is not None
                                else run_cfg.get("negative_guidance", 1.0)),
        batch_size=cfg.eps_batch_size)
    names = list(erased) + list(heldout)
    from ..backbones import make_backbone

    flow = {k: run_cfg.get(k) for k in ("resolution", "max_sequence_length", "distilled_guidance")}
    backbone = make_backbone(comps, device, settings.ddim_steps, **flow)
    text, uncond = backbone.encode(names), backbone.encode([""])
    from .eps import eps_work

    bar = _Progress(eps_work(settings, len(names)), "epsilon-space", cfg.quiet)
    try:
        eps = eps_measures(comps.unet, erased_unet, text, uncond, comps.scheduler, latent_shape,
                           settings, bar, predict=backbone.predict)
    finally:
        bar.close()
    eps_report = rep.eps_section(eps, erased, heldout, settings, concepts_info)
    timings["eps_s"] = time.perf_counter() - t0

    # ---- images ----------------------------------------------------------------------------
    images_report, records, grids = None, [], {}
    if cfg.images:
        t0 = time.perf_counter()
        images_report, records, grids = _images(cfg, comps, erased_unet, rows, prompts_info, detectors,
                                                resolution, folder)
        timings["images_s"] = time.perf_counter() - t0

    files = rep.write_outputs(folder, eps_report, images_report, records, grids)
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(cfg.detectors),
        "device": device,
        "base_only": cfg.base_only,
        "run": {"path": run.path, "run_json_sha256": run.run_json_sha256,
                "train_config": run_cfg or None, "model": run.info.get("model")},
        "erased_concepts": list(erased),
        "model": {"id": model_id, "base_unet_sha256": comps.content_hash,
                  "erased_unet_sha256": comps.content_hash if cfg.base_only else erased_hash,
                  "base_matches_run": hash_match, "random_weights": comps.random_weights,
                  "source": comps.source, "resolution": resolution},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("quiet",)},
        "defaults": defaults,
        "weights_dir": wdir if cfg.detectors else None,
        "eps_space": eps_report,
        "images": images_report,
        "files": files,
        "timings": timings,
    }
    if comps.random_weights:
        report["notice"] = ("the base model has random weights (the built-in tiny model): these numbers "
                            "test the pipeline, they say nothing about erasure quality")
    (folder / "report.md").write_text(rep.markdown(report))
    return report


def _images(cfg, comps, erased_unet, rows, prompts_info, detectors, resolution, folder: Path):
    from . import report as rep
    from .generate import GenSettings, build_pipelines, generate

    gen = GenSettings(steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                      resolution=resolution, batch_size=cfg.batch_size)
    pipes = build_pipelines(comps, erased_unet, cfg.scheduler)
    if cfg.save_images:
        for key in ("base", "erased"):
            (folder / "images" / key).mkdir(parents=True, exist_ok=True)
    records, grids = [], {}
    n_batches = -(-len(rows) // gen.batch_size)
    bar = _Progress(2 * n_batches * gen.steps, "images", cfg.quiet)
    try:
        for start in range(0, len(rows), gen.batch_size):
            batch = rows[start:start + gen.batch_size]
            prompts, seeds = [r.prompt for r in batch], [r.seed for r in batch]
            imgs = {}
            for key in ("base", "erased"):
                done = f"{start}/{len(rows)}"
                imgs[key] = generate(pipes[key], prompts, seeds, gen, resolution,
                                     on_step=lambda k=key, d=done: bar(1, model=k, prompts=d))
            recs = [{"row": r.as_dict(), "base": {}, "erased": {}, "pair": {}} for r in batch]
            for det in detectors:
                if det.kind == "pair":
                    for rec, s in zip(recs, det.pair_score(imgs["base"], imgs["erased"])):
                        rec["pair"][det.name] = s
                else:
                    for key in ("base", "erased"):
                        for rec, s in zip(recs, det.score(imgs[key], batch)):
                            rec[key][det.name] = s
            for i, r in enumerate(batch):
                if cfg.save_images:
                    for key in ("base", "erased"):
                        rep.save_png(imgs[key][i], folder / "images" / key / f"{r.index:05d}.png")
                grid = grids.setdefault(r.group, [])
                if len(grid) < cfg.grid_size:
                    grid.append((r, imgs["base"][i], imgs["erased"][i]))
            records.extend(recs)
    finally:
        bar.close()
    detector_report = {}
    for det in detectors:
        entry = {"settings": det.settings, "files": det.files}
        if det.kind == "pair":
            entry["results"] = det.aggregate(records)
        else:
            entry["results"] = {key: det.aggregate(records, key) for key in ("base", "erased")}
        detector_report[det.name] = entry
    groups = {}
    for r in rows:
        groups[r.group] = groups.get(r.group, 0) + 1
    # the pipeline class actually used (StableDiffusionXLPipeline for SDXL)
    protocol = {**gen.as_dict(resolution), "library": f"diffusers.{type(pipes['base']).__name__}"}
    images_report = {"protocol": protocol, "prompts": prompts_info, "groups": groups,
                     "saved": bool(cfg.save_images), "detectors": detector_report}
    return images_report, records, grids
