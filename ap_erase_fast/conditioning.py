"""The conditioning of a batch of prompts (:class:`Cond`): the tensors a text-to-image model
is conditioned on, flattened into one row per prompt for the search's mixing.

It sits below both :mod:`ap_erase_fast.sampling` and :mod:`ap_erase_fast.backbones` (which
re-exports it as ``ap_erase_fast.backbones.Cond``), so neither has to import the other's
floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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
