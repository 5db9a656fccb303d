"""Models layer: load Stable Diffusion components, pick trainable parameters, attention backend.

Importing this package does no work: heavy modules (torch, diffusers, transformers) are imported
on first use of a name below.
"""
from __future__ import annotations

import importlib

from .errors import ModelLoadError

_EXPORTS = {
    "SDComponents": "loading",
    "load_components": "loading",
    "ddim_scheduler": "parts",
    "select_trainable": "trainable",
    "count_trainable": "trainable",
    "parameter_is_trained": "trainable",
    "TRAIN_METHODS": "trainable",
    "set_attention_backend": "attention",
    "ATTENTION_BACKENDS": "attention",
    "module_content_hash": "hashing",
    "build_tiny_pipeline": "tiny",
    "build_clip_tokenizer": "tokenizer",
    "load_vocabulary": "vocab",
    "cache_root": "paths",
}

__all__ = ["ModelLoadError", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
