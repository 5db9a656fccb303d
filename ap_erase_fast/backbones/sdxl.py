"""Stable Diffusion XL (and the built-in tiny-sdxl model): two CLIP text encoders, a pooled
text vector and size/crop time ids as added conditioning, ``UNet2DConditionModel`` with
``addition_embed_type="text_time"``.

Conditioning, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes it:

* per-token states [B, 77, D1 + D2]: the penultimate hidden states of ``text_encoder``
  (CLIP ViT-L, D1 = 768) and of ``text_encoder_2`` (OpenCLIP ViT-bigG, D2 = 1280), side by side;
* pooled [B, P]: ``text_encoder_2``'s projected output (``text_embeds``, P = 1280).

A :class:`Cond` is ``(states, pooled)``, so R rows are both, flattened and concatenated, and one
Gumbel-Softmax draw mixes both with the same weights.

The empty prompt: when the model's ``force_zeros_for_empty_prompt`` is true (SDXL base, and
``tiny-sdxl``), the conditioning of ``""`` is zeros — states and pooled — which is what
diffusers' SDXL pipelines feed the unconditional branch of classifier-free guidance (and how
SDXL dropped its text conditioning in training). Every use of ``""`` goes through
:meth:`SDXLBackbone.encode`, so the CFG branch of the trajectories and AP's c_n = "" (the
erasure target's anchor) are the same zeros. With the flag false, ``""`` is encoded as text.

Time ids (original size, crop top-left, target size) are not part of the Cond: they are
``(H, W, 0, 0, H, W)`` with H × W the pixel size of the latents being denoised (the run's
resolution), as the pipeline uses by default, built in :meth:`SDXLBackbone.predict`.
"""
from __future__ import annotations

import torch

from ..sampling import DDIMTables
from .base import Backbone, Cond
from .sd import latent_shape


class SDXLBackbone(Backbone):
    family = "sdxl"

    def __init__(self, components, device: torch.device, ddim_steps: int = 50):
        from ..models.loading import vae_scale_factor

        self.components = components
        self.device = torch.device(device)
        self.denoiser = components.unet
        self.text_encoders = [components.text_encoder, components.text_encoder_2]
        self.tokenizers = [components.tokenizer, components.tokenizer_2]
        if any(m is None for m in self.text_encoders + self.tokenizers):
            raise ValueError("an SDXL backbone needs text_encoder, text_encoder_2, tokenizer and "
                             "tokenizer_2")
        self.force_zeros_for_empty_prompt = bool(
            components.extra.get("force_zeros_for_empty_prompt", True))
        self.vae_factor = vae_scale_factor(components.vae)
        self.tables = DDIMTables.from_scheduler(components.scheduler, ddim_steps)
        self._te_hash = None
        self._time_ids: dict = {}

    # -- conditioning -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> Cond:
        if self.text_encoders is None:
            raise RuntimeError("the text encoders were released; encode every prompt before")
        prompts = list(prompts)
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            s, p = self._encode_batch(prompts[start:start + batch_size])
            states.append(s)
            pooled.append(p)
        if not prompts:
            te1, te2 = (m.config for m in self.text_encoders)
            length = self.tokenizers[0].model_max_length
            return Cond((torch.empty(0, length, te1.hidden_size + te2.hidden_size, device=self.device),
                         torch.empty(0, te2.projection_dim, device=self.device)))
        states, pooled = torch.cat(states), torch.cat(pooled)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            if bool(empty.any()):
                states[empty] = 0.0
                pooled[empty] = 0.0
        return Cond((states, pooled))

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ..concepts import tokenize

        hidden = []
        pooled = None
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            encoder = encoder.to(self.device)
            ids = tokenize(tokenizer, prompts).to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled = getattr(out, "text_embeds", None)  # the second encoder's projection
        return torch.cat(hidden, dim=-1), pooled.float()

    def release_text_encoders(self) -> None:
        self.text_encoder_hash()
        self.text_encoders = None
        self.components.text_encoder = None
        self.components.text_encoder_2 = None

    def text_encoder_hash(self) -> str:
        if self._te_hash is None:
            from ..models import module_content_hash

            parts = [self.family]
            for encoder, tok in zip(self.text_encoders, self.tokenizers):
                parts += [module_content_hash(encoder), str(tok.model_max_length), str(len(tok)),
                          str(tok.pad_token_id)]
            parts.append(f"zeros={int(self.force_zeros_for_empty_prompt)}")
            self._te_hash = ":".join(parts)
        return self._te_hash

    # -- the denoiser -----------------------------------------------------------------------
    def time_ids(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 6] time ids of latents ``x``: original size = target size = x's pixel size,
        crop top-left (0, 0)."""
        h, w = x.shape[-2] * self.vae_factor, x.shape[-1] * self.vae_factor
        key = (h, w, x.device)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32,
                                               device=x.device)
        return self._time_ids[key].expand(x.shape[0], 6)

    def predict(self, forward, x, t, cond: Cond):
        states, pooled = cond.parts
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x)}
        return forward(x, t, encoder_hidden_states=states, added_cond_kwargs=added,
                       return_dict=False)[0]

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int, int]:
        return latent_shape(self.components, resolution)

    def is_trained(self, name: str, method: str) -> bool:
        # the SD rules on diffusers names; noxattn also leaves the added-conditioning MLP
        # (add_embedding) untrained: see ap_erase_fast.models.trainable
        from ..models.trainable import parameter_is_trained

        return parameter_is_trained(name, method)

    def info(self) -> dict:
        return {**super().info(),
                "empty_prompt": "zeros" if self.force_zeros_for_empty_prompt else "encoded",
                "time_ids": "original = target = run resolution, crop (0, 0)"}
