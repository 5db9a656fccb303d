"""θ′ and θ as the loop sees them: ε-predictions and truncated trajectories through the backbone,
under the run's compute precision, with UNet sample-evaluations counted.

θ′ is the denoiser module as it is being trained. θ, the original model, is whichever of three
forwards the engine hands over: a second copy of the module (the reference profile), the same
module called with the original values of the trained tensors (the fast profile), or the same
module with its LoRA adapters switched off (LoRA runs).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable

import torch

from .backbones import Backbone, Cond
from .sampling import sample_until


class ModelCalls:
    def __init__(self, backbone: Backbone, frozen_forward: Callable,
                 compute_dtype: torch.dtype | None = None, compiled_sampler: Callable | None = None,
                 guidance: float = 3.0):
        self.backbone = backbone
        self.tables = backbone.tables
        self.frozen_forward = frozen_forward
        self.compute_dtype = compute_dtype
        self.compiled_sampler = compiled_sampler
        self.guidance = guidance
        self.calls: Counter = Counter()  # sample-evaluations (batch entries) by kind
        self.null: Cond | None = None  # the conditioning of "" (one prompt)
        self.concepts: list[Cond] = []  # the erased concepts' conditionings (one prompt each)

    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.backbone.device.type, dtype=self.compute_dtype)

    def model_fn(self, which: str, kind: str) -> Callable:
        """(x, t, cond) → fp32 model output of θ′ (``which="trained"``) or θ (``"frozen"``),
        counting sample-evaluations under ``kind``."""
        if which == "trained":
            forward = (self.compiled_sampler if kind == "sampling" and self.compiled_sampler
                       is not None else self.backbone.denoiser)
        else:
            forward = self.frozen_forward
        predict = self.backbone.predict

        def call(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            self.calls[kind] += x.shape[0]
            with self.autocast():
                return predict(forward, x, t, cond).float()
        return call

    def query(self, which: str, kind: str, z: torch.Tensor, t: torch.Tensor,
              cond: Cond) -> torch.Tensor:
        """ε of θ/θ′ for latents z [N, ...] at DDPM timesteps t [N] (long)."""
        out = self.model_fn(which, kind)(z, t, cond)
        if self.tables.prediction_type == "epsilon":
            return out
        return self.backbone.eps(out, z, self.tables.alphas_cumprod[t.cpu()].float())

    def sample(self, x_T: torch.Tensor, cond: Cond, t_enc: int,
               which: str = "trained") -> torch.Tensor:
        """Truncated trajectories with θ′ (or θ: ``which="frozen"``) for a batch of conditions
        (one call per DDIM step)."""
        b = len(cond)
        x = x_T.expand(b, *x_T.shape[1:]) if x_T.shape[0] != b else x_T
        return sample_until(self.model_fn(which, "sampling"), x, cond, self.null.expand(b),
                            self.tables, t_enc, self.guidance)
