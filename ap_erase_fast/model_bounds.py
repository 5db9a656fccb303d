"""Bounds that depend on the model, read from its config files before any weight is loaded: the
largest --resolution it can be asked for and the largest --lora-rank its adapted layers allow.
Checked up front by the command line and by :func:`ap_erase_fast.erase`, so a setting the model
cannot use costs a second, not a model load and a crash."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import UserError

# --resolution may go up to this many times the model's native size (per side); beyond it a
# sampled trajectory needs tens of GB and the model was never trained for it
MAX_RESOLUTION_FACTOR = 4
# for a model whose config cannot be read before loading (.ckpt, uncached hub id): 4 × SDXL's 1024
GENERIC_MAX_RESOLUTION = 4096


@dataclass
class ModelShape:
    """What the bounds need of a model: its UNet config, its VAE's downsampling factor and its
    native resolution in pixels."""
    unet_config: dict
    vae_factor: int

    @property
    def native_resolution(self) -> int:
        size = self.unet_config.get("sample_size") or 64
        if isinstance(size, (list, tuple)):  # (height, width)
            size = max(size)
        return int(size) * self.vae_factor

    @property
    def resolution_multiple(self) -> int:
        blocks = self.unet_config.get("down_block_types")
        down = len(blocks) if isinstance(blocks, (list, tuple)) and blocks else 1
        return self.vae_factor * 2 ** (down - 1)


def _read_json_file(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _folder_shape(folder: str) -> ModelShape | None:
    unet = _read_json_file(os.path.join(folder, "unet", "config.json"))
    if unet is None:
        return None
    vae = _read_json_file(os.path.join(folder, "vae", "config.json"))
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae and vae.get("block_out_channels") else 8
    return ModelShape(unet, factor)


def _shipped_shape(variant: str) -> ModelShape:
    from .models import shipped

    vae = shipped.load_config(variant, "vae")
    return ModelShape(shipped.load_config(variant, "unet"), 2 ** (len(vae["block_out_channels"]) - 1))


def peek_model(model: str) -> ModelShape | None:
    """The UNet config and VAE factor of ``model`` from its config files only (built-in models,
    diffusers folders, hub ids already in the local cache, .safetensors files by their key
    names); None where that is not possible without loading it (then the loader's own checks
    apply). Never raises: a broken model is the loader's to report."""
    try:
        model = os.fspath(model)
        if model in ("tiny", "tiny-sdxl"):
            return _shipped_shape(model)
        from .shapes.loading import SHIPPED_DIRS, shipped_dir

        if model in SHIPPED_DIRS:
            return _folder_shape(shipped_dir(model))
        path = os.path.expanduser(model)
        if os.path.isdir(path):
            return _folder_shape(path)
        if os.path.isfile(path):
            if not path.lower().endswith(".safetensors"):
                return None  # a .ckpt is a pickle: reading its keys is loading it
            from safetensors import safe_open

            from .models.single_file import _family

            with safe_open(path, framework="pt") as fh:
                keys = dict.fromkeys(fh.keys())
            # SD2's 768-v and 512 UNets have the same layers; the larger native size bounds both
            return _shipped_shape({"clip": "sd1", "openclip": "sd2-v", "sdxl": "sdxl"}[
                _family(keys, path)])
        from huggingface_hub import try_to_load_from_cache

        unet = try_to_load_from_cache(model, "unet/config.json")
        if isinstance(unet, str):
            return _folder_shape(os.path.dirname(os.path.dirname(unet)))
    except Exception:  # noqa: BLE001 - whatever is wrong, the loader says it better
        return None
    return None


def lora_rank_bound(unet_config: dict, train_method: str) -> tuple[int, int]:
    """(the largest rank any layer adapted under ``train_method`` can use, i.e. the largest
    min(in, out) over those layers, number of those layers), from a UNet config on the meta
    device (no memory, about a second for SDXL)."""
    import logging

    import torch

    verbose = os.environ.get("AP_ERASE_VERBOSE") == "1"
    if not verbose:  # its optional-kernel probe, as cli.quiet_libraries
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    from .models.trainable import _meta_unet, parameter_is_trained

    before = diffusers_logging.get_verbosity()
    if not verbose:  # notes on config keys this diffusers does not know: the load says them
        diffusers_logging.set_verbosity_error()
    try:
        unet = _meta_unet(unet_config)
    finally:
        diffusers_logging.set_verbosity(before)
    bound, count = 0, 0
    for name, module in unet.named_modules():
        params = [n for n, _ in module.named_parameters(recurse=False)]
        if not params or not all(parameter_is_trained(f"{name}.{n}", train_method) for n in params):
            continue
        if isinstance(module, torch.nn.Linear):
            size = min(module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            size = min(module.in_channels * kh * kw, module.out_channels)
        else:
            continue
        bound, count = max(bound, size), count + 1
    return bound, count


def check_model_bounds(cfg) -> None:  # cfg: an EraseConfig (config imports this module)
    """Refuse settings the model cannot use, before it is loaded: a --resolution far beyond the
    model's native size (a trajectory would need tens of GB), a --lora-rank larger than every
    layer it adapts."""
    shape = peek_model(cfg.model)
    if cfg.resolution is not None:
        if shape is not None:
            native = shape.native_resolution
            limit = MAX_RESOLUTION_FACTOR * native
            if cfg.resolution > limit:
                raise UserError(
                    f"--resolution {cfg.resolution} is far beyond what --model {cfg.model} "
                    f"supports: its native size is {native} px and at most "
                    f"{MAX_RESOLUTION_FACTOR}x that ({limit} px) is accepted; use a multiple of "
                    f"{shape.resolution_multiple} up to {limit}, or leave --resolution out")
        elif cfg.resolution > GENERIC_MAX_RESOLUTION:
            raise UserError(
                f"--resolution {cfg.resolution} is far beyond what any supported model takes "
                f"(at most {GENERIC_MAX_RESOLUTION} px, {MAX_RESOLUTION_FACTOR}x SDXL's native "
                f"1024); use a smaller one, or leave --resolution out for the model's own")
    if cfg.lora_rank and shape is not None:
        try:
            bound, count = lora_rank_bound(shape.unet_config, cfg.train_method)
        except Exception:  # noqa: BLE001 - a config diffusers cannot build: the loader says why
            bound, count = 0, 0
        if count and cfg.lora_rank > bound:
            raise UserError(
                f"--lora-rank {cfg.lora_rank} is larger than any layer it adapts: the largest of "
                f"the {count} layers --train-method {cfg.train_method} selects in --model "
                f"{cfg.model} has min(in, out) = {bound}; use --lora-rank {bound} or less "
                f"(typically 4 to 64)")
