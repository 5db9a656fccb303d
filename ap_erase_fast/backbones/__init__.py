"""Backbones: the one seam between the AP loop and a model family (see :mod:`.base`)."""
from __future__ import annotations

from .base import Backbone, Cond, ModelFn

__all__ = ["Backbone", "Cond", "ModelFn", "make_backbone"]


def make_backbone(components, device, ddim_steps: int = 50, *, resolution: int | None = None,
                  max_sequence_length: int | None = None, distilled_guidance: float | None = None) -> Backbone:
    """The backbone of loaded components, picked from the model family they were loaded as.

    ``resolution`` (px; default the model's) matters to FLUX, whose σ table shifts with the
    image's token count; ``max_sequence_length`` (T5 tokens) and ``distilled_guidance`` (FLUX.1-dev's
    guidance embedding) belong to the flow families and are refused elsewhere."""
    family = getattr(components, "family", "sd")
    if family in ("sd3", "flux"):
        from .flow import FluxBackbone, SD3Backbone

        cls = SD3Backbone if family == "sd3" else FluxBackbone
        return cls(components, device, ddim_steps, resolution=resolution,
                   max_sequence_length=max_sequence_length, distilled_guidance=distilled_guidance)
    for flag, value in (("--max-sequence-length", max_sequence_length), ("--distilled-guidance", distilled_guidance)):
        if value is not None:
            from ..errors import UserError

            raise UserError(f"{flag} applies to SD3/FLUX models (T5 text encoder, guidance embedding); "
                            f"{getattr(components, 'model_id', 'this model')!r} is a {family} model")
    if family == "sd":
        from .sd import SDBackbone

        return SDBackbone(components, device, ddim_steps)
    if family == "sdxl":
        from .sdxl import SDXLBackbone

        return SDXLBackbone(components, device, ddim_steps)
    raise ValueError(f"no backbone for model family {family!r}")
