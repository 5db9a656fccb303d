"""Single-file Stable Diffusion checkpoints in the original CompVis (``ldm``) layout, and SDXL
checkpoints in Stability's SGM layout.

Keys: ``model.diffusion_model.*`` (UNet), ``model_ema.*`` (EMA copy of the UNet, names with the
dots removed: ``model.diffusion_model.input_blocks.0.0.weight`` ↔
``model_ema.diffusion_modelinput_blocks00weight``), ``cond_stage_model.transformer.*`` (SD1.x
OpenAI CLIP, already in transformers' naming), ``cond_stage_model.model.*`` (SD2.x OpenCLIP),
``first_stage_model.*`` (VAE). SDXL (SGM) files keep the UNet and VAE names and hold two text
encoders: ``conditioner.embedders.0.transformer.*`` (OpenAI CLIP ViT-L, transformers naming) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, with its ``text_projection``).

Everything is built from the configs shipped in ``models/configs``; nothing is fetched. The key
conversion uses diffusers' pure-dict converters (``diffusers.loaders.single_file_utils``); the
result must match the target model's parameter names and shapes exactly, else the file is
rejected with a one-line reason.

Which config: the family comes from the text encoder keys (OpenAI CLIP → SD1.x, OpenCLIP →
SD2.x, SGM conditioner → SDXL); among that family's shipped configs the first whose UNet names and shapes match the
checkpoint is used (``sd1``, then ``tiny`` for the built-in model's own exports; ``sdxl``, then
``tiny-sdxl``). SDXL files are epsilon at 1024 px and do not record ``force_zeros_for_empty_prompt``:
SDXL base's ``true`` is used. SD2.x files do
not record their parameterisation: like diffusers, a ``.ckpt`` whose ``global_step`` is 875000
(SD 2.0-base) is taken as epsilon at 512 px, every other SD2.x file as v-prediction at 768 px
(SD 2.0/2.1 768-v); pass ``prediction_type="epsilon"`` to ``load_components`` for 2.x-base files.
"""
from __future__ import annotations

import os

from . import shipped
from .errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
VAE_PREFIX = "first_stage_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SD2_BASE_GLOBAL_STEP = 875000


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.a.b.c`` → ``model_ema.diffusion_modelabc`` (CompVis LitEma naming)."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """``(state_dict, extras)`` of a ``.safetensors`` or ``.ckpt`` file; ``extras`` has e.g. ``global_step``."""
    name = os.path.basename(path)
    lower = path.lower()
    try:
        if lower.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu"), {}
        if lower.endswith(".ckpt"):
            import warnings

            import torch

            with warnings.catch_warnings():  # "Detected pickle protocol N": noise before a refusal
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(f"unsupported checkpoint extension for {name!r}; expected .safetensors or .ckpt")
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupted, truncated, or unsafe pickle content
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            import re

            found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|Check the documentation|$)",
                              str(exc), re.S)
            detail = (" ".join(found.group(1).split()).split(". ")[0].rstrip(".")[:160] if found
                      else "not a plain tensor pickle")
            raise ModelLoadError(
                f"cannot read checkpoint {path!r}: the weights-only loader refused it ({detail}); "
                f"it is damaged, or it holds Python objects besides tensors, which could run code "
                f"when unpickled; convert it to .safetensors with a tool you trust") from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read checkpoint {path!r}: {text[:200]}") from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"checkpoint {path!r} does not hold a state dict (got {type(obj).__name__})")
    extras = {k: obj[k] for k in ("global_step", "epoch") if k in obj and isinstance(obj[k], (int, float))}
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path!r}: 'state_dict' is not a dict")
    import torch

    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state, extras


def unet_state_dict(state: dict, weights: str, path: str) -> dict:
    """The CompVis-named UNet tensors (``model.diffusion_model.*`` keys) of the chosen copy."""
    keys = [k for k in state if k.startswith(UNET_PREFIX)]
    if not keys:
        raise ModelLoadError(
            f"checkpoint {path!r} has no UNet weights ({UNET_PREFIX}*): not a CompVis Stable Diffusion checkpoint"
        )
    if weights == "non-ema":
        return {k: state[k] for k in keys}
    if not _has_ema(state):
        raise ModelLoadError(
            f"checkpoint {path!r} has no EMA weights (model_ema.*); load it with non-ema weights "
            "(pruned checkpoints keep a single UNet copy)"
        )
    missing = [k for k in keys if ema_key(k) not in state]
    if missing:
        raise ModelLoadError(
            f"checkpoint {path!r}: EMA weights are incomplete ({len(missing)} UNet tensors have no "
            f"{ema_key(missing[0])!r}); load it with non-ema weights"
        )
    return {k: state[ema_key(k)] for k in keys}


def _family(state: dict, path: str) -> str:
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return "clip"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        return "openclip"
    if any(k.startswith("conditioner.embedders.") for k in state):
        if any(k.startswith(SDXL_CLIP_PREFIX) for k in state) and any(
                k.startswith(SDXL_OPENCLIP_PREFIX) for k in state):
            return "sdxl"
        raise ModelLoadError(
            f"checkpoint {path!r} is an SGM checkpoint without SDXL base's two text encoders "
            f"({SDXL_CLIP_PREFIX}* and {SDXL_OPENCLIP_PREFIX}*), e.g. an SDXL refiner: not supported")
    raise ModelLoadError(
        f"checkpoint {path!r} has no text encoder (cond_stage_model.*): not a full Stable Diffusion checkpoint"
    )


def shape_mismatch(converted: dict, model, what: str = "UNet") -> str | None:
    """Why a converted state dict does not fit ``model`` (one line), or None."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    if missing:
        return f"{len(missing)} {what} tensors missing, e.g. {missing[0]}"
    extra = sorted(set(converted) - set(expected))
    if extra:
        return f"{len(extra)} unexpected {what} tensors, e.g. {extra[0]}"
    for k, shape in expected.items():
        if tuple(converted[k].shape) != shape:
            return f"{k} has shape {tuple(converted[k].shape)}, the config expects {shape}"
    return None


def _empty(cls_factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls_factory()


def _convert_unet(unet_sd: dict, candidates, path: str):
    """Convert with the first candidate config that matches; return ``(variant, unet)``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    reasons = []
    for variant in candidates:
        cfg = shipped.load_config(variant, "unet")
        model = _empty(lambda: UNet2DConditionModel.from_config(cfg))
        converted = convert_ldm_unet_checkpoint(unet_sd, cfg)
        why = shape_mismatch(converted, model)
        if why is None:
            model.load_state_dict(converted, strict=True, assign=True)
            return variant, model
        reasons.append(f"{variant}: {why}")
    raise ModelLoadError(
        f"checkpoint {path!r}: the UNet matches no supported architecture ({'; '.join(reasons)})"
    )


def _text_encoder(state: dict, family: str, variant: str, path: str, component: str = "text_encoder",
                  prefix: str = OPENCLIP_PREFIX):
    """The ``component`` text encoder (``text_encoder_2``: ``CLIPTextModelWithProjection``) from
    OpenAI CLIP keys (``family="clip"``) or OpenCLIP keys under ``prefix``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    cfg = CLIPTextConfig(**shipped.model_kwargs(shipped.load_config(variant, component)))
    model = _empty(lambda: cls(cfg))
    if family == "clip":
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        converted = convert_ldm_clip_checkpoint(state)
    else:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    expected = model.state_dict()
    # Checkpoints name tensors "text_model.embeddings…" (or, in old exports, "embeddings…");
    # transformers 5's CLIPTextModel has no "text_model" level. Match either way.
    renamed = {}
    for k, v in converted.items():
        bare = k[len("text_model.") :] if k.startswith("text_model.") else k
        for cand in (k, bare, "text_model." + bare):
            if cand in expected:
                renamed[cand] = v
                break
    converted = renamed  # drops position_ids buffers, OpenCLIP's unused last layer, …
    missing = sorted(k for k in expected if k not in converted and not k.endswith("position_ids"))
    if missing:
        raise ModelLoadError(
            f"checkpoint {path!r}: the {component} lacks {len(missing)} tensors, e.g. {missing[0]}"
        )
    bad = [k for k, v in converted.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ModelLoadError(
            f"checkpoint {path!r}: {component} tensor {bad[0]} has shape {tuple(converted[bad[0]].shape)}, "
            f"expected {tuple(expected[bad[0]].shape)}"
        )
    model.load_state_dict(converted, strict=False, assign=True)
    return model


def _vae(state: dict, variant: str, path: str):
    if not any(k.startswith(VAE_PREFIX) for k in state):
        return None
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = shipped.load_config(variant, "vae")
    vae_sd = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    model = _empty(lambda: AutoencoderKL.from_config(cfg))
    converted = convert_ldm_vae_checkpoint(vae_sd, cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    bad = [k for k in converted if k in expected and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or bad:
        detail = f"lacks {missing[0]}" if missing else f"has {bad[0]} of shape {tuple(converted[bad[0]].shape)}"
        raise ModelLoadError(f"checkpoint {path!r}: the VAE does not match the {variant} config ({detail})")
    model.load_state_dict({k: v.contiguous() for k, v in converted.items() if k in expected}, strict=True, assign=True)
    return model


def _has_ema(state: dict) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
               for k in state)


def _load_sdxl(state: dict, unet_sd: dict, path: str, weights: str):
    """SDXL from an SGM-layout file: shipped ``sdxl`` (or ``tiny-sdxl``) configs, both text
    encoders, both tokenizers (the second pads with "!")."""
    from .parts import check_sdxl_widths, ddim_scheduler
    from .tokenizer import build_clip_tokenizer

    variant, unet = _convert_unet(unet_sd, shipped.SDXL_VARIANTS, path)
    parts = {
        "unet": unet,
        "text_encoder": _text_encoder(state, "clip", variant, path),
        "text_encoder_2": _text_encoder(state, "openclip", variant, path, "text_encoder_2",
                                        SDXL_OPENCLIP_PREFIX),
        "tokenizer": build_clip_tokenizer(shipped.PAD_TOKENS[variant]),
        "tokenizer_2": build_clip_tokenizer(shipped.PAD_TOKENS_2[variant]),
        "scheduler": ddim_scheduler(shipped.load_config(variant, "scheduler")),
        "vae": _vae(state, variant, path),
        "family": "sdxl",
        "extra": {"force_zeros_for_empty_prompt": True},
    }
    check_sdxl_widths(parts, path)
    source = {"format": "single_file", "path": os.path.abspath(path), "weights": weights,
              "has_ema": _has_ema(state), "sd_version": "xl" if variant == "sdxl" else variant,
              "config": variant}
    return parts, source


def load_single_file(path: str, *, weights: str = "non-ema", prediction_type: str | None = None):
    """``(parts, source)`` from a CompVis (SD1.x/SD2.x) or SGM (SDXL) checkpoint: ``parts`` is a
    dict of :class:`~ap_erase_fast.models.SDComponents` fields (modules, tokenizers, scheduler;
    for SDXL also ``family`` and ``extra``)."""
    from .parts import ddim_scheduler
    from .tokenizer import build_clip_tokenizer

    state, extras = read_checkpoint(path)
    if not state:
        raise ModelLoadError(f"checkpoint {path!r} contains no tensors")
    unet_sd = unet_state_dict(state, weights, path)
    family = _family(state, path)
    if family == "sdxl":
        return _load_sdxl(state, unet_sd, path, weights)
    if family == "clip":
        candidates = ("sd1", "tiny")
        v_rule = None
    else:
        if prediction_type is not None:
            v = prediction_type == "v_prediction"
            v_rule = f"prediction_type={prediction_type} (user)"
        else:
            v = extras.get("global_step") != SD2_BASE_GLOBAL_STEP
            v_rule = (
                f"global_step={extras.get('global_step')} ({'v-prediction, 768 px' if v else 'SD2.0-base: epsilon, 512 px'})"
            )
        candidates = ("sd2-v",) if v else ("sd2",)
    variant, unet = _convert_unet(unet_sd, candidates, path)
    text_encoder = _text_encoder(state, family, variant, path)
    vae = _vae(state, variant, path)
    scheduler = ddim_scheduler(shipped.load_config(variant, "scheduler"))
    tokenizer = build_clip_tokenizer(shipped.PAD_TOKENS[variant])
    source = {
        "format": "single_file",
        "path": os.path.abspath(path),
        "weights": weights,
        "has_ema": _has_ema(state),
        "sd_version": {"sd1": "1.x", "sd2": "2.x", "sd2-v": "2.x", "tiny": "tiny"}[variant],
        "config": variant,
    }
    if v_rule:
        source["prediction_type_rule"] = v_rule
    if "global_step" in extras:
        source["global_step"] = int(extras["global_step"])
    parts = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
             "vae": vae}
    return parts, source
