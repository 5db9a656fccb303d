"""Backbones: the one seam between the AP loop and a model family (see :mod:`.base`)."""
from __future__ import annotations

from .base import Backbone, Cond, ModelFn

__all__ = ["Backbone", "Cond", "ModelFn", "make_backbone"]


def make_backbone(components, device, ddim_steps: int = 50) -> Backbone:
    """The backbone of loaded components, picked from the model family they were loaded as."""
    family = getattr(components, "family", "sd")
    if family == "sd":
        from .sd import SDBackbone

        return SDBackbone(components, device, ddim_steps)
    if family == "sdxl":
        from .sdxl import SDXLBackbone

        return SDXLBackbone(components, device, ddim_steps)
    raise ValueError(f"no backbone for model family {family!r}")
