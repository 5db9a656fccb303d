"""LoRA erasure: θ′ = the denoiser with low-rank adapters (peft, through diffusers' adapter API),
θ = the same denoiser with its adapters switched off. There is no frozen copy of anything.

The adapters go on the linear and convolution layers the ``--train-method`` selects
(:meth:`~ap_erase_fast.backbones.Backbone.lora_targets`); B starts at zero, so θ′₀ = θ exactly.
Outputs: diffusers LoRA weights (``pipe.load_lora_weights(run_folder)``, or its ``lora/``), for
SD1/SDXL a single-file LoRA in the kohya format that A1111 and ComfyUI load, and on request the
merged denoiser. SD3/SD3.5 and FLUX.1 runs write the same diffusers file with its keys under
``transformer.`` (``StableDiffusion3Pipeline`` / ``FluxPipeline.load_lora_weights``) and no kohya
file (their kohya/ComfyUI layout names the original BFL/SAI modules, e.g. FLUX's fused qkv,
which this module does not convert to).
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch

from .errors import UserError

ADAPTER = "ap_erase"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def _peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("--lora-rank needs peft: pip install 'ap_erase_fast[lora]' (or "
                        "pip install peft)") from None


def attach(denoiser: torch.nn.Module, targets: list[str], rank: int, alpha: float,
           seed: int = 0) -> list:
    """Add the adapters to ``targets`` (module names) and make them the only trained tensors;
    returns ``[(name, parameter)]`` of the adapter weights in module order.

    A is drawn as peft draws it (Kaiming-uniform, a = √5) but from a CPU generator seeded by
    ``seed`` and the tensor's name, so a run is reproducible on any device and whatever else
    used the global generator; B is zero."""
    _peft()
    from peft import LoraConfig

    if not targets:
        raise UserError("this --train-method selects no linear or convolution layer for LoRA "
                        "adapters; choose another --train-method")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        init_lora_weights=True, lora_dropout=0.0)
    denoiser.add_adapter(config, adapter_name=ADAPTER)
    trained = [(n, p) for n, p in denoiser.named_parameters() if f".{ADAPTER}." in n]
    with torch.no_grad():
        for n, p in trained:
            if ".lora_A." in n:
                g = torch.Generator().manual_seed(_name_seed(seed, n))
                value = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=g)
                p.copy_(value)
    for _, p in trained:
        p.requires_grad_(True)
    return trained


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"ap_erase_fast/lora/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class AdapterSwitch:
    """θ as a forward of the same module with every adapter off."""

    def __init__(self, denoiser: torch.nn.Module, params: list[torch.nn.Parameter]):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoiser = denoiser
        self.layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
        self.params = params

    @contextlib.contextmanager
    def off(self):
        flags = [p.requires_grad for p in self.params]  # peft's toggle also flips requires_grad
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)

    def frozen_forward(self, *args, **kwargs):
        with self.off():
            return self.denoiser(*args, **kwargs)


def lora_config(denoiser) -> dict:
    return denoiser.peft_config[ADAPTER].to_dict()


def peft_state_dict(denoiser, trained: dict[str, torch.Tensor] | None = None) -> dict:
    """The adapters in peft's naming without the adapter name (``<module>.lora_A.weight``), fp32
    on CPU, from the module or from ``trained`` (the engine's tensors, e.g. fp32 masters)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, state_dict=trained, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def denoiser_prefix(pipeline_class) -> str:
    """The key prefix of the denoiser in the pipeline's LoRA files: ``transformer`` (SD3, FLUX:
    their loaders list a ``transformer`` among ``_lora_loadable_modules``) or ``unet``."""
    modules = getattr(pipeline_class, "_lora_loadable_modules", ())
    return "transformer" if "transformer" in modules else "unet"


def save_diffusers(folder, denoiser, pipeline_class, trained=None) -> None:
    """``folder/pytorch_lora_weights.safetensors`` (peft naming under ``unet.``, or
    ``transformer.`` for SD3/FLUX), loadable with ``pipe.load_lora_weights(folder)``.

    diffusers infers rank and target layers from the tensors and takes alpha = rank (scale 1),
    so the run's scale alpha/rank is folded into the up (B) matrices. (diffusers' own
    "diffusers-format" conversion drops self-attention adapters on loading; peft naming loads
    every adapter.)"""
    scale = float(lora_config(denoiser)["lora_alpha"]) / float(lora_config(denoiser)["r"])
    state = {k: (v * scale if ".lora_B." in k else v)
             for k, v in peft_state_dict(denoiser, trained).items()}
    layers = {f"{denoiser_prefix(pipeline_class)}_lora_layers": state}
    pipeline_class.save_lora_weights(str(folder), **layers, weight_name=DIFFUSERS_WEIGHTS,
                                     safe_serialization=True)


def kohya_state_dict(denoiser, trained=None) -> dict:
    """The adapters in the kohya/A1111 naming (``lora_unet_<module>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``)."""
    from diffusers.utils import convert_state_dict_to_kohya

    unet = {f"unet.{k}": v for k, v in peft_state_dict(denoiser, trained).items()}
    out = convert_state_dict_to_kohya(unet)
    alpha = float(lora_config(denoiser)["lora_alpha"])
    for k in out:
        if k.endswith(".alpha"):  # diffusers writes alpha = rank; the run's own alpha goes here
            out[k] = torch.tensor(alpha)
    return {k: v.contiguous() for k, v in out.items()}


def merged_copy(denoiser, trained=None):
    """A copy of the denoiser (fp32) with the adapters merged into the base weights and the peft
    layers removed: a plain diffusers model. ``trained``: adapter values to merge (default: the
    module's own)."""
    import copy

    clone = copy.deepcopy(denoiser).float()
    if trained is not None:
        with torch.no_grad():
            params = dict(clone.named_parameters())
            for n, v in trained.items():
                params[n].copy_(v)
    clone.fuse_lora(adapter_names=[ADAPTER])
    clone.unload_lora()
    return clone


def write_lora_outputs(folder, denoiser, trained, pipeline_class, merge: bool = False) -> None:
    """``lora/`` (diffusers), a copy of its weights file at the top of ``folder``,
    ``lora_kohya.safetensors`` (A1111/ComfyUI; SD1/SDXL only) and, with ``merge``, ``unet/`` (the
    merged denoiser: a UNet, or for SD3/FLUX the transformer, as a full run writes it), from the
    adapter values ``trained``.

    The copy makes ``pipe.load_lora_weights(folder)`` load the LoRA: given a folder, diffusers
    0.42 takes the file named ``pytorch_lora_weights.safetensors`` there and otherwise the first
    ``.safetensors`` file it lists, which in a run folder is ``trained.safetensors`` (peft names
    without the ``unet.`` prefix: nothing loads, with only a warning)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    save_diffusers(folder / "lora", denoiser, pipeline_class, trained)
    shutil.copyfile(folder / "lora" / DIFFUSERS_WEIGHTS, folder / DIFFUSERS_WEIGHTS)
    if denoiser_prefix(pipeline_class) == "unet":
        meta = {"format": "kohya-ss LoRA", "ss_network_module": "networks.lora",
                "ss_network_dim": str(lora_config(denoiser)["r"]),
                "ss_network_alpha": str(lora_config(denoiser)["lora_alpha"])}
        save_file(kohya_state_dict(denoiser, trained), str(folder / "lora_kohya.safetensors"),
                  metadata=meta)
    if merge:
        merged_copy(denoiser, trained).save_pretrained(str(folder / "unet"), safe_serialization=True)
