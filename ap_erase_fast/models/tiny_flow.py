"""The built-in tiny flow-matching models ``tiny-sd3`` and ``tiny-flux``: SD3's and FLUX.1-dev's
structure at toy size, random weights, built offline in about a second, deterministic like
``tiny`` and ``tiny-sdxl`` (:func:`ap_erase_fast.models.tiny._deterministic_init`: PCG64
streams seeded by ``(TINY_SEED, crc32(name))``).

* ``tiny-sd3``: ``SD3Transformer2DModel`` (2 joint blocks, SD3.5's RMS q/k norms and one
  SD3.5-medium dual-attention block), CLIP-L- and CLIP-G-shaped encoders with projections
  (widths 32 and 48), a T5 encoder (width 96, so the 80 CLIP channels are zero-padded as in
  SD3), a KL VAE with 16 latent channels (factor 2), SD3's flow scheduler (shift 3);
* ``tiny-flux``: ``FluxTransformer2DModel`` (1 double-stream and 2 single-stream blocks, the
  guidance embedder of FLUX.1-dev), a CLIP-L-shaped encoder (pooled vector, width 32), a T5
  encoder (width 64), a KL VAE with 16 latent channels, FLUX.1-dev's scheduler (resolution-
  dependent shift).

T5's tokenizer is a SentencePiece-style unigram model built here from the built-in word list
(T5's conventions: ``<pad>`` = 0, ``</s>`` = 1 appended, ``<unk>`` = 2, ``▁`` word starts),
since the real one cannot be vendored; the CLIP tokenizers are the real CLIP BPE.
"""
from __future__ import annotations

import os
import string

from . import shipped

TINY_T5_MAX_LENGTH = 512
FLOW_TINY_IDS = ("tiny-sd3", "tiny-flux")
# pipeline classes and the component names of each model
PIPELINES = {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}
FLOW_FAMILY = {"tiny-sd3": "sd3", "tiny-flux": "flux"}


def build_tiny_t5_tokenizer():
    """A T5-convention unigram tokenizer over the built-in word list (deterministic, offline)."""
    from transformers import T5TokenizerFast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "vocab_en.txt")
    with open(path, encoding="utf-8") as fh:
        words = [w.strip() for w in fh if w.strip() and not w.startswith("#")]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(p + c, -10.0) for c in chars for p in ("", "▁")]
    vocab += [("▁" + w, -5.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


def _t5(variant: str, component: str):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**shipped.model_kwargs(shipped.load_config(variant, component))))


def _clip(variant: str, component: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = shipped.load_config(variant, component)
    cls = CLIPTextModelWithProjection if cfg["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
    return cls(CLIPTextConfig(**shipped.model_kwargs(cfg)))


def build_tiny_flow_modules(variant: str) -> dict:
    """The modules of ``tiny-sd3`` or ``tiny-flux`` (fp32, CPU, eval mode), named as the
    components of its diffusers pipeline (``transformer``, ``text_encoder``…, ``scheduler``)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                           SD3Transformer2DModel)

    from .tiny import TINY_SEED, _deterministic_init
    from .tokenizer import build_clip_tokenizer

    transformer_cls = SD3Transformer2DModel if variant == "tiny-sd3" else FluxTransformer2DModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        mods = {"transformer": transformer_cls.from_config(shipped.load_config(variant, "transformer")),
                "vae": AutoencoderKL.from_config(shipped.load_config(variant, "vae")),
                "text_encoder": _clip(variant, "text_encoder")}
        if variant == "tiny-sd3":
            mods["text_encoder_2"] = _clip(variant, "text_encoder_2")
            mods["text_encoder_3"] = _t5(variant, "text_encoder_3")
        else:
            mods["text_encoder_2"] = _t5(variant, "text_encoder_2")
    for name, m in mods.items():
        if m.dtype != torch.float32:
            m.to(torch.float32)
        _deterministic_init(m, name)
        m.eval()
    out = {**mods, "tokenizer": build_clip_tokenizer("<|endoftext|>"),
           "scheduler": FlowMatchEulerDiscreteScheduler.from_config(shipped.load_config(variant, "scheduler"))}
    if variant == "tiny-sd3":
        out["tokenizer_2"] = build_clip_tokenizer("!")
        out["tokenizer_3"] = build_tiny_t5_tokenizer()
    else:
        out["tokenizer_2"] = build_tiny_t5_tokenizer()
    return out


def assemble_flow_pipeline(family: str, parts: dict):
    """``StableDiffusion3Pipeline`` (family ``sd3``) or ``FluxPipeline`` (``flux``) from parts."""
    import diffusers

    names = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    if family == "sd3":
        names += ["text_encoder_3", "tokenizer_3"]
    cls = getattr(diffusers, "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
    return cls(**{n: parts[n] for n in names})


def ensure_tiny_flow_folder(variant: str, parts: dict) -> str | None:
    """The cached pipeline folder of a tiny flow model (written if missing; None if not writable)."""
    from .tiny import _SUBFOLDERS, save_pipeline_atomically, tiny_cache_dir

    target = tiny_cache_dir(variant)
    try:
        return save_pipeline_atomically(assemble_flow_pipeline(FLOW_FAMILY[variant], parts), target,
                                        _SUBFOLDERS[variant])
    except OSError as exc:
        import warnings

        warnings.warn(f"cannot write the {variant} pipeline cache {target}: {exc}; pipeline_path will be None")
        return None


def load_tiny_flow(variant: str) -> tuple[dict, str | None]:
    """(the SDComponents fields of ``tiny-sd3`` / ``tiny-flux``, its cached folder)."""
    parts = build_tiny_flow_modules(variant)
    path = ensure_tiny_flow_folder(variant, parts)
    fields = {"unet": parts["transformer"], **{k: v for k, v in parts.items() if k != "transformer"},
              "family": FLOW_FAMILY[variant], "default_resolution": 16}
    return fields, path

