"""Attention backend of the UNet: the authors' plain attention, torch SDPA, or xformers."""
from __future__ import annotations

from .errors import ModelLoadError

ATTENTION_BACKENDS = ("classic", "sdpa", "xformers")


def set_attention_backend(unet, name: str) -> None:
    """Switch every attention layer of ``unet`` (in place).

    * ``classic``  diffusers ``AttnProcessor``: explicit matmul, softmax, matmul (what the
      authors' CompVis code computes; the reference profile uses it);
    * ``sdpa``     ``AttnProcessor2_0``: ``torch.nn.functional.scaled_dot_product_attention``
      (diffusers' default);
    * ``xformers`` ``enable_xformers_memory_efficient_attention`` (CUDA only).
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if type(unet).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel") and name in ("classic", "sdpa"):
        # joint attention has its own processors (JointAttnProcessor2_0, FluxAttnProcessor), all
        # on torch SDPA; diffusers has no explicit-matmul version of them: both names keep them
        return
    if name == "classic":
        unet.set_attn_processor(AttnProcessor())
    elif name == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif name == "xformers":
        import importlib.util

        import torch

        if importlib.util.find_spec("xformers") is None:
            raise ModelLoadError(
                "attention backend 'xformers' needs the xformers package "
                "(pip install 'ap_erase_fast[xformers]'); or use --attention sdpa"
            )
        if not torch.cuda.is_available():
            raise ModelLoadError("attention backend 'xformers' needs a CUDA device; use 'sdpa' or 'classic' on this machine")
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # broken install, wrong CUDA build, …
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot enable xformers attention: {msg}; use 'sdpa' instead") from exc
    else:
        raise ModelLoadError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
