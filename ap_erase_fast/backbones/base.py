"""The backbone interface: everything the engine, the sampler, the objective and the search
need from a text-to-image model, and nothing else.

* :meth:`Backbone.encode` turns prompts into a :class:`Cond` (every conditioning tensor of a
  batch of prompts: SD's per-token states; SDXL's states and pooled vector; ...);
* :meth:`Backbone.predict` calls the denoiser (θ' itself, or θ through a functional call) on
  latents, timesteps and a :class:`Cond`, and :meth:`Backbone.eps` turns its output into ε,
  whatever the model's prediction type;
* :attr:`Backbone.tables` holds the noise schedule of the truncated trajectories
  (:class:`~ap_erase_fast.sampling.DDIMTables`);
* :meth:`Backbone.latent_shape`, :meth:`Backbone.is_trained` (the train-method rules on the
  denoiser's parameter names) and :meth:`Backbone.lora_targets` (the modules LoRA adapters go
  on) describe the denoiser.

The search mixes conditionings with one set of weights: a :class:`Cond` flattens into one row
per prompt (:meth:`Cond.flat`), a table of such rows is what ``gumbel_mix`` mixes and what R is
ranked on (L2 distance over the whole row), and :meth:`Cond.unflat` restores the tensors.
docs/models.md explains how to add a backbone (a flow-matching transformer, say).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..conditioning import Cond
from ..sampling import output_to_eps


# (latents [B, C, h, w], timesteps [B] long, Cond of B prompts) -> model output [B, C, h, w]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class Backbone:
    """A text-to-image model as the library sees it. Subclasses fill in the model family."""

    family: str = "?"
    default_guidance: float = 3.0  # --start-guidance when it is not given (the authors' value)
    denoiser: torch.nn.Module  # the module whose parameters θ' trains
    tables: "object"  # ap_erase_fast.sampling.DDIMTables

    # -- conditioning -----------------------------------------------------------------------
    def encode(self, prompts: list[str], batch_size: int = 64) -> Cond:
        """Conditioning of ``prompts`` (fp32, on the backbone's device), computed in batches."""
        raise NotImplementedError

    def release_text_encoders(self) -> None:
        """Free the text encoders once every prompt the run needs is encoded."""
        raise NotImplementedError

    def text_encoder_hash(self) -> str:
        """Content hash of everything :meth:`encode` depends on (embedding-cache key)."""
        raise NotImplementedError

    offload_text_encoders: bool = False  # one encoder on the device at a time, back to the CPU after

    def hold_text_encoders(self, dtype: torch.dtype | None) -> None:
        """The set-up phase of the fast profile in bf16/fp16 (``dtype``: the compute dtype): the
        flow families (SD3, FLUX: T5-XXL is 17.7 GiB in fp32) hold their text encoders in that
        dtype on the CPU and put one at a time on the device while prompts are encoded
        (docs/memory_flow.md). The SD and SDXL encoders are small next to their UNets: they stay
        as loaded (this default does nothing)."""

    # -- the denoiser -----------------------------------------------------------------------
    def predict(self, forward: Callable, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw output of ``forward`` (the denoiser module, or a functional call of it with
        other parameter values) for latents ``x``, timesteps ``t`` and ``cond``."""
        raise NotImplementedError

    def eps(self, output: torch.Tensor, x: torch.Tensor, alpha_cumprod) -> torch.Tensor:
        """The model output turned into ε (``alpha_cumprod``: ᾱ of x's noise level, a float
        or a [B] tensor)."""
        if not isinstance(alpha_cumprod, float):
            alpha_cumprod = alpha_cumprod.to(x.device, torch.float32).view(-1, *[1] * (x.dim() - 1))
        return output_to_eps(output, x, alpha_cumprod, self.tables.prediction_type)

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int, int]:
        """[1, C, h, w] of one sample at ``resolution`` px (default: the model's own)."""
        raise NotImplementedError

    def is_trained(self, name: str, method: str) -> bool:
        """Whether denoiser parameter ``name`` is fine-tuned under ``--train-method method``."""
        raise NotImplementedError

    def lora_targets(self, method: str) -> list[str]:
        """Names of the denoiser's modules that carry LoRA adapters under ``method``: the
        linear and convolution layers all of whose parameters the method trains (norm layers
        take no adapter)."""
        kinds = (torch.nn.Linear, torch.nn.Conv2d)
        out = []
        for name, module in self.denoiser.named_modules():
            params = [n for n, _ in module.named_parameters(recurse=False)]
            if isinstance(module, kinds) and params and all(
                    self.is_trained(f"{name}.{n}", method) for n in params):
                out.append(name)
        return out

    def pipeline_class(self):
        """The diffusers pipeline class of this model family (LoRA saving, image generation)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def info(self) -> dict:
        """What run.json records about the backbone."""
        return {"family": self.family, "prediction_type": self.tables.prediction_type}
