"""Run outputs: written into a temporary sibling folder and renamed into place at the end, so a
failed or interrupted run never leaves a half-written output folder (the folder's lock, the
commit and the recovery after a kill: :mod:`ap_erase_fast.outdir`).

Layout of an output folder:

* ``unet/`` — a diffusers UNet folder (``UNet2DConditionModel.from_pretrained``), the fine-tuned θ'
  (SD3/FLUX: the transformer, ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``);
* with ``--lora-rank``, instead: ``lora/`` and ``pytorch_lora_weights.safetensors`` (the same
  diffusers LoRA file, so ``pipe.load_lora_weights`` loads the folder or ``lora/``),
  ``lora_kohya.safetensors`` (SD1/SDXL) or ``lora_comfyui.safetensors`` (SD3/FLUX: the LoRA on
  the original BFL/SAI module names, :mod:`ap_erase_fast.lora_formats`) and, with ``--merge``,
  ``unet/`` (:mod:`ap_erase_fast.lora`);
* ``trained.safetensors`` — only the trained tensors, with provenance in the header metadata;
* ``run.json`` — resolved config, R per concept, final π, timings, UNet calls per outer step;
* ``log.jsonl`` — one line per loop iteration.
"""
from __future__ import annotations

import json
from pathlib import Path

from .faults import fault_point
from .outdir import OutputDir, checkpoint_root_for  # noqa: F401  (re-exported: the output folder of a run)

TRAINED_FORMAT = "ap_erase_fast.trained/v1"


def trained_metadata(info: dict) -> dict[str, str]:
    """safetensors header metadata (string values only) describing where the tensors came from."""
    cfg = info["config"]
    return {
        "format": TRAINED_FORMAT,
        "library_version": info["library_version"],
        "base_model": str(info["model"]["id"]),
        "base_model_sha256": str(info["model"]["sha256"]),
        "base_model_source": json.dumps(info["model"]["source"], sort_keys=True),
        "random_weights": json.dumps(bool(info["model"]["random_weights"])),
        "erased_concepts": json.dumps(cfg["erase"]),
        "train_method": cfg["train_method"],
        "schedule": cfg["schedule"],
        "profile": cfg["profile"],
        "seed": str(cfg["seed"]),
        "steps": str(info["outer_steps"]),
        "settings": json.dumps(cfg, sort_keys=True),
    }


def write_outputs(folder: Path, unet, trained: dict, info: dict, log: list[dict],
                  pipeline_class=None) -> None:
    """The run's outputs: ``unet/`` (or, with LoRA, ``lora/``, a copy of its
    ``pytorch_lora_weights.safetensors`` beside it, ``lora_kohya.safetensors`` or, for SD3/FLUX,
    ``lora_comfyui.safetensors`` and, with ``--merge``, ``unet/``), the trained tensors, run.json,
    log.jsonl and the model card."""
    from safetensors.torch import save_file

    from .modelcard import write_model_card

    if info["config"].get("lora_rank"):
        from .lora import write_lora_outputs

        write_lora_outputs(folder, unet, trained, pipeline_class, merge=info["config"]["merge"])
        from .lora_formats import write_original_layout_lora

        write_original_layout_lora(folder, unet, trained)  # SD3/FLUX only
    else:
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    fault_point("outputs-write")
    save_file(trained, str(folder / "trained.safetensors"), metadata=trained_metadata(info))
    (folder / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    with open(folder / "log.jsonl", "w") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in log)
    if info["model"]["random_weights"]:
        (folder / "RANDOM_WEIGHTS.txt").write_text(info["notice"] + "\n")
    write_model_card(folder, info)
