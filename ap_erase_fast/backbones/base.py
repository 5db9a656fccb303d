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

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Cond:
    """The conditioning of a batch of B prompts: tensors that all start with the batch dim."""

    parts: tuple[torch.Tensor, ...]

    def __post_init__(self):
        if not self.parts or len({p.shape[0] for p in self.parts}) != 1:
            raise ValueError("a Cond needs at least one tensor, all with the same batch size")

    # -- batch ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.parts[0].shape[0]

    def __getitem__(self, index) -> "Cond":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cond(tuple(p[index] for p in self.parts))

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        return Cond(tuple(torch.cat(ps) for ps in zip(*(c.parts for c in conds))))

    def expand(self, n: int) -> "Cond":
        """A batch of ``n`` copies of this one-prompt Cond (views, no copy)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"can only expand a batch of 1, not {len(self)}")
        return Cond(tuple(p.expand(n, *p.shape[1:]) for p in self.parts))

    def chunk(self, n: int) -> list["Cond"]:
        b = len(self) // n
        return [self[i * b:(i + 1) * b] for i in range(n)]

    # -- tensors ----------------------------------------------------------------------------
    def detach(self) -> "Cond":
        return Cond(tuple(p.detach() for p in self.parts))

    def to(self, *args, **kwargs) -> "Cond":
        return Cond(tuple(p.to(*args, **kwargs) for p in self.parts))

    @property
    def requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-prompt shapes of the parts (without the batch dim)."""
        return tuple(tuple(p.shape[1:]) for p in self.parts)

    def flat(self) -> torch.Tensor:
        """[B, F]: every part flattened and concatenated, one row per prompt."""
        return torch.cat([p.reshape(len(self), -1) for p in self.parts], dim=1)

    @staticmethod
    def unflat(rows: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> "Cond":
        """The inverse of :meth:`flat` for per-prompt ``shapes`` (differentiable)."""
        sizes = [math.prod(s) for s in shapes]
        if rows.shape[-1] != sum(sizes):
            raise ValueError(f"rows of width {rows.shape[-1]} do not hold parts {shapes}")
        return Cond(tuple(chunk.reshape(rows.shape[0], *s)
                          for chunk, s in zip(rows.split(sizes, dim=1), shapes)))


# (latents [B, C, h, w], timesteps [B] long, Cond of B prompts) -> model output [B, C, h, w]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class Backbone:
    """A text-to-image model as the library sees it. Subclasses fill in the model family."""

    family: str = "?"
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

    # -- the denoiser -----------------------------------------------------------------------
    def predict(self, forward: Callable, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw output of ``forward`` (the denoiser module, or a functional call of it with
        other parameter values) for latents ``x``, timesteps ``t`` and ``cond``."""
        raise NotImplementedError

    def eps(self, output: torch.Tensor, x: torch.Tensor, alpha_cumprod) -> torch.Tensor:
        """The model output turned into ε (``alpha_cumprod``: ᾱ of x's noise level, a float
        or a [B] tensor)."""
        from ..sampling import output_to_eps

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
