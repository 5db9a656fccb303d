"""Single-file SD3.5 and FLUX.1 checkpoints: the layouts people download.

* SD3.5 (Stability's ``sd3.5_medium.safetensors`` / ``sd3.5_large.safetensors``): the MMDiT
  under ``model.diffusion_model.`` (``joint_blocks.*``, ``x_embedder``, ``pos_embed`` …) and,
  when the file holds them, ``text_encoders.clip_l.transformer.*``,
  ``text_encoders.clip_g.transformer.*``, ``text_encoders.t5xxl.transformer.*`` and the VAE
  ``first_stage_model.*``;
* FLUX.1 (Black Forest Labs' ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors``): the
  transformer only, ``double_blocks.*``, ``single_blocks.*``, ``img_in``, ``txt_in``,
  ``time_in``, ``vector_in``, ``guidance_in`` (dev), ``final_layer``, with or without a
  ``model.diffusion_model.`` prefix (and the same ``text_encoders.*`` / ``first_stage_model.*``
  parts when a tool saved them in).

A file never holds the tokenizers (T5's cannot be rebuilt here) or the scheduler, and usually not
every encoder, so a diffusers pipeline folder of the base model supplies the rest: the folder
given as ``model_folder``, else the folder the file lies in when it is one (the official hub
repositories ship the file next to their ``model_index.json``). What the file holds wins: its
transformer, encoders and VAE are used, built on the folder's ``config.json`` of each component
(the transformer on a config shipped in ``models/configs``: ``sd3.5-medium``, ``sd3.5-large``,
``tiny-sd3`` / ``flux.1-dev``, ``tiny-flux``, the first whose names and shapes match exactly;
FLUX without ``guidance_in`` is schnell: the dev config without the guidance embedder). Nothing
is fetched. Keys are converted by diffusers' own converters
(``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_flux_transformer_checkpoint_to_diffusers``,
``convert_ldm_clip_checkpoint``, ``convert_sd3_t5_checkpoint_to_diffusers``,
``convert_ldm_vae_checkpoint``). diffusers' FLUX converter splits the single blocks' fused
``linear1`` at FLUX.1's width 3072: a narrower transformer (the built-in ``tiny-flux`` in this
layout) is zero-padded to that width around the call and cut back after it, so the key mapping
stays diffusers'. SD3's CLIP-L gets an identity projection, as diffusers and the reference code
(unprojected pooled CLIP-L output) give it.
"""
from __future__ import annotations

import hashlib
import os

from . import shipped, single_file
from .errors import ModelLoadError
from .parts import first_line, read_json

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L, CLIP_G, T5 = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                      "text_encoders.t5xxl.transformer.")
# the diffusers component each text-encoder prefix fills, per family
TEXT_PREFIXES = {CLIP_L: {"sd3": "text_encoder", "flux": "text_encoder"},
                 CLIP_G: {"sd3": "text_encoder_2"},
                 T5: {"sd3": "text_encoder_3", "flux": "text_encoder_2"}}
CANDIDATES = {"sd3": ("sd3.5-medium", "sd3.5-large", "tiny-sd3"), "flux": ("flux.1-dev", "tiny-flux")}
NAMES = {"sd3": "SD3.5", "flux": "FLUX.1"}
A_NAME = {"sd3": "an SD3.5", "flux": "a FLUX.1"}
EXAMPLES = {"sd3": "stabilityai/stable-diffusion-3.5-large, which ships sd3.5_large.safetensors",
            "flux": "black-forest-labs/FLUX.1-dev, which ships flux1-dev.safetensors"}
FLUX_CONVERTER_WIDTH = 3072  # diffusers' FLUX converter splits linear1 at this width
_SUPPORTED_LAYOUTS = ("CompVis/SGM (SD1/SD2/SDXL: model.diffusion_model.* and its text encoders), SD3.5 "
                      "(model.diffusion_model.joint_blocks.*), FLUX.1 (double_blocks.*, single_blocks.*)")


# --------------------------------------------------------------------------- what the file is


def _bare(key: str) -> str:
    return key[len(TRANSFORMER_PREFIX):] if key.startswith(TRANSFORMER_PREFIX) else key


def file_family(keys) -> str | None:
    """``sd3`` or ``flux`` from a checkpoint's tensor names; None for any other layout."""
    bare = [_bare(k) for k in keys]
    if any(k.startswith("joint_blocks.") for k in bare):
        return "sd3"
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in bare):
        return "flux"
    return None


def classify_file(path: str) -> str | None:
    """``sd3`` / ``flux`` for an SD3.5 / FLUX.1 ``.safetensors`` file, None for a CompVis/SGM
    one (or a ``.ckpt``, which the SD loader reads); a one-line error for a file whose header
    cannot be read (truncated, not safetensors) or whose layout is none of these."""
    if not path.lower().endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # truncated, corrupted, not a safetensors file
        raise ModelLoadError(f"cannot read checkpoint {path!r}: {first_line(exc)[:200]}") from None
    family = file_family(keys)
    if family is None and not any(k.startswith((TRANSFORMER_PREFIX, "model_ema.")) for k in keys):
        diffusers_named = any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "down_blocks."))
                              for k in keys)
        hint = ("; its names are diffusers' (one model's weights file?): pass the pipeline folder instead"
                if diffusers_named else "")
        raise ModelLoadError(f"checkpoint {path!r} has no UNet weights and no SD3.5/FLUX.1 transformer: it "
                             f"matches no supported single-file layout ({_SUPPORTED_LAYOUTS}){hint}")
    return family


def _holds(keys, family: str) -> list[str]:
    """The diffusers components whose weights the file holds (``unet`` = the transformer)."""
    found = ["unet"]
    for prefix, comps in TEXT_PREFIXES.items():
        if family in comps and any(k.startswith(prefix) for k in keys):
            found.append(comps[family])
    if any(k.startswith(VAE_PREFIX) for k in keys):
        found.append("vae")
    return found


def file_sha256(path: str, chunk: int = 1 << 23) -> str:
    """sha256 of the file's bytes (what the Hugging Face hub shows for a file), remembered in the
    cache root under (absolute path, size, modification time), so a file is read for it once."""
    from .paths import cache_root

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = os.path.join(cache_root(), "file-sha256", key)
    try:
        with open(memo, encoding="ascii") as fh:
            known = fh.read().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        tmp = f"{memo}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache costs a re-read next time, nothing else
        pass
    return digest


# --------------------------------------------------------------------------- the transformer


def _empty(factory, buffers: bool = False):
    """The module on the meta device (its buffers too with ``buffers``: SD3.5's positional
    table takes seconds to compute and comes from the file anyway)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=buffers):
        return factory()


def _shape_summary(family: str, state: dict, cfg: dict | None = None) -> str:
    """``N joint blocks of width W`` (SD3) / ``N double and M single blocks of width W`` (FLUX)
    of converted tensors, or of a config."""
    def count(prefix):
        return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})

    if cfg is not None:
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        blocks = (cfg["num_layers"], cfg.get("num_single_layers"))
    else:
        weight = state.get("context_embedder.weight")
        width = int(weight.shape[0]) if weight is not None else None
        blocks = (count("transformer_blocks."), count("single_transformer_blocks."))
    if family == "flux":
        return f"{blocks[0]} double and {blocks[1]} single blocks of width {width}"
    return f"{blocks[0]} joint blocks of width {width}"


def _pad_flux(work: dict, path: str) -> int | None:
    """Zero-pad each single block's fused ``linear1`` (q, k, v: width D each, MLP: 4·D) to the
    3072 width diffusers' converter splits at; returns D when padded, else None."""
    import torch

    img_in = work.get("img_in.weight")
    if img_in is None:
        return None
    d = int(img_in.shape[0])
    if d == FLUX_CONVERTER_WIDTH:
        return None
    if d > FLUX_CONVERTER_WIDTH:
        raise ModelLoadError(f"checkpoint {path!r}: a FLUX transformer of width {d} is wider than FLUX.1's "
                             f"{FLUX_CONVERTER_WIDTH}, which diffusers' converter assumes: not supported")
    sizes, w = (d, d, d, 4 * d), FLUX_CONVERTER_WIDTH
    for key in [k for k in work if k.startswith("single_blocks.") and k.endswith(("linear1.weight", "linear1.bias"))]:
        t = work[key]
        if t.shape[0] != sum(sizes):
            raise ModelLoadError(f"checkpoint {path!r}: {key} has {t.shape[0]} rows, not 7 × the width {d}")
        padded = torch.zeros((7 * w, *t.shape[1:]), dtype=t.dtype)
        for j, part in enumerate(torch.split(t, sizes, dim=0)):
            padded[j * w:j * w + part.shape[0]] = part
        work[key] = padded
    return d


def _unpad_flux(converted: dict, d: int) -> dict:
    for key, t in converted.items():
        if key.startswith("single_transformer_blocks.") and (".attn.to_" in key or ".proj_mlp." in key):
            converted[key] = t[:4 * d if ".proj_mlp." in key else d].clone()
    return converted


def convert_transformer(family: str, state: dict, path: str, candidates=None):
    """``(config name, transformer)`` from the original-layout tensors ``state`` (names without
    the ``model.diffusion_model.`` prefix), on the first shipped config that fits exactly."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    name = NAMES[family]
    work = dict(state)  # the converters pop what they use: what is left is not part of the model
    try:
        if family == "flux":
            width = _pad_flux(work, path)
            converted = convert_flux_transformer_checkpoint_to_diffusers(work)
            if width is not None:
                converted = _unpad_flux(converted, width)
        else:
            converted = convert_sd3_transformer_checkpoint_to_diffusers(work)
    except ModelLoadError:
        raise
    except Exception as exc:  # a tensor the converter needs is missing or has another shape
        raise ModelLoadError(f"checkpoint {path!r}: the {name} transformer is incomplete or malformed "
                             f"({type(exc).__name__}: {first_line(exc)[:160]})") from None
    if work:
        raise ModelLoadError(f"checkpoint {path!r}: {len(work)} tensors are not part of a {name} transformer, "
                             f"e.g. {sorted(work)[0]} (another model variant?)")
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    reasons = []
    for variant in candidates or CANDIDATES[family]:
        cfg = shipped.load_config(variant, "transformer")
        if family == "flux":  # FLUX.1-schnell: the same network without the guidance embedder
            cfg["guidance_embeds"] = any(k.startswith("time_text_embed.guidance_embedder.") for k in converted)
        have, want = _shape_summary(family, converted), _shape_summary(family, {}, cfg)
        if have != want:
            reasons.append(f"{variant}: the file has {have}, the config {want}")
            continue
        model = _empty(lambda: cls.from_config(cfg), buffers=True)
        why = single_file.shape_mismatch(converted, model, "transformer")
        if why is None:
            model.load_state_dict(converted, strict=True, assign=True)
            empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            if empty:  # a buffer the state dict does not carry
                raise ModelLoadError(f"checkpoint {path!r}: the {name} transformer has no values for {empty[0]}")
            return variant, model
        reasons.append(f"{variant}: {why}")
    raise ModelLoadError(f"checkpoint {path!r}: the {name} transformer matches no shipped config "
                         f"({'; '.join(reasons)})")


# --------------------------------------------------------------------------- encoders and VAE


def _component(comp: str, state: dict, family: str, folder: str, path: str):
    """The text encoder or VAE ``comp`` from the file's tensors, on the folder's config."""
    import torch

    if not os.path.isfile(os.path.join(folder, comp, "config.json")):
        raise ModelLoadError(f"checkpoint {path!r} holds the {comp} weights, whose architecture comes from "
                             f"{os.path.join(folder, comp, 'config.json')}: no such file")
    try:
        if comp == "vae":
            from diffusers import AutoencoderKL
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            cfg = read_json(os.path.join(folder, comp, "config.json"), f"{folder}/vae/config.json")
            model = _empty(lambda: AutoencoderKL.from_config(cfg))
            converted = convert_ldm_vae_checkpoint(state, cfg)
        elif any(k.startswith(T5) for k in state):
            from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers
            from transformers import T5Config, T5EncoderModel

            config = T5Config.from_pretrained(folder, subfolder=comp, local_files_only=True)
            model = _empty(lambda: T5EncoderModel(config))
            converted = convert_sd3_t5_checkpoint_to_diffusers(state)
            if "shared.weight" in converted:  # the token embedding is stored once, tied in the model
                converted.setdefault("encoder.embed_tokens.weight", converted["shared.weight"])
        else:
            from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            prefix = CLIP_L if any(k.startswith(CLIP_L) for k in state) else CLIP_G
            cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
            config = CLIPTextConfig.from_pretrained(folder, subfolder=comp, local_files_only=True)
            model = _empty(lambda: cls(config))
            converted = convert_ldm_clip_checkpoint(state, prefix)
            if family == "sd3" and prefix == CLIP_L:  # SD3 uses CLIP-L's pooled output unprojected
                converted["text_projection.weight"] = torch.eye(config.hidden_size, config.projection_dim or
                                                                config.hidden_size)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {path!r}: cannot build the {comp} from the file with "
                             f"{folder}/{comp}/config.json: {first_line(exc)[:160]}") from None
    expected = model.state_dict()
    renamed = {}
    for k, v in converted.items():  # transformers 5's CLIPTextModel has no text_model level
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        for cand in (k, bare, "text_model." + bare):
            if cand in expected:
                renamed[cand] = v
                break
    missing = sorted(k for k in expected if k not in renamed and not k.endswith("position_ids"))
    bad = [k for k, v in renamed.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if missing or bad:
        why = (f"lacks {len(missing)} tensors, e.g. {missing[0]}" if missing else
               f"has {bad[0]} of shape {tuple(renamed[bad[0]].shape)}, the config expects {tuple(expected[bad[0]].shape)}")
        raise ModelLoadError(f"checkpoint {path!r}: its {comp} does not fit {folder}/{comp}/config.json ({why})")
    model.load_state_dict({k: v.contiguous() for k, v in renamed.items()}, strict=False, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- the whole model


def _split(state: dict, family: str, path: str) -> dict[str, dict]:
    """The file's tensors by diffusers component: ``unet`` (transformer names without the
    prefix), text encoders and ``vae`` (names as stored)."""
    prefixed = any(k.startswith(TRANSFORMER_PREFIX) for k in state)
    groups: dict[str, dict] = {"unet": {}}
    for k, v in state.items():
        comp = next((c[family] for p, c in TEXT_PREFIXES.items() if k.startswith(p) and family in c), None)
        if comp is None and k.startswith(VAE_PREFIX):
            comp = "vae"
        if comp is not None:
            groups.setdefault(comp, {})[k] = v
        elif k.startswith(TRANSFORMER_PREFIX) or not prefixed:
            groups["unet"][_bare(k)] = v
        else:
            raise ModelLoadError(f"checkpoint {path!r}: tensor {k!r} belongs to no part of {A_NAME[family]} "
                                 "checkpoint (transformer, text_encoders.clip_l/clip_g/t5xxl, first_stage_model)")
    return groups


def _folder(path: str, family: str, model_folder, holds: list[str]) -> str:
    """The diffusers folder that supplies what the file lacks (checked to be of its family)."""
    from .flow_loading import pipeline_family

    if model_folder is None:
        here = os.path.dirname(os.path.abspath(path))
        if os.path.isfile(os.path.join(here, "model_index.json")):
            model_folder = here
        else:
            parts = {"unet": f"{A_NAME[family]} transformer", "vae": "a VAE"}
            held = [parts.get(c, c) for c in holds]
            encoders = "text encoders and " if not any(c.startswith("text_encoder") for c in holds) else ""
            raise ModelLoadError(
                f"checkpoint {path!r} holds {' and '.join(held)} but no {encoders}tokenizers or scheduler: put "
                f"the file (or a link to it) into the base model's diffusers folder, next to its model_index.json "
                f"(as {EXAMPLES[family]}), or pass that folder as model_folder to load_components")
    folder = os.path.abspath(os.path.expanduser(os.fspath(model_folder)))
    if not os.path.isdir(folder):
        raise ModelLoadError(f"model folder {os.fspath(model_folder)!r} does not exist")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ModelLoadError(f"model folder {os.fspath(model_folder)!r} is not a diffusers pipeline folder: "
                             "no model_index.json")
    found = pipeline_family(folder, os.fspath(model_folder))
    if found != family:
        raise ModelLoadError(f"checkpoint {path!r} is {A_NAME[family]} transformer, but the folder "
                             f"{os.fspath(model_folder)!r} is {A_NAME[found]} pipeline")
    return folder


def load_flow_single_file(path: str, family: str, *, model_folder=None, weights: str = "non-ema"):
    """``(parts, source)`` of an SD3.5 or FLUX.1 single file (``classify_file`` gave ``family``)
    completed by a diffusers folder; ``parts`` are :class:`~ap_erase_fast.models.SDComponents`
    fields."""
    import torch
    from safetensors import safe_open

    from .flow_loading import load_flow_folder
    from .single_file import read_checkpoint

    if weights == "ema":
        raise ModelLoadError(f"checkpoint {path!r} is {A_NAME[family]} file with one copy of the weights and no "
                             "EMA weights; load it with non-ema weights")
    with safe_open(path, framework="pt") as fh:  # classify_file has read this header already
        holds = _holds(list(fh.keys()), family)
    folder = _folder(path, family, model_folder, holds)
    state, _ = read_checkpoint(path)
    groups = _split(state, family, path)
    del state
    variant, transformer = convert_transformer(family, groups.pop("unet"), path)
    provided = {"unet": transformer}
    for comp in sorted(groups):
        provided[comp] = _component(comp, groups[comp], family, folder, path)
    for module in provided.values():  # fp32, as from_pretrained gives the folder's modules (torch's
        torch.nn.Module.to(module, torch.float32)  # own .to: diffusers' warns on every dtype cast)
    parts = load_flow_folder(folder, folder, provided=provided, family=family)
    source = {"format": "single_file", "path": os.path.abspath(path), "weights": None, "sd_version": family,
              "config": variant, "file_sha256": file_sha256(path), "folder": folder,
              "from_file": ["transformer" if c == "unet" else c for c in provided]}
    if family == "flux":
        source["guidance_embeds"] = bool(transformer.config.guidance_embeds)
    return parts, source
