"""The ShapesWorld networks: the component configs of the text-to-image model and the
shape/colour classifier used to score it."""
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
    """Small CNN with two heads (shape, colour) for 32x32 images in [0, 1]."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(cin, len(SHAPES))
        self.colour_head = nn.Linear(cin, len(COLOURS))

    def forward(self, x):
        h = self.features(x * 2 - 1).mean(dim=(2, 3))
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256):
        """Top-1 ``(shape_idx, colour_idx)`` and softmax probabilities for images in [0, 1]."""
        self.eval()
        shapes, colours, ps, pc = [], [], [], []
        for i in range(0, len(images), batch_size):
            ls, lc = self(images[i : i + batch_size].float())
            ps.append(ls.softmax(-1))
            pc.append(lc.softmax(-1))
        ps, pc = torch.cat(ps), torch.cat(pc)
        return ps.argmax(-1), pc.argmax(-1), ps, pc


def build_modules():
    """Freshly initialised ``(unet, text_encoder, vae)`` of the ShapesWorld model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return unet, text_encoder, vae
