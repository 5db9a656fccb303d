"""What every loader (:mod:`.loading`, :mod:`.single_file`, :mod:`.tiny`) builds the same way:
the DDIM scheduler of a model and the SDXL text-encoder/UNet width check. It sits below the
loaders so that none of them imports another for these."""
from __future__ import annotations

from . import shipped
from .errors import ModelLoadError

# Scheduler settings taken from a model's own scheduler config; the DDIM-specific rest comes
# from the SD defaults (a PNDM config has no clip_sample/set_alpha_to_one of DDIM's meaning).
_SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


def ddim_scheduler(config: dict | None = None):
    """A ``DDIMScheduler``: SD defaults overlaid with a model's own noise-schedule settings."""
    from diffusers import DDIMScheduler

    base = shipped.load_config("sd1", "scheduler")
    if config:
        if config.get("_class_name") == "DDIMScheduler":
            base.update({k: v for k, v in config.items() if not k.startswith("_")})
        else:
            base.update({k: config[k] for k in _SCHEDULER_KEYS if k in config})
    return DDIMScheduler.from_config(base)


def check_sdxl_widths(parts: dict, model_id: str) -> None:
    """The SDXL UNet's inputs match its text encoders: per-token states are both encoders'
    hidden states side by side (768 + 1280 = 2048 in SDXL base), and the added-conditioning
    MLP reads the pooled projection plus six embedded time ids (1280 + 6·256 = 2816)."""
    unet, te1, te2 = parts["unet"].config, parts["text_encoder"].config, parts["text_encoder_2"].config
    width = te1.hidden_size + te2.hidden_size
    if width != unet.cross_attention_dim:
        raise ModelLoadError(
            f"model {model_id!r}: text encoder widths {te1.hidden_size} + {te2.hidden_size} do not match the "
            f"UNet's cross-attention dim {unet.cross_attention_dim}")
    added = te2.projection_dim + 6 * unet.addition_time_embed_dim
    if added != unet.projection_class_embeddings_input_dim:
        raise ModelLoadError(
            f"model {model_id!r}: the UNet's added conditioning takes {unet.projection_class_embeddings_input_dim} "
            f"values, but the pooled text ({te2.projection_dim}) and six time ids "
            f"({6 * unet.addition_time_embed_dim}) give {added} (an SDXL refiner-type UNet?)")


def read_json(path: str, what: str) -> dict:
    """A JSON file of a model folder; a one-line :class:`ModelLoadError` naming ``what``."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {what}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def optional_vae(folder: str):
    """The folder's ``vae/`` (an ``AutoencoderKL``), or None where it has none."""
    import os

    if not os.path.isdir(os.path.join(folder, "vae")):
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
