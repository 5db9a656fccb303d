"""Which UNet parameters are fine-tuned: the authors' (ESD) ``train_method`` rules, in diffusers names.

ESD selects parameters by CompVis module name; the diffusers equivalents are:

* ``xattn``    every parameter of a cross-attention layer: names containing ``attn2``
               (43,962,560 in SD1.4);
* ``noxattn``  everything except ``attn2``, the time embedding and the output layers.
               CompVis: skip names starting with ``out.`` or containing ``attn2`` / ``time_embed``;
               diffusers: skip ``attn2``, ``time_embedding.*``, ``conv_norm_out.*`` and
               ``conv_out.*`` (813,495,680 in SD1.4). The per-resnet timestep projections
               (CompVis ``emb_layers``, diffusers ``time_emb_proj``) ARE trained, as in ESD;
* ``selfattn`` the self-attention layers: names containing ``attn1``;
* ``xattn_kv`` only the key and value projection weights of the cross-attention layers
               (``attn2.to_k.weight`` and ``attn2.to_v.weight``; SD has no bias there);
* ``full``     all parameters (859,520,964 in SD1.4).

SDXL (same diffusers names, plus the added-conditioning MLP ``add_embedding``, SGM ``label_emb``,
which embeds the pooled text vector and the six size/crop time ids and is added to the time
embedding): ``xattn`` is still the ``attn2`` layers of every transformer block (545,670,400 of
SDXL base's 2,567,463,684); ``noxattn`` also leaves ``add_embedding`` alone (2,014,485,120): it
belongs to the same per-sample embedding path as ``time_embedding`` (emb = time_embedding(t) +
add_embedding(pooled, time ids)), which ESD does not train, and it is a text pathway, which
``noxattn`` is meant to leave to cross-attention. Only ``full`` trains it.
"""
from __future__ import annotations

from .errors import ModelLoadError

# Flow-matching transformers (SD3/SD3.5 MMDiT, FLUX.1), on diffusers names. There is no separate
# cross-attention: text and image tokens meet in the joint attention (``.attn.``: both streams'
# q/k/v/out projections and q/k norms; in FLUX's single-stream blocks the one attention over the
# concatenated tokens). SD3.5-medium's extra ``attn2`` is image-only self-attention.
#
# * ``xattn``    every parameter of the joint attention layers (names containing ``.attn.``);
# * ``xattn_kv`` the text stream's key/value projections (``attn.add_k_proj.*``,
#                ``attn.add_v_proj.*``; FLUX's single-stream blocks have none);
# * ``noxattn``  everything else except the text stream's own layers (``norm1_context``,
#                ``ff_context``), the time/guidance/pooled-text embedders (``time_text_embed``), the
#                T5 input projection (``context_embedder``) and the final layer (``norm_out``,
#                top-level ``proj_out``): the image stream, FLUX's single-stream MLPs and
#                SD3.5-medium's ``attn2``. The patch embedding (``pos_embed`` / ``x_embedder``) is
#                trained, as ESD trains the UNet's ``conv_in``;
# * ``full``     everything.
# ``selfattn`` has no counterpart (the attention is joint) and is refused.
FLOW_TRAIN_METHODS = ("xattn", "noxattn", "full", "xattn_kv")
_FLOW_NOXATTN_EXCLUDED_PREFIXES = ("time_text_embed.", "context_embedder.", "norm_out.", "proj_out.")

TRAIN_METHODS = ("xattn", "noxattn", "full", "selfattn", "xattn_kv")

# add_embedding exists only in SDXL-type UNets (see the module doc)
_NOXATTN_EXCLUDED_PREFIXES = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")


def _is_xattn_kv(name: str) -> bool:
    return ".attn2.to_k.weight" in name or ".attn2.to_v.weight" in name or name.startswith(
        ("attn2.to_k.weight", "attn2.to_v.weight")
    )


def parameter_is_trained(name: str, method: str) -> bool:
    """Whether the UNet parameter called ``name`` (diffusers naming) is trained under ``method``."""
    if method == "xattn":
        return "attn2" in name
    if method == "noxattn":
        return "attn2" not in name and not name.startswith(_NOXATTN_EXCLUDED_PREFIXES)
    if method == "selfattn":
        return "attn1" in name
    if method == "xattn_kv":
        return _is_xattn_kv(name)
    if method == "full":
        return True
    check_train_method(method)  # raises: the method is unknown
    raise AssertionError(method)


def flow_parameter_is_trained(name: str, method: str) -> bool:
    """Whether transformer parameter ``name`` (SD3/FLUX, diffusers naming) is trained under
    ``method`` (rules above)."""
    if method == "xattn":
        return ".attn." in name
    if method == "xattn_kv":
        return ".attn.add_k_proj." in name or ".attn.add_v_proj." in name
    if method == "noxattn":
        return (".attn." not in name and "_context." not in name
                and not name.startswith(_FLOW_NOXATTN_EXCLUDED_PREFIXES))
    if method == "full":
        return True
    check_train_method(method)
    raise ModelLoadError(f"train method {method!r} is not defined for flow-matching transformers (SD3, FLUX: "
                         f"their attention is joint); choose one of {', '.join(FLOW_TRAIN_METHODS)}")


def check_train_method(method) -> str:
    """Return ``method`` if it is one of :data:`TRAIN_METHODS`, else raise a one-line error."""
    if method not in TRAIN_METHODS:
        raise ModelLoadError(f"unknown train method {method!r}; choose one of {', '.join(TRAIN_METHODS)}")
    return method


def select_trainable(unet, method: str, is_trained=None) -> list:
    """Set ``requires_grad`` on the parameters ``method`` trains and clear it on all others.

    Returns ``[(name, parameter), …]`` of the trained parameters in module order
    (``unet.named_parameters()`` order). Raises if the selection is empty (e.g. a UNet without
    cross-attention asked for ``xattn``). ``is_trained(name, method)`` is the rule (default: the
    SD1/SD2 UNet's, :func:`parameter_is_trained`).
    """
    check_train_method(method)
    is_trained = is_trained or parameter_is_trained
    selected = []
    for name, param in unet.named_parameters():
        trained = is_trained(name, method)
        param.requires_grad_(trained)
        if trained:
            selected.append((name, param))
    if not selected:
        raise ModelLoadError(f"train method {method!r} selects no parameter of this model")
    return selected


def count_trainable(unet_config_or_unet, method: str) -> int:
    """Number of parameters ``method`` trains, for a UNet or a UNet config (dict or path).

    A config is instantiated on the meta device, so counting the full SD1.4 UNet costs no
    memory and well under a second (SDXL base: under 2 s). ``"sd1"`` / ``"sd2"`` / ``"sdxl"`` /
    ``"tiny"`` / ``"tiny-sdxl"`` name the shipped configs.
    Does not touch ``requires_grad``.
    """
    import torch

    check_train_method(method)
    unet = unet_config_or_unet
    if not isinstance(unet, torch.nn.Module):
        unet = _meta_unet(unet)
    rule = flow_parameter_is_trained if _is_flow(unet) else parameter_is_trained
    return sum(p.numel() for name, p in unet.named_parameters() if rule(name, method))


def _is_flow(module) -> bool:
    return type(module).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def _meta_unet(config):
    import json
    import os

    import torch
    from diffusers import UNet2DConditionModel

    from . import shipped

    if isinstance(config, str):
        if config in shipped.FLOW_VARIANTS:
            config = shipped.load_config(config, "transformer")
        elif config in shipped.VARIANTS:
            config = shipped.load_config(config, "unet")
        else:
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
    elif hasattr(config, "items"):
        config = dict(config)
    else:
        raise TypeError(f"expected a UNet, a config dict or a config path, got {type(config).__name__}")
    cls = UNet2DConditionModel
    if config.get("_class_name") in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        import diffusers

        cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls.from_config(config)
