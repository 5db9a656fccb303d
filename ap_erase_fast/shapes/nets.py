"""The ShapesWorld networks: the component configs of the text-to-image models (ShapesWorld 1
and 2) and the attribute classifier used to score them."""
from __future__ import annotations

import torch
from torch import nn

from .world import COLOURS, SHAPES

MAX_LENGTH = 16  # captions are <= 10 tokens; cross-attention over 16 keys instead of 77

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=32,
)
# ShapesWorld 2 (15 shapes, 8 colours, fill, size, background): the same layout, wider.
UNET2_CONFIG = dict(UNET_CONFIG, block_out_channels=(96, 192))
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


class ShapeClassifier(nn.Module):
    """Small CNN for 32x32 images in [0, 1] with one linear head per attribute (``heads``: name ->
    number of classes, default ShapesWorld's shape and colour). ``forward`` returns the logits in
    the order of ``heads``; the first two heads must be shape and colour."""

    def __init__(self, widths=(16, 32, 64, 128), heads=None):
        super().__init__()
        heads = dict(heads or {"shape": len(SHAPES), "colour": len(COLOURS)})
        if list(heads)[:2] != ["shape", "colour"]:
            raise ValueError(f"the first two classifier heads must be shape and colour, got {list(heads)}")
        self.heads = tuple(heads)
        layers, cin = [], 3
        for i, w in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        for name, count in heads.items():
            setattr(self, f"{name}_head", nn.Linear(cin, count))

    def forward(self, x):
        h = self.features(x * 2 - 1).mean(dim=(2, 3))
        return tuple(getattr(self, f"{name}_head")(h) for name in self.heads)

    @torch.no_grad()
    def predict_all(self, images, batch_size: int = 256):
        """Softmax probabilities per head, ``{name: [n, classes]}``, for images in [0, 1]."""
        self.eval()
        probs = {name: [] for name in self.heads}
        for i in range(0, len(images), batch_size):
            for name, logits in zip(self.heads, self(images[i : i + batch_size].float())):
                probs[name].append(logits.softmax(-1))
        return {name: torch.cat(p) for name, p in probs.items()}

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256):
        """Top-1 ``(shape_idx, colour_idx)`` and softmax probabilities for images in [0, 1]."""
        probs = self.predict_all(images, batch_size)
        ps, pc = probs["shape"], probs["colour"]
        return ps.argmax(-1), pc.argmax(-1), ps, pc


def world_module(world: int):
    """The world definition module of ShapesWorld ``world`` (1 or 2)."""
    if world == 1:
        from . import world as mod
    elif world == 2:
        from . import world2 as mod
    else:
        raise ValueError(f"ShapesWorld {world!r} does not exist; use 1 or 2")
    return mod


def classifier_heads(world: int) -> dict:
    """Classifier head sizes of ShapesWorld ``world``: shape and colour first."""
    mod = world_module(world)
    if world == 1:
        return {"shape": len(mod.SHAPES), "colour": len(mod.COLOURS)}
    return {name: len(values) for name, values in mod.ATTRIBUTES.items()}


def build_modules(world: int = 1):
    """Freshly initialised ``(unet, text_encoder, vae)`` of the ShapesWorld ``world`` model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**(UNET_CONFIG if world == 1 else UNET2_CONFIG))
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return unet, text_encoder, vae
