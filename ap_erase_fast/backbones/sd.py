"""Stable Diffusion 1.x / 2.x (and the built-in tiny and ShapesWorld models): one CLIP text
encoder, per-token states as the only conditioning, ``UNet2DConditionModel``."""
from __future__ import annotations

import torch

from ..sampling import DDIMTables
from .base import Backbone, Cond


class SDBackbone(Backbone):
    family = "sd"

    def __init__(self, components, device: torch.device, ddim_steps: int = 50):
        self.components = components
        self.device = torch.device(device)
        self.denoiser = components.unet
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.vae = components.vae
        self.tables = DDIMTables.from_scheduler(components.scheduler, ddim_steps)
        self._te_hash = None

    # -- conditioning -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> Cond:
        from ..concepts import encode_prompts

        if self.text_encoder is None:
            raise RuntimeError("the text encoder was released; encode every prompt before")
        states = encode_prompts(self.text_encoder.to(self.device), self.tokenizer, list(prompts),
                                batch_size=batch_size, device=self.device)
        return Cond((states,))

    def release_text_encoders(self) -> None:
        self.text_encoder_hash()
        self.text_encoder = None
        self.components.text_encoder = None

    def text_encoder_hash(self) -> str:
        if self._te_hash is None:
            from ..models import module_content_hash

            tok = self.tokenizer
            self._te_hash = (f"{self.family}:{module_content_hash(self.text_encoder)}:"
                             f"{tok.model_max_length}:{len(tok)}")
        return self._te_hash

    # -- the denoiser -----------------------------------------------------------------------
    def predict(self, forward, x, t, cond: Cond):
        (states,) = cond.parts
        return forward(x, t, encoder_hidden_states=states, return_dict=False)[0]

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int, int]:
        return latent_shape(self.components, resolution)

    def is_trained(self, name: str, method: str) -> bool:
        from ..models.trainable import parameter_is_trained

        return parameter_is_trained(name, method)


def latent_shape(components, resolution: int | None) -> tuple[int, int, int, int]:
    """[1, C, h, w] for a UNet with a KL-VAE (factor 8 without one); checks divisibility."""
    from ..errors import UserError
    from ..models.loading import vae_scale_factor

    factor = vae_scale_factor(components.vae)
    res = resolution or components.default_resolution
    multiple = factor * 2 ** (len(components.unet.config.down_block_types) - 1)
    if res % multiple:
        raise UserError(f"--resolution {res} is not a multiple of {multiple} (VAE factor "
                        f"{factor} times the UNet's downsampling)")
    return (1, components.unet.config.in_channels, res // factor, res // factor)
