"""The README.md model card of an output folder, in the Hugging Face format (YAML front matter,
then markdown), so the folder can be pushed to a hub as it is.

It is written with the run's outputs (:func:`write_model_card` from ``run.json``) and rewritten by
``ap-erase eval`` with its summary (``eval/report.json``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CARD = "README.md"
EMPTY = '""'  # how the empty prompt is shown


def _yaml_list(items) -> str:
    return "\n".join(f"- {json.dumps(str(x))}" for x in items)


def _base_model(info: dict) -> str | None:
    """A hub id the base model can be named by (hub cards link it), else None."""
    model = info["model"]
    source = model.get("source") or {}
    if source.get("format") == "hub":
        return str(model["id"])
    return None


PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
FAMILY_TAGS = {"sdxl": "stable-diffusion-xl", "sd3": "stable-diffusion-3", "flux": "flux"}
# the class of the denoiser a run writes to unet/, and the pipeline argument it is passed as
DENOISERS = {"sd3": ("SD3Transformer2DModel", "transformer"),
             "flux": ("FluxTransformer2DModel", "transformer")}


def model_card(info: dict, eval_report: dict | None = None) -> str:
    cfg = info["config"]
    model = info["model"]
    concepts = cfg["erase"]
    lora = bool(cfg.get("lora_rank"))
    family = (info.get("backbone") or {}).get("family", "sd")
    pipeline = PIPELINES.get(family, "StableDiffusionPipeline")
    tags = ["text-to-image", "diffusers", "concept-erasure", "adversarial-preservation",
            "ap-erase", FAMILY_TAGS.get(family, "stable-diffusion")]
    if lora:
        tags.append("lora")
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags:",
             _yaml_list(tags)]
    base = _base_model(info)
    if base:
        front += [f"base_model: {json.dumps(base)}"]
    front += ["---", ""]

    names = ", ".join(f'"{c}"' for c in concepts)
    lines = [f"# {names} erased from {model['id']} with Adversarial Preservation", ""]
    if model.get("random_weights"):
        lines += ["> **Demo only.** The base model has random weights: this folder shows the "
                  "pipeline working, it erases nothing meaningful.", ""]
    lines += [
        f"This {'LoRA' if lora else 'model'} was made with ap_erase_fast "
        f"{info['library_version']}: "
        "Adversarial Preservation (Bui et al., *Erasing Undesirable Concepts in Diffusion Models "
        "with Adversarial Preservation*, NeurIPS 2024) fine-tunes the denoiser so that the erased "
        "concepts follow a negative-guidance target, while an adversarial search over a "
        "preservation set R keeps the concepts the erasure would hurt most unchanged.", "",
        "## Base model", "",
        f"* model: `{model['id']}` ({(model.get('source') or {}).get('format', 'unknown')} format)",
        f"* sha256 of the base denoiser's tensors: `{model['sha256']}`",
        f"* prediction type: {model.get('prediction_type', 'epsilon')}", "",
        "## Erased concepts", "", *[f"* {c}" for c in concepts], "",
        "## Method and settings", "",
        "| setting | value |", "|---|---|"]
    keys = ["train_method", "lora_rank", "lora_alpha", "steps", "pgd_steps", "schedule", "profile",
            "lr", "optimizer", "search", "search_lr", "tau", "gumbel_mode", "negative_guidance",
            "preserve_weight", "loss_space", "k_closest", "num_centers", "exclude_erased",
            "ddim_steps", "start_guidance", "batch_size", "mixed_precision", "seed"]
    lines += [f"| {k} | {cfg.get(k)} |" for k in keys if k in cfg and (lora or not k.startswith("lora"))]
    lines += ["", f"Outer steps run: {info['outer_steps']}; the full configuration is in "
              "`run.json`, the per-iteration log in `log.jsonl`.", "",
              "## Preservation set R", ""]
    for concept, r in info.get("preservation_sets", {}).items():
        words = r["words"]
        shown = ", ".join(w or EMPTY for w in words[:40])
        more = f" … ({len(words)} in all)" if len(words) > 40 else ""
        lines += [f"* **{concept}** ({len(words)} of {r['candidates']} candidates): {shown}{more}"]
    top = info.get("final_pi_top") or {}
    if top:
        lines += ["", "Where the search ended (top of π):", ""]
        for concept, entries in top.items():
            shown = ", ".join(f"{e['word'] or EMPTY} {e['prob']:.3f}" for e in entries[:5])
            lines += [f"* {concept}: {shown}"]
    lines += ["", "## Evaluation", ""]
    if eval_report:
        lines += _eval_summary(eval_report)
    else:
        lines += ["Not evaluated yet: run `ap-erase eval --run <this folder>` (it rewrites this "
                  "card with its summary)."]
    lines += ["", "## How to use", ""] + _how_to_use(info, pipeline, lora, family)
    quantized = cfg.get("base_quantization") not in (None, "none")
    if quantized:
        lines += ["", f"The LoRA was trained on the base model's {cfg['base_quantization']} copy "
                      "(bitsandbytes; the frozen base of the erasure). The code above applies it to "
                      "the original weights; it was not tested on a quantized pipeline."]
    if lora:
        merged = " `unet/` holds the denoiser with the LoRA merged in." if cfg.get("merge") else ""
        if family in DENOISERS:
            lines += ["", "`pytorch_lora_weights.safetensors` (here and in `lora/`) holds the adapters "
                      "under `transformer.` in diffusers' peft naming (ComfyUI reads this naming too). "
                      "`lora_comfyui.safetensors` is the same LoRA on the original "
                      f"{'FLUX (BFL)' if family == 'flux' else 'SD3 (MMDiT)'} module names, q/k/v fused "
                      "as in the original checkpoints, with kohya-ss keys (`lora_unet_…`), for ComfyUI "
                      "and the other tools that name those modules (put it in their LoRA folder)." + merged]
        else:
            lines += ["", "`lora_kohya.safetensors` is the same LoRA in the kohya format that "
                      "AUTOMATIC1111 and ComfyUI load (put it in their LoRA folder)." + merged]
    lines += ["", "## Intended use and limitations", "",
              "For research on concept erasure and for deployments that must not generate the "
              "erased concepts. Erasure lowers the chance of generating a concept; it is not a "
              "guarantee: adversarial prompts, other fine-tunes and image-to-image inputs can bring "
              "it back, and concepts close to the erased ones can be affected. Judge the model with "
              "your own prompts before relying on it; the evaluation above says how it was measured.",
              "", "## Citation", "", "```bibtex",
              "@inproceedings{bui2024erasing,",
              "  title={Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation},",
              "  author={Bui, Anh and Vuong, Long and Doan, Khanh and Le, Trung and Montague, Paul and "
              "Abraham, Tamas and Phung, Dinh},",
              "  booktitle={Advances in Neural Information Processing Systems},", "  year={2024}", "}",
              "```", ""]
    return "\n".join(front + lines)


def _how_to_use(info: dict, pipeline: str, lora: bool, family: str = "sd") -> list[str]:
    """Python that loads this folder on top of the base model the run actually used: a hub id,
    the local diffusers folder or single file it was loaded from, or a built-in model of this
    library (which no hub has)."""
    model = info["model"]
    source = model.get("source") or {}
    fmt = source.get("format")
    folder = "<this folder>"
    cls, arg = DENOISERS.get(family, ("UNet2DConditionModel", "unet"))
    flow_file = fmt == "single_file" and family in DENOISERS
    # the built-in models (tiny…, shapes…: only this library builds them), and SD3.5/FLUX single
    # files, which this library completes with a diffusers folder as the run did
    if fmt == "builtin" or flow_file:
        base = json.dumps(model["id"])
        if flow_file:  # an SD3.5/FLUX single file completed by a diffusers folder
            where, rest = str(source.get("path") or model["id"]), str(source.get("folder"))
            base = f"{json.dumps(where)}, model_folder={json.dumps(rest)}"
            lines = [f"The base model is the single file `{where}` completed by the diffusers folder "
                     f"`{rest}` (give their paths on your machine); ap_erase_fast (the library that made "
                     "this folder) loads them as the run did (to generate on a GPU, import torch and "
                     "add `torch_dtype=torch.bfloat16, device=\"cuda\"` to `load_components`):", "",
                     "```python"]
        else:
            lines = [f"The base model `{model['id']}` is built into ap_erase_fast (the library "
                     "that made this folder; no hub has it), so the pipeline comes from it:", "",
                     "```python"]
        if lora:
            lines += ["from ap_erase_fast.models import load_components", "",
                      f"pipe = load_components({base}).to_pipeline()",
                      f'pipe.load_lora_weights("{folder}/lora")']
        else:
            lines += ["import dataclasses", "", f"from diffusers import {cls}",
                      "from ap_erase_fast.models import load_components", "",
                      f'{arg} = {cls}.from_pretrained("{folder}/unet")',
                      f"base = load_components({base})",
                      f"pipe = dataclasses.replace(base, unet={arg}).to_pipeline()"]
        return lines + ["```"]
    if fmt == "single_file":
        where = json.dumps(str(source.get("path") or model["id"]))
        load, note = f"{pipeline}.from_single_file({where}", "the base checkpoint file"
    else:  # a hub id, or the local diffusers folder it was loaded from
        where = json.dumps(str(model["id"] if fmt == "hub" else source.get("path") or model["id"]))
        load = f"{pipeline}.from_pretrained({where}"
        note = "the base model" if fmt == "hub" else "the base model's diffusers folder"
    lines = [f"`{where.strip(chr(34))}` is {note} this run was trained from (give its path on "
             f"your machine).", "", "```python", "import torch"]
    if lora:
        lines += [f"from diffusers import {pipeline}", "",
                  f"pipe = {load}, torch_dtype=torch.float16)",
                  f'pipe.load_lora_weights("{folder}/lora")']
    else:
        lines += [f"from diffusers import {pipeline}, {cls}", "",
                  f'{arg} = {cls}.from_pretrained("{folder}/unet", '
                  "torch_dtype=torch.float16)",
                  f"pipe = {load}, {arg}={arg}, torch_dtype=torch.float16)"]
    return lines + ["```"]


def _eval_summary(report: dict) -> list[str]:
    lines = []
    eps = report.get("eps_space") or {}
    erasure = eps.get("erasure") or {}
    if erasure:
        lines += ["ε-space (`ap-erase eval`): gap to the negative-guidance target, base → erased:",
                  "", "| concept | gap (base) | gap (erased) | ratio |", "|---|---|---|---|"]
        for c, e in erasure.items():
            lines.append(f"| {c} | {_g(e.get('gap_base'))} | {_g(e.get('gap_erased'))} | "
                         f"{_g(e.get('gap_ratio'))} |")
        pres = eps.get("preservation") or {}
        if pres:
            lines += ["", f"Held-out concepts drift: mean {_g(pres.get('mean'))}, max "
                      f"{_g(pres.get('max'))}."]
    images = report.get("images") or {}
    for name, det in (images.get("detectors") or {}).items():
        lines += [""] + _detector_summary(name, det.get("results") or {}, images)
    lines += ["", "Full report: `eval/report.md`."]
    return lines


def _pct(v) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else str(v)


def _detector_summary(name: str, res: dict, images: dict) -> list[str]:
    """The numbers of one image-level detector: ESR / PSR (and the other per-group measures)
    of the base and the erased model, NER for NudeNet, LPIPS per prompt group."""
    pr = images.get("protocol") or {}
    how = (f" ({pr['steps']} sampling steps, CFG {pr['guidance_scale']}, {pr['resolution']} px)"
           if {"steps", "guidance_scale", "resolution"} <= set(pr) else "")
    if name == "nudenet":
        ner = {k: (res.get(k) or {}).get("ner") or {} for k in ("base", "erased")}
        shown = [t for t in ner["base"] if t in ner["erased"]]
        if not shown:
            return [f"{name}: see `eval/report.md`."]
        return [f"NudeNet{how}: " + "; ".join(
            f"NER@{t} {_pct(ner['base'][t])} (base) → {_pct(ner['erased'][t])} (erased)"
            for t in shown) + "."]
    if name == "lpips":
        parts = [f"{g} {_g(v.get('lpips'))}" for g, v in res.items() if isinstance(v, dict)]
        return [f"LPIPS(base, erased){how}: " + ", ".join(parts) + "."] if parts else []
    base, erased = res.get("base") or {}, res.get("erased") or {}
    rows, judged = [], False
    for group, values in erased.items():
        for metric, value in values.items():
            if metric == "images" or not isinstance(value, (int, float)):
                continue
            before = (base.get(group) or {}).get(metric)
            judged = judged or metric.split("-")[0] in ("ESR", "PSR")
            fraction = metric.split("-")[0] in ("ESR", "PSR") or "accuracy" in metric
            fmt = _pct if fraction else _g
            rows.append(f"| {group} | {values.get('images', '')} | {metric} | {fmt(before)} | "
                        f"{fmt(value)} |")
    if not rows:
        return [f"{name}: see `eval/report.md`."]
    meaning = ("; ESR: the share of the erased prompts' images that no longer show their "
               "concept, PSR: the share of the other prompts' images that still show theirs"
               if judged else "")
    return ([f"Images judged by the `{name}` detector{how}{meaning}:", "",
             "| prompts | images | measure | base | erased |", "|---|---|---|---|---|"] + rows)


def _g(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def write_model_card(folder: str | os.PathLike, info: dict | None = None,
                     eval_report: dict | None = None) -> Path:
    """Write ``folder/README.md`` from ``info`` (default: ``folder/run.json``) and the eval
    report (default: ``folder/eval/report.json`` when it exists)."""
    folder = Path(folder)
    if info is None:
        info = json.loads((folder / "run.json").read_text())
    if eval_report is None and (folder / "eval" / "report.json").is_file():
        eval_report = json.loads((folder / "eval" / "report.json").read_text())
    path = folder / CARD
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(model_card(info, eval_report), encoding="utf-8")
    os.replace(tmp, path)
    return path
