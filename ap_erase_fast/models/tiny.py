"""The built-in tiny models: random weights, fixed seed, built in seconds.

``tiny`` has the structure of SD1.x (UNet with cross-attention, CLIP text encoder with the real
CLIP tokenizer, KL autoencoder, DDIM scheduler) at toy size, so the whole library runs on a fresh
machine without downloads. ``tiny-sdxl`` has the structure of SDXL (a UNet whose added
conditioning is SDXL's ``text_time`` embedding, two CLIP text encoders, the second with a
projection, two tokenizers, KL autoencoder). Both are demos and test fixtures: their images are
noise.

Determinism: the weights do not come from torch's module initialisers (whose algorithms and
vectorised random paths may differ between torch versions and CPUs) but from
:func:`_deterministic_init`: each tensor is filled from numpy's PCG64 stream seeded by
``(TINY_SEED, crc32(name))`` with uniform values in ``[-b, b]`` (``b = 1/sqrt(fan_in)`` like
torch's default for linear and conv layers, std 0.02 for embeddings; norms 1/0). Uniform
doubles from PCG64 and the affine map are exact IEEE operations, so the weights are the same on
every machine. The caller's torch RNG is not touched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib

from . import shipped
from .paths import cache_root

TINY_SEED = 20240527
# Bump when the construction or initialisation below changes: it is part of the cache key.
TINY_BUILD_VERSION = 1
TINY_SDXL_BUILD_VERSION = 1
TINY_FLOW_BUILD_VERSION = 1  # tiny-sd3 and tiny-flux (models/tiny_flow.py)
TINY_MODEL_ID = "tiny"
TINY_SDXL_MODEL_ID = "tiny-sdxl"
# The components of each built-in model and the subfolders of its cached pipeline folder.
_COMPONENTS = {
    "tiny": ("unet", "text_encoder", "vae", "scheduler"),
    "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2", "vae", "scheduler"),
    "tiny-sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "scheduler"),
    "tiny-flux": ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler"),
}
_SUBFOLDERS = {
    "tiny": ("unet", "text_encoder", "tokenizer", "scheduler", "vae"),
    "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae"),
    "tiny-sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                 "tokenizer_3", "scheduler", "vae"),
    "tiny-flux": ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae"),
}
# norm layers that are not torch.nn.LayerNorm/GroupNorm subclasses (diffusers' RMSNorm, T5's
# T5LayerNorm): weight 1, like the others (absent from tiny and tiny-sdxl, whose hashes stay)
_NORM_CLASS_NAMES = ("RMSNorm", "T5LayerNorm")


def tiny_config_hash(variant: str = TINY_MODEL_ID) -> str:
    """12 hex digits identifying a tiny model's configs, seed and init scheme (the cache key)."""
    import diffusers
    import transformers

    payload = {
        "configs": {c: shipped.load_config(variant, c) for c in _COMPONENTS[variant]},
        "seed": TINY_SEED,
        "build_version": TINY_BUILD_VERSION,
        # The saved folder format follows the library versions; rebuild when they change.
        "diffusers": ".".join(diffusers.__version__.split(".")[:2]),
        "transformers": ".".join(transformers.__version__.split(".")[:2]),
    }
    if variant != TINY_MODEL_ID:  # (the tiny model's payload, hence its cache key, is unchanged)
        payload.update(variant=variant, build_version=TINY_SDXL_BUILD_VERSION)
    if variant in ("tiny-sd3", "tiny-flux"):
        payload.update(build_version=TINY_FLOW_BUILD_VERSION, t5_tokenizer="builtin-words-unigram-1")
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def tiny_cache_dir(variant: str = TINY_MODEL_ID) -> str:
    """The folder a tiny pipeline is (or will be) cached in."""
    return os.path.join(cache_root(), f"{variant}-{tiny_config_hash(variant)}")


def _uniform(name: str, shape, bound: float):
    import numpy as np
    import torch

    seq = np.random.SeedSequence([TINY_SEED, zlib.crc32(name.encode("utf-8"))])
    values = np.random.Generator(np.random.PCG64(seq)).random(int(np.prod(shape, dtype=np.int64)))
    values = (values * 2.0 - 1.0) * bound
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def _deterministic_init(model, prefix: str) -> None:
    import torch

    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            full = f"{prefix}.{mod_name}" if mod_name else prefix
            if isinstance(module, norm_types) or type(module).__name__ in _NORM_CLASS_NAMES:
                for pname, p in own.items():
                    p.fill_(1.0 if pname == "weight" else 0.0)
                continue
            weight = own.get("weight")
            if isinstance(module, torch.nn.Embedding) or weight is None or weight.dim() < 2:
                bound = 0.02 * math.sqrt(3.0)  # std 0.02, as CLIP initialises its embeddings
            else:
                fan_in = weight.shape[1] * math.prod(weight.shape[2:])
                bound = 1.0 / math.sqrt(fan_in)
            for pname, p in own.items():
                p.copy_(_uniform(f"{full}.{pname}", tuple(p.shape), bound))


def build_tiny_modules():
    """``(unet, text_encoder, tokenizer, scheduler, vae)`` of the tiny model, fp32 on CPU."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_clip_tokenizer

    # Module constructors draw from the global RNG before _deterministic_init overwrites every
    # parameter; fork_rng keeps the caller's RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(shipped.load_config("tiny", "unet")).to(torch.float32)
        vae = AutoencoderKL.from_config(shipped.load_config("tiny", "vae")).to(torch.float32)
        te_cfg = CLIPTextConfig(**shipped.model_kwargs(shipped.load_config("tiny", "text_encoder")))
        text_encoder = CLIPTextModel(te_cfg).to(torch.float32)
    _deterministic_init(unet, "unet")
    _deterministic_init(vae, "vae")
    _deterministic_init(text_encoder, "text_encoder")
    for m in (unet, vae, text_encoder):
        m.eval()
    scheduler = DDIMScheduler.from_config(shipped.load_config("tiny", "scheduler"))
    tokenizer = build_clip_tokenizer(shipped.PAD_TOKENS["tiny"])
    return unet, text_encoder, tokenizer, scheduler, vae


def build_tiny_sdxl_modules() -> dict:
    """The modules of the tiny SDXL-shaped model, fp32 on CPU: a dict with ``unet``,
    ``text_encoder`` (``CLIPTextModel``), ``text_encoder_2`` (``CLIPTextModelWithProjection``),
    ``tokenizer`` (pads with ``<|endoftext|>``), ``tokenizer_2`` (pads with ``"!"``, as SDXL's
    second tokenizer does), ``scheduler`` (DDIM on SDXL's noise schedule) and ``vae``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .parts import ddim_scheduler
    from .tokenizer import build_clip_tokenizer

    variant = TINY_SDXL_MODEL_ID

    def text_config(component):
        return CLIPTextConfig(**shipped.model_kwargs(shipped.load_config(variant, component)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        mods = {
            "unet": UNet2DConditionModel.from_config(shipped.load_config(variant, "unet")),
            "vae": AutoencoderKL.from_config(shipped.load_config(variant, "vae")),
            "text_encoder": CLIPTextModel(text_config("text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(text_config("text_encoder_2")),
        }
    for name, m in mods.items():
        if m.dtype != torch.float32:  # (diffusers warns on every .to(dtype))
            m.to(torch.float32)
        _deterministic_init(m, name)
        m.eval()
    return {**mods, "tokenizer": build_clip_tokenizer(shipped.PAD_TOKENS[variant]),
            "tokenizer_2": build_clip_tokenizer(shipped.PAD_TOKENS_2[variant]),
            "scheduler": ddim_scheduler(shipped.load_config(variant, "scheduler"))}


def assemble_pipeline(unet, text_encoder, tokenizer, scheduler, vae):
    """A ``StableDiffusionPipeline`` from parts, safety checker off (the models are the caller's)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def assemble_sdxl_pipeline(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, vae,
                           force_zeros_for_empty_prompt: bool = True):
    """A ``StableDiffusionXLPipeline`` from parts (no watermarker; the models are the caller's)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


def _folder_complete(path: str, subfolders=_SUBFOLDERS[TINY_MODEL_ID]) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) and all(
        os.path.isdir(os.path.join(path, sub)) for sub in subfolders
    )


def save_pipeline_atomically(pipeline, target: str, subfolders=_SUBFOLDERS[TINY_MODEL_ID]) -> str:
    """Write ``pipeline`` as a diffusers pipeline folder at ``target`` (temp folder + rename).

    If another process finished the same folder first, its copy is kept and ours discarded.
    """
    if _folder_complete(target, subfolders):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=parent)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _folder_complete(target, subfolders):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_pipeline_folder(parts=None, variant: str = TINY_MODEL_ID) -> str | None:
    """Path of a tiny model's cached pipeline folder, writing it if missing; None if not
    writable. ``parts``: the modules already built (the tuple of :func:`build_tiny_modules`
    or the dict of :func:`build_tiny_sdxl_modules`)."""
    target = tiny_cache_dir(variant)
    subfolders = _SUBFOLDERS[variant]
    if _folder_complete(target, subfolders):
        return target
    if variant == TINY_MODEL_ID:
        pipeline = assemble_pipeline(*(parts or build_tiny_modules()))
    else:
        pipeline = assemble_sdxl_pipeline(**(parts or build_tiny_sdxl_modules()))
    try:
        return save_pipeline_atomically(pipeline, target, subfolders)
    except OSError as exc:
        import warnings

        warnings.warn(f"cannot write the {variant} pipeline cache {target}: {exc}; pipeline_path will be None")
        return None


def build_tiny_pipeline(*, torch_dtype=None, device: str = "cpu"):
    """The built-in tiny model as a ready ``StableDiffusionPipeline`` (random weights, demo only)."""
    unet, text_encoder, tokenizer, scheduler, vae = build_tiny_modules()
    pipe = assemble_pipeline(unet, text_encoder, tokenizer, scheduler, vae)
    if torch_dtype is not None:
        pipe = pipe.to(torch_dtype=torch_dtype)
    return pipe.to(device)
