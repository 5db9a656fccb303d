"""Loading the flow-matching transformers, SD3/SD3.5 and FLUX.1 (dev, schnell), from diffusers
pipeline folders (and hub snapshots of them), with the checks that refuse the variants the flow
backbone does not drive, each with a one-line :class:`ModelLoadError`.

A folder is a flow model when it has ``transformer/`` and no ``unet/``; the transformer's class
decides the family: ``SD3Transformer2DModel`` → ``sd3`` (CLIP-L + CLIP-G with projections,
T5 ``text_encoder_3``), ``FluxTransformer2DModel`` → ``flux`` (CLIP-L, T5 ``text_encoder_2``).
A folder also completes a single-file checkpoint (:mod:`.flow_single_file`): then the file's
modules are ``provided``, the folder needs no ``transformer/`` and supplies the rest.
"""
from __future__ import annotations

import os

from .errors import ModelLoadError
from .parts import first_line, optional_vae, read_json

FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# pipelines of these families whose inputs the backbone does not build (extra image channels,
# reference images, control inputs)
_SUPPORTED_PIPELINES = {"sd3": ("StableDiffusion3Pipeline",), "flux": ("FluxPipeline",)}
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels)


def is_flow_folder(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "transformer")) and not os.path.isdir(os.path.join(folder, "unet"))


def flow_family(folder: str, model_id: str) -> str:
    """``sd3`` or ``flux`` for a flow pipeline folder; a one-line error for anything else."""
    index = read_json(os.path.join(folder, "model_index.json"), f"{model_id}/model_index.json")
    cfg = read_json(os.path.join(folder, "transformer", "config.json"), f"{model_id}/transformer/config.json")
    family = FLOW_TRANSFORMERS.get(cfg.get("_class_name"))
    if family is None:
        raise ModelLoadError(f"model {model_id!r} has a {cfg.get('_class_name')} transformer: only SD3/SD3.5 "
                             "(SD3Transformer2DModel) and FLUX.1 (FluxTransformer2DModel) are supported")
    pipeline = index.get("_class_name")
    if pipeline not in _SUPPORTED_PIPELINES[family]:
        raise ModelLoadError(f"model {model_id!r} is a {pipeline} model: not supported; only text-to-image "
                             f"{' / '.join(_SUPPORTED_PIPELINES[family])} models are")
    return family


def pipeline_family(folder: str, model_id: str) -> str:
    """``sd3`` or ``flux`` from a folder's ``model_index.json`` pipeline class (a one-line error
    for any other pipeline); the folder that completes a single-file transformer."""
    index = read_json(os.path.join(folder, "model_index.json"), f"{model_id}/model_index.json")
    pipeline = index.get("_class_name")
    for family, names in _SUPPORTED_PIPELINES.items():
        if pipeline in names:
            return family
    raise ModelLoadError(f"folder {model_id!r} is a {pipeline} pipeline: an SD3.5 or FLUX.1 single file needs its "
                         "base model's StableDiffusion3Pipeline or FluxPipeline folder")


def check_flow_widths(parts: dict, family: str, model_id: str) -> None:
    """The transformer's inputs fit the text encoders and the VAE (one-line errors)."""
    tr = parts["unet"].config
    vae = parts.get("vae")
    if family == "flux":
        clip, t5 = parts["text_encoder"].config, parts["text_encoder_2"].config
        if vae is not None and tr.in_channels != 4 * vae.config.latent_channels:
            raise ModelLoadError(
                f"model {model_id!r}: the FLUX transformer takes {tr.in_channels} input channels, not "
                f"4 × {vae.config.latent_channels} packed latent channels (a Fill/Depth/Canny-type model?): "
                "not supported")
        pairs = [("CLIP width", clip.hidden_size, "pooled_projection_dim", tr.pooled_projection_dim),
                 ("T5 width", t5.d_model, "joint_attention_dim", tr.joint_attention_dim)]
    else:
        te1, te2, t5 = (parts[k].config for k in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        if te1.hidden_size + te2.hidden_size > t5.d_model:
            raise ModelLoadError(f"model {model_id!r}: CLIP widths {te1.hidden_size} + {te2.hidden_size} do not "
                                 f"fit T5's width {t5.d_model}")
        pairs = [("CLIP projections", te1.projection_dim + te2.projection_dim, "pooled_projection_dim",
                  tr.pooled_projection_dim),
                 ("T5 width", t5.d_model, "joint_attention_dim", tr.joint_attention_dim)]
    for what, have, key, want in pairs:
        if have != want:
            raise ModelLoadError(f"model {model_id!r}: {what} {have} does not match the transformer's {key} {want}")


def load_flow_folder(folder: str, model_id: str, provided: dict | None = None, family: str | None = None) -> dict:
    """The SDComponents fields of an SD3 or FLUX diffusers folder (modules on CPU, fp32 as stored).

    ``provided``: modules already built (from a single file: ``unet`` = the transformer, text
    encoders, ``vae``), used instead of the folder's; with them ``family`` is the file's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5EncoderModel)

    from .tokenizer import build_clip_tokenizer

    provided = provided or {}
    family = family or flow_family(folder, model_id)
    t5_sub = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    required = ["text_encoder", "scheduler", t5_sub, t5_sub.replace("text_encoder", "tokenizer")]
    if family == "sd3":
        required.append("text_encoder_2")
    missing = [s for s in required if not os.path.isdir(os.path.join(folder, s)) and s not in provided]
    if missing:
        what = {"text_encoder_3": " (SD3 without its T5 encoder is not supported)"}.get(missing[0], "")
        raise ModelLoadError(f"diffusers folder {model_id!r} lacks the subfolder(s) {', '.join(missing)}{what}")
    sched_cfg = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"), f"{model_id}/scheduler")
    if sched_cfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ModelLoadError(f"model {model_id!r}: scheduler {sched_cfg.get('_class_name')} is not "
                             "FlowMatchEulerDiscreteScheduler")

    def clip_tokenizer(sub, pad):
        if os.path.isdir(os.path.join(folder, sub)):
            return CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
        return build_clip_tokenizer(pad)

    def module(sub, cls):
        if sub in provided:
            return provided[sub]
        return cls.from_pretrained(folder, subfolder=sub, local_files_only=True)

    step = "transformer"
    try:
        cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
        parts = {"unet": provided["unet"] if "unet" in provided else
                 cls.from_pretrained(folder, subfolder="transformer", local_files_only=True)}
        step = "text_encoder"
        parts["text_encoder"] = module("text_encoder", CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)
        parts["tokenizer"] = clip_tokenizer("tokenizer", "<|endoftext|>")
        if family == "sd3":
            step = "text_encoder_2"
            parts["text_encoder_2"] = module("text_encoder_2", CLIPTextModelWithProjection)
            parts["tokenizer_2"] = clip_tokenizer("tokenizer_2", "!")
        step = t5_sub
        parts[t5_sub] = module(t5_sub, T5EncoderModel)
        tok = t5_sub.replace("text_encoder", "tokenizer")
        parts[tok] = AutoTokenizer.from_pretrained(folder, subfolder=tok, local_files_only=True)
        step = "scheduler"
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg)
        step = "vae"
        parts["vae"] = provided["vae"] if "vae" in provided else optional_vae(folder)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupted weights, bad configs, …
        raise ModelLoadError(f"cannot load the {step} of {model_id!r}: {first_line(exc)}") from None
    check_flow_widths(parts, family, model_id)
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1) if parts["vae"] is not None else 8
    size = parts["unet"].config.get("sample_size") if family == "sd3" else FLUX_DEFAULT_SAMPLE_SIZE
    parts.update(family=family, default_resolution=int(size) * factor)
    return parts
