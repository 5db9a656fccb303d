"""Loading the ShapesWorld model and classifier (the shipped copy or a training work folder)."""
from __future__ import annotations

import os
from types import SimpleNamespace

_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
SHIPPED_DIR = os.path.join(_MODELS, "shapes")
# shapes2-flow: ShapesWorld 2 drawn by an SD3-shaped flow-matching transformer (train_flow.py),
# with shapes2's VAE, text encoder, classifier and world
SHIPPED_DIRS = {"shapes": SHIPPED_DIR, "shapes2": os.path.join(_MODELS, "shapes2"),
                "shapes2-flow": os.path.join(_MODELS, "shapes2_flow")}
ENV_VARS = {"shapes": "AP_ERASE_SHAPES_DIR", "shapes2": "AP_ERASE_SHAPES2_DIR",
            "shapes2-flow": "AP_ERASE_SHAPES2_FLOW_DIR"}
WORLDS = {"shapes": 1, "shapes2": 2, "shapes2-flow": 2}
# the built-in models whose search runs over the world's own vocabulary (its training captions)
VOCABULARIES = {"shapes": "shapes", "shapes2": "shapes2", "shapes2-flow": "shapes2"}


def world_of(model: str):
    """The world module (``SHAPES``, ``COLOURS``, captions) of the built-in model ``model``."""
    from .nets import world_module

    return world_module(WORLDS[model])


def shipped_dir(name: str = "shapes") -> str:
    """Where ``--model shapes`` (ShapesWorld), ``--model shapes2`` (ShapesWorld 2) or
    ``--model shapes2-flow`` (ShapesWorld 2, flow transformer) and its classifier are read from:
    the package's copy, or the folder in ``AP_ERASE_SHAPES_DIR`` / ``AP_ERASE_SHAPES2_DIR`` /
    ``AP_ERASE_SHAPES2_FLOW_DIR`` (a retrained model written by ``train --ship`` /
    ``train_flow --ship``)."""
    if name not in SHIPPED_DIRS:
        raise ValueError(f"no built-in ShapesWorld model {name!r}; choose one of {sorted(SHIPPED_DIRS)}")
    return os.environ.get(ENV_VARS[name]) or SHIPPED_DIRS[name]


def load_shapes_folder(model_dir, *, vae_dir=None, fp16_weights=False):
    """``unet``, ``text_encoder``, ``tokenizer``, ``vae``, ``scheduler`` (fp32, eval mode) from a
    folder holding ``unet/``, ``text_encoder/`` and (unless ``vae_dir``) ``vae/``. With
    ``fp16_weights`` the weights are rounded through fp16 first, as the shipped files are."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..models.tokenizer import build_clip_tokenizer
    from .nets import MAX_LENGTH, SCHEDULER_CONFIG

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"))
    vae = AutoencoderKL.from_pretrained(vae_dir or os.path.join(model_dir, "vae"))
    mods = (unet, text_encoder, vae)
    for m in mods:
        m.to(torch.float32).eval()
        if fp16_weights:
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.half().float())
    return SimpleNamespace(
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        tokenizer=build_clip_tokenizer(model_max_length=MAX_LENGTH),
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
    )
