"""LoRA files in the original (non-diffusers) module naming of the flow transformers, for
ComfyUI, Forge and the other tools that name FLUX.1 and SD3 by their reference implementations.

A run's LoRA lives on diffusers' modules (``transformer_blocks.0.attn.to_q`` …). The original
checkpoints fuse some of them: FLUX (Black Forest Labs' ``flux1-dev.safetensors`` layout)
computes q, k and v with one ``img_attn.qkv`` / ``txt_attn.qkv`` linear per double block and
q, k, v and the MLP input with one ``linear1`` per single block; SD3 (Stability's MMDiT layout)
has ``x_block.attn.qkv``, ``context_block.attn.qkv`` and ``x_block.attn2.qkv``. The final
adaptive norm stores its output halves as (shift, scale) where diffusers stores (scale, shift)
(FLUX's ``final_layer.adaLN_modulation.1``; SD3's, and the context norm of SD3's last block).

A LoRA on the separate modules is written as one LoRA on the fused module, exactly: with the
parts' adapters (A_i [r_i, in], B_i [out_i, r_i], B already holding the run's alpha/r scale),

    down = [A_1; A_2; …]  (Σ r_i rows),    up = block-diagonal placement of B_i  [Σ out_i, Σ r_i],

so up·down = [B_1·A_1; B_2·A_2; …], the separate deltas stacked in the fused module's output
order; a part without an adapter contributes zero rows, a swapped norm swaps up's row halves.
Each module's ``.alpha`` is its down rank, so every reader's scale alpha/rank is 1 (the scale is
in up, as in the diffusers file; diffusers' kohya reader ignores FLUX's ``final_layer`` alphas,
so a scale left to alpha would be lost there). Keys are kohya-ss's: ``lora_unet_`` + the
original module name with ``_`` for ``.``, then ``.lora_down.weight``, ``.lora_up.weight``,
``.alpha`` (e.g. ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``): what ComfyUI's
``comfy/lora.py`` ``model_lora_keys_unet`` maps to ``diffusion_model.<module>.weight`` for any
model, and what diffusers' ``FluxPipeline.load_lora_weights`` converts back
(``_convert_kohya_flux_lora_to_diffusers``).
"""
from __future__ import annotations

import torch

COMFYUI_WEIGHTS = "lora_comfyui.safetensors"
KOHYA_PREFIX = "lora_unet_"

# (original module, diffusers modules whose outputs it concatenates in order, output halves swapped)
_FLUX_TOP = [
    ("img_in", ["x_embedder"], False),
    ("txt_in", ["context_embedder"], False),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], False),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], False),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], False),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], False),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"], False),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"], False),
    ("final_layer.linear", ["proj_out"], False),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True),
]
_FLUX_DOUBLE = [
    ("img_mod.lin", ["norm1.linear"]),
    ("txt_mod.lin", ["norm1_context.linear"]),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("img_attn.proj", ["attn.to_out.0"]),
    ("txt_attn.proj", ["attn.to_add_out"]),
    ("img_mlp.0", ["ff.net.0.proj"]),
    ("img_mlp.2", ["ff.net.2"]),
    ("txt_mlp.0", ["ff_context.net.0.proj"]),
    ("txt_mlp.2", ["ff_context.net.2"]),
]
_FLUX_SINGLE = [
    ("modulation.lin", ["norm.linear"]),
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ("linear2", ["proj_out"]),
]
_SD3_TOP = [
    ("x_embedder.proj", ["pos_embed.proj"], False),
    ("context_embedder", ["context_embedder"], False),
    ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], False),
    ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], False),
    ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"], False),
    ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"], False),
    ("final_layer.linear", ["proj_out"], False),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True),
]
_SD3_BLOCK = [
    ("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("context_block.attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("x_block.attn.proj", ["attn.to_out.0"]),
    ("context_block.attn.proj", ["attn.to_add_out"]),
    ("x_block.attn2.qkv", ["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
    ("x_block.attn2.proj", ["attn2.to_out.0"]),
    ("x_block.mlp.fc1", ["ff.net.0.proj"]),
    ("x_block.mlp.fc2", ["ff.net.2"]),
    ("context_block.mlp.fc1", ["ff_context.net.0.proj"]),
    ("context_block.mlp.fc2", ["ff_context.net.2"]),
    ("x_block.adaLN_modulation.1", ["norm1.linear"]),
]
FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def _block_ids(names, prefix: str) -> list[int]:
    return sorted({int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)})


def original_module_table(family: str, module_names) -> list[tuple[str, list[str], bool]]:
    """``[(original module, [diffusers modules, in output order], swapped halves)]`` for the
    modules a transformer with these ``module_names`` has (an entry whose parts are not all
    there, e.g. the context projections of SD3's last block, is left out)."""
    names = set(module_names)
    if family == "flux":
        table = list(_FLUX_TOP)
        for i in _block_ids(names, "transformer_blocks."):
            table += [(f"double_blocks.{i}.{o}", [f"transformer_blocks.{i}.{p}" for p in ps], False)
                      for o, ps in _FLUX_DOUBLE]
        for i in _block_ids(names, "single_transformer_blocks."):
            table += [(f"single_blocks.{i}.{o}", [f"single_transformer_blocks.{i}.{p}" for p in ps], False)
                      for o, ps in _FLUX_SINGLE]
    elif family == "sd3":
        table = list(_SD3_TOP)
        blocks = _block_ids(names, "transformer_blocks.")
        for i in blocks:
            table += [(f"joint_blocks.{i}.{o}", [f"transformer_blocks.{i}.{p}" for p in ps], False)
                      for o, ps in _SD3_BLOCK]
            # the last block's context stream ends in AdaLayerNormContinuous: (shift, scale) stored
            table.append((f"joint_blocks.{i}.context_block.adaLN_modulation.1",
                          [f"transformer_blocks.{i}.norm1_context.linear"], i == blocks[-1]))
    else:
        raise ValueError(f"no original layout for family {family!r}")
    return [(o, ps, swap) for o, ps, swap in table if all(p in names for p in ps)]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_lora(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], table, out_features: dict[str, int]) -> dict:
    """The kohya-named state dict of ``factors`` (``{diffusers module: (A, B·scale)}``) on the
    original modules of ``table``; every adapted module must be part of one entry."""
    out, covered = {}, set()
    for original, parts, swap in table:
        present = [p for p in parts if p in factors]
        if not present:
            continue
        down = torch.cat([factors[p][0] for p in present], dim=0)
        b0 = factors[present[0]][1]
        up = torch.zeros((sum(out_features[p] for p in parts), down.shape[0], *b0.shape[2:]), dtype=b0.dtype)
        row = col = 0
        for p in parts:
            if p in factors:
                a, b = factors[p]
                up[row:row + b.shape[0], col:col + a.shape[0]] = b
                col += a.shape[0]
            row += out_features[p]
        if swap:
            up = _swap_halves(up)
        key = KOHYA_PREFIX + original.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
        covered.update(present)
    missing = sorted(set(factors) - covered)
    if missing:
        raise ValueError(f"{len(missing)} adapted modules have no place in the original layout, e.g. {missing[0]}")
    return out


def original_layout_state_dict(denoiser, trained=None) -> dict:
    """The run's adapters on the original modules of its FLUX or SD3 transformer (see the module
    docstring), fp32 on CPU."""
    from .lora import lora_config, peft_state_dict

    family = FAMILIES[type(denoiser).__name__]
    cfg = lora_config(denoiser)
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    state = peft_state_dict(denoiser, trained)
    factors = {k[:-len(".lora_A.weight")]: (state[k], state[k.replace(".lora_A.", ".lora_B.")] * scale)
               for k in state if k.endswith(".lora_A.weight")}
    out_features = {}
    for name, module in denoiser.named_modules():
        base = getattr(module, "base_layer", module)  # peft's wrapper keeps the layer it adapts
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):  # bitsandbytes' layers are Linears
            # the attribute, not weight.shape: a 4-bit weight is stored packed
            out_features[name] = int(base.out_features if isinstance(base, torch.nn.Linear) else base.out_channels)
    return fuse_lora(factors, original_module_table(family, out_features), out_features)


def write_original_layout_lora(folder, denoiser, trained=None) -> bool:
    """``folder/lora_comfyui.safetensors`` for a FLUX or SD3 transformer with adapters (the
    adapter values ``trained``, default the module's own); False (nothing written) for other
    denoisers."""
    from pathlib import Path

    from safetensors.torch import save_file

    family = FAMILIES.get(type(denoiser).__name__)
    if family is None:
        return False
    meta = {"format": "kohya-ss LoRA", "module_names": "BFL FLUX.1" if family == "flux" else "SAI MMDiT (SD3)",
            "written_by": "ap_erase_fast"}
    save_file(original_layout_state_dict(denoiser, trained), str(Path(folder) / COMFYUI_WEIGHTS), metadata=meta)
    return True
