"""``load_components``: one entry point for the built-in models (``tiny``, ``tiny-sdxl``,
``shapes``), diffusers folders, hub ids and single-file checkpoints (CompVis layout for SD1/SD2,
SGM layout for SDXL). Every bad input raises :class:`ModelLoadError`."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError
from .parts import check_sdxl_widths, ddim_scheduler, read_json  # noqa: F401  (re-exported)
from .parts import first_line as _first_line
from .parts import optional_vae

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model the library works with, plus where they came from."""

    unet: Any  # diffusers.UNet2DConditionModel
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # diffusers.DDIMScheduler
    vae: Any | None  # diffusers.AutoencoderKL or None
    model_id: str
    content_hash: str  # module_content_hash(unet) of the UNet as returned (dtype included)
    random_weights: bool
    source: dict = field(default_factory=dict)
    pipeline_path: str | None = None
    default_resolution: int = 512
    family: str = "sd"  # which backend in ap_erase_fast.backbones drives it: sd, sdxl, sd3, flux
    text_encoder_2: Any | None = None  # SDXL's/SD3's second CLIP encoder (with projection); FLUX's T5
    tokenizer_2: Any | None = None
    text_encoder_3: Any | None = None  # SD3's T5 encoder
    tokenizer_3: Any | None = None
    extra: dict = field(default_factory=dict)  # family-specific settings (SDXL: force_zeros...)

    @property
    def sd_version(self) -> str | None:
        return self.source.get("sd_version")

    def to_pipeline(self):
        """A diffusers pipeline sharing these modules (needs a VAE): ``StableDiffusionPipeline``
        (safety checker off), or ``StableDiffusionXLPipeline`` for SDXL (no watermarker, the
        model's ``force_zeros_for_empty_prompt``)."""
        if self.vae is None:
            raise ModelLoadError(f"model {self.model_id!r} has no VAE; cannot build an image pipeline")
        if self.family in ("sd3", "flux"):
            from .tiny_flow import assemble_flow_pipeline

            return assemble_flow_pipeline(self.family, {
                "transformer": self.unet, "scheduler": self.scheduler, "vae": self.vae,
                **{k: getattr(self, k) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                 "text_encoder_3", "tokenizer_3")}})
        if self.family == "sdxl":
            from .tiny import assemble_sdxl_pipeline

            return assemble_sdxl_pipeline(
                self.unet, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2,
                self.scheduler, self.vae,
                force_zeros_for_empty_prompt=self.extra.get("force_zeros_for_empty_prompt", True))
        from .tiny import assemble_pipeline

        return assemble_pipeline(self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae)


def sd_version_of(unet_config) -> str:
    """``"1.x"`` (context dim 768), ``"2.x"`` (1024), else ``"custom"`` (SDXL is recognised
    from its added conditioning before this is asked)."""
    dim = unet_config.get("cross_attention_dim") if hasattr(unet_config, "get") else None
    return {768: "1.x", 1024: "2.x"}.get(dim, "custom")


def vae_scale_factor(vae) -> int:
    if vae is None:
        return 8
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _finish(parts: dict, *, model_id, random_weights, source, pipeline_path, torch_dtype, device) -> SDComponents:
    """SDComponents of loaded ``parts`` (the SDComponents fields ``unet``, ``text_encoder``,
    ``tokenizer``, ``scheduler``, ``vae``, and for SDXL ``text_encoder_2``, ``tokenizer_2``,
    ``family``, ``extra``), moved to ``device`` and ``torch_dtype``, in eval mode."""
    from .hashing import module_content_hash

    for key in ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        m = parts.get(key)
        if m is not None:
            m.to(device)
            if m.dtype != torch_dtype:  # skip no-op casts: diffusers warns on every .to(dtype)
                m.to(dtype=torch_dtype)
            m.eval()
    unet, vae = parts["unet"], parts.get("vae")
    res = parts.pop("default_resolution", None) or int(unet.config.sample_size) * vae_scale_factor(vae)
    return SDComponents(
        **parts,
        model_id=model_id,
        content_hash=module_content_hash(unet),
        random_weights=random_weights,
        source=source,
        pipeline_path=pipeline_path,
        default_resolution=res,
    )


def load_components(
    model: str = "tiny",
    *,
    single_file_weights: str = "non-ema",
    torch_dtype=None,
    device="cpu",
    prediction_type: str | None = None,
    model_folder: str | os.PathLike | None = None,
) -> SDComponents:
    """Load the UNet, text encoder, tokenizer, DDIM scheduler and VAE of ``model``.

    ``model``: ``"tiny"`` (built-in demo model, random weights), ``"tiny-sdxl"`` (built-in
    SDXL-shaped demo model, random weights), ``"shapes"`` / ``"shapes2"`` (the built-in
    ShapesWorld and ShapesWorld 2 models, trained: see ``ap_erase_fast.shapes``), a local diffusers pipeline folder (SD1.x, SD2.x or
    SDXL), a Hugging Face hub id (only from the local cache when ``HF_HUB_OFFLINE=1``), or a
    single-file checkpoint (``.safetensors`` / ``.ckpt``; CompVis layout for SD1.x/SD2.x, SGM
    layout for SDXL). ``single_file_weights``
    (``"non-ema"`` or ``"ema"``) picks the UNet copy of a single file. ``prediction_type``
    (``"epsilon"`` / ``"v_prediction"``) overrides the scheduler's (for single files whose
    parameterisation the heuristic gets wrong). ``torch_dtype`` defaults to float32.
    ``model_folder``: for an SD3.5 / FLUX.1 single file, the base model's diffusers folder that
    supplies what the file lacks (default: the folder the file lies in, when it is one).
    """
    import torch

    torch_dtype = torch.float32 if torch_dtype is None else torch_dtype
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise ModelLoadError(f"unknown prediction type {prediction_type!r}; choose epsilon or v_prediction")
    if single_file_weights not in ("ema", "non-ema"):
        raise ModelLoadError(f"single_file_weights must be 'ema' or 'non-ema', got {single_file_weights!r}")
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ModelLoadError(f"model must be 'tiny', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux', 'shapes', 'shapes2', 'shapes2-flow', a folder, a hub id or a .safetensors/.ckpt file, got {model!r}")
    model = os.fspath(model)
    common = dict(torch_dtype=torch_dtype, device=device)
    if model_folder is not None and not os.path.isfile(os.path.expanduser(model)):
        raise ModelLoadError(f"model_folder applies to an SD3.5 or FLUX.1 single-file checkpoint, and {model!r} "
                             "is not a file")

    from ..shapes.loading import SHIPPED_DIRS

    if model in SHIPPED_DIRS:
        from ..shapes.loading import WORLDS, shipped_dir

        folder = shipped_dir(model)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            retrain = ("python -m ap_erase_fast.shapes.train_flow --out DIR --ship " + folder if model.endswith("-flow")
                       else f"python -m ap_erase_fast.shapes.train --world {WORLDS[model]}")
            raise ModelLoadError(f"the built-in ShapesWorld model is missing from {folder} (--model {model}); "
                                 f"reinstall the package or retrain it ({retrain})")
        comps = _load_diffusers_folder(folder, model_id=model, fmt="builtin", **common)
        comps.source["sd_version"] = model
    elif model in ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"):
        parts, path = _load_tiny(model)
        comps = _finish(
            parts,
            model_id=model,
            random_weights=True,
            source={"format": "builtin", "path": None, "weights": None, "sd_version": model},
            pipeline_path=path,
            **common,
        )
    else:
        expanded = os.path.expanduser(model)
        if os.path.isdir(expanded):
            comps = _load_diffusers_folder(expanded, model_id=model, fmt="diffusers", **common)
        elif os.path.isfile(expanded):
            comps = _load_file(
                expanded, model_id=model, weights=single_file_weights, prediction_type=prediction_type,
                model_folder=model_folder, **common
            )
        elif expanded.lower().endswith(SINGLE_FILE_EXTENSIONS):
            raise ModelLoadError(f"model file {model!r} does not exist")
        elif _HUB_ID.match(model):
            folder = _hub_snapshot(model)
            comps = _load_diffusers_folder(folder, model_id=model, fmt="hub", **common)
        else:
            raise ModelLoadError(
                f"model {model!r} does not exist; pass 'tiny', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux', 'shapes', 'shapes2', 'shapes2-flow', a local diffusers folder, a hub id "
                "(org/name) or a .safetensors/.ckpt file"
            )
    if comps.family in ("sd3", "flux"):
        if prediction_type is not None:
            raise ModelLoadError(f"model {model!r} is a flow-matching model (velocity prediction): "
                                 "a prediction type cannot be set for it")
        comps.source.setdefault("prediction_type", "flow")
        return comps
    if prediction_type is not None and comps.scheduler.config.prediction_type != prediction_type:
        comps.scheduler = ddim_scheduler({**dict(comps.scheduler.config), "prediction_type": prediction_type})
        comps.source["prediction_type_override"] = prediction_type
    comps.source.setdefault("prediction_type", comps.scheduler.config.prediction_type)
    return comps


def _load_tiny(variant: str) -> tuple[dict, str | None]:
    if variant in ("tiny-sd3", "tiny-flux"):
        from .tiny_flow import load_tiny_flow

        return load_tiny_flow(variant)
    from .tiny import build_tiny_modules, build_tiny_sdxl_modules, ensure_tiny_pipeline_folder

    if variant == "tiny":
        modules = build_tiny_modules()
        path = ensure_tiny_pipeline_folder(modules)
        return dict(zip(("unet", "text_encoder", "tokenizer", "scheduler", "vae"), modules)), path
    parts = build_tiny_sdxl_modules()
    path = ensure_tiny_pipeline_folder(parts, variant)
    return {**parts, "family": "sdxl", "extra": {"force_zeros_for_empty_prompt": True}}, path


def _load_file(path, *, model_id, weights, prediction_type, torch_dtype, device, model_folder=None) -> SDComponents:
    if not path.lower().endswith(SINGLE_FILE_EXTENSIONS):
        raise ModelLoadError(
            f"unsupported model file {model_id!r}: expected a .safetensors or .ckpt checkpoint or a diffusers folder"
        )
    from .flow_single_file import classify_file, load_flow_single_file
    from .single_file import load_single_file

    family = classify_file(path)  # SD3.5 / FLUX.1 layouts; a one-line error for unknown ones
    if family is not None:
        parts, source = load_flow_single_file(path, family, model_folder=model_folder, weights=weights)
    elif model_folder is not None:
        raise ModelLoadError(f"model_folder applies to SD3.5 and FLUX.1 single files; {model_id!r} is an "
                             "SD1/SD2/SDXL checkpoint, which holds every part")
    else:
        parts, source = load_single_file(path, weights=weights, prediction_type=prediction_type)
    return _finish(
        parts,
        model_id=model_id,
        random_weights=False,
        source=source,
        pipeline_path=None,
        torch_dtype=torch_dtype,
        device=device,
    )


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().lower() in ("1", "on", "yes", "true"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/model*.safetensors*",
    "text_encoder_3/model*.safetensors*",
    "tokenizer_3/*",
    "transformer/diffusion_pytorch_model*.safetensors*",
    "vae/diffusion_pytorch_model.safetensors",
]


def _hub_snapshot(repo_id: str) -> str:
    """Local folder of a hub pipeline: from the HF cache when offline, else downloaded."""
    offline = _hub_offline()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except Exception as exc:
        if offline:
            raise ModelLoadError(
                f"model {repo_id!r} is not a local path and is not in the Hugging Face cache (HF_HUB_OFFLINE=1); "
                "pass a local diffusers folder or a .safetensors/.ckpt file"
            ) from None
        raise ModelLoadError(f"cannot get model {repo_id!r} from the Hugging Face hub: {_first_line(exc)}") from None
    from .flow_loading import is_flow_folder

    if not os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")) and not is_flow_folder(folder):
        raise ModelLoadError(
            f"hub model {repo_id!r} has no safetensors UNet weights (unet/diffusion_pytorch_model.safetensors); "
            "convert it to a local diffusers folder first"
        )
    return folder


_REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "scheduler")


def _load_diffusers_folder(folder, *, model_id, fmt, torch_dtype, device) -> SDComponents:
    """SD1.x / SD2.x, or SDXL when the UNet's added conditioning is ``text_time`` (then
    ``text_encoder_2/`` is required and ``force_zeros_for_empty_prompt`` comes from
    ``model_index.json``, default true as in diffusers' SDXL pipelines)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            hint = " (it looks like a single model folder; pass the pipeline folder above it)"
        else:
            hint = ""
        raise ModelLoadError(f"folder {model_id!r} is not a diffusers pipeline folder: no model_index.json{hint}")
    from .flow_loading import is_flow_folder, load_flow_folder

    if is_flow_folder(folder):
        parts = load_flow_folder(folder, model_id)
        source = {"format": fmt, "path": os.path.abspath(folder), "weights": None, "sd_version": parts["family"]}
        return _finish(parts, model_id=model_id, random_weights=False, source=source,
                       pipeline_path=os.path.abspath(folder) if parts["vae"] is not None else None,
                       torch_dtype=torch_dtype, device=device)
    has = {s: os.path.isdir(os.path.join(folder, s)) for s in (*_REQUIRED_SUBFOLDERS, "text_encoder_2")}
    unet_cfg = None
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        unet_cfg = read_json(os.path.join(folder, "unet", "config.json"), f"{model_id}/unet/config.json")
    sdxl = unet_cfg is not None and unet_cfg.get("addition_embed_type") == "text_time"
    if sdxl and not has["text_encoder"] and has["text_encoder_2"]:
        raise ModelLoadError(f"model {model_id!r} is an SDXL refiner-type model (only text_encoder_2/): not "
                             "supported; use an SDXL base model (text_encoder/ and text_encoder_2/)")
    required = (*_REQUIRED_SUBFOLDERS, "text_encoder_2") if sdxl else _REQUIRED_SUBFOLDERS
    missing = [s for s in required if not has[s]]
    if missing:
        raise ModelLoadError(f"diffusers folder {model_id!r} lacks the subfolder(s) {', '.join(missing)}")
    if unet_cfg is None:
        raise ModelLoadError(f"cannot read {model_id}/unet/config.json: no such file")
    sd_version = "xl" if sdxl else sd_version_of(unet_cfg)
    step = "unet"
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        step = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        step = "tokenizer"
        max_len = int(getattr(text_encoder.config, "max_position_embeddings", 77))
        tokenizer, tokenizer_source = _folder_tokenizer(
            folder, "tokenizer", "!" if sd_version == "2.x" else "<|endoftext|>", max_len)
        parts = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer}
        if sdxl:
            step = "text_encoder_2"
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", local_files_only=True)
            step = "tokenizer_2"
            parts["tokenizer_2"], _ = _folder_tokenizer(folder, "tokenizer_2", "!", max_len)
        step = "scheduler"
        parts["scheduler"] = ddim_scheduler(_read_scheduler_config(os.path.join(folder, "scheduler")))
        step = "vae"
        parts["vae"] = optional_vae(folder)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupted weights, bad configs, safetensors errors, …
        raise ModelLoadError(f"cannot load the {step} of {model_id!r}: {_first_line(exc)}") from None
    if sdxl:
        index = read_json(os.path.join(folder, "model_index.json"), f"{model_id}/model_index.json")
        parts.update(family="sdxl", extra={
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))})
        check_sdxl_widths(parts, model_id)
    elif getattr(text_encoder.config, "hidden_size", None) != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"model {model_id!r}: text encoder width {text_encoder.config.hidden_size} does not match the UNet's "
            f"cross-attention dim {unet.config.cross_attention_dim}"
        )
    source = {
        "format": fmt,
        "path": os.path.abspath(folder),
        "weights": None,
        "sd_version": sd_version,
        "tokenizer": tokenizer_source,
    }
    return _finish(
        parts,
        model_id=model_id,
        random_weights=False,
        source=source,
        pipeline_path=os.path.abspath(folder) if parts["vae"] is not None else None,
        torch_dtype=torch_dtype,
        device=device,
    )


def _folder_tokenizer(folder: str, sub: str, pad_token: str, max_length: int):
    """``(tokenizer, "folder" | "vendored")``: the folder's own tokenizer, else the vendored
    CLIP BPE with ``pad_token`` and the text encoder's context length."""
    from transformers import CLIPTokenizer

    if os.path.isdir(os.path.join(folder, sub)):
        return CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True), "folder"
    from .tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(pad_token, model_max_length=max_length), "vendored"


def _read_scheduler_config(sub: str) -> dict | None:
    import json

    for name in ("scheduler_config.json", "config.json"):
        path = os.path.join(sub, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return None
