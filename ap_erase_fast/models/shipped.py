"""Configs shipped inside the package (``models/configs/<variant>/<component>/…json``).

Variants: ``tiny`` (the built-in demo model), ``sd1`` (SD1.x, 512 px, epsilon), ``sd2`` (SD2.x
base, 512 px, epsilon), ``sd2-v`` (SD2.x 768-v, v-prediction), ``sdxl`` (SDXL base 1.0, 1024 px,
epsilon; the scheduler config is SDXL's own Euler one, whose noise schedule the DDIM tables
take), ``tiny-sdxl`` (the built-in SDXL-shaped demo model), ``tiny-sd3`` and ``tiny-flux`` (the built-in
SD3- and FLUX.1-dev-shaped demo models), and the transformer and scheduler configs of the real
flow-matching models ``sd3.5-medium``, ``sd3.5-large`` and ``flux.1-dev`` (for parameter counts on
the meta device). Nothing is fetched from a hub.
"""
from __future__ import annotations

import copy
import functools
import json
import os

VARIANTS = ("tiny", "sd1", "sd2", "sd2-v", "sdxl", "tiny-sdxl", "tiny-sd3", "tiny-flux",
            "sd3.5-medium", "sd3.5-large", "flux.1-dev")
FLOW_VARIANTS = ("tiny-sd3", "tiny-flux", "sd3.5-medium", "sd3.5-large", "flux.1-dev")
SDXL_VARIANTS = ("sdxl", "tiny-sdxl")
_FILES = {
    "unet": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "text_encoder_3": "config.json",
    "transformer": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}
# Padding token of the tokenizer each family ships with: OpenAI CLIP pads with <|endoftext|>,
# the OpenCLIP-based SD2 tokenizer pads with "!" (id 0). SDXL: its first tokenizer (CLIP ViT-L)
# pads with <|endoftext|>, its second (OpenCLIP ViT-bigG, ``tokenizer_2``) with "!".
PAD_TOKENS = {"tiny": "<|endoftext|>", "sd1": "<|endoftext|>", "sd2": "!", "sd2-v": "!",
              "sdxl": "<|endoftext|>", "tiny-sdxl": "<|endoftext|>"}
PAD_TOKENS_2 = {"sdxl": "!", "tiny-sdxl": "!"}


def configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(variant: str, component: str) -> str:
    if variant not in VARIANTS:
        raise KeyError(f"unknown shipped config variant {variant!r}; choose from {VARIANTS}")
    return os.path.join(configs_dir(), variant, component, _FILES[component])


@functools.lru_cache(maxsize=None)
def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_config(variant: str, component: str) -> dict:
    """A fresh copy of a shipped config dict (callers may modify it)."""
    return copy.deepcopy(_read(config_path(variant, component)))


def model_kwargs(config: dict) -> dict:
    """Config dict without the bookkeeping keys (``_class_name``, ``architectures``, …)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
