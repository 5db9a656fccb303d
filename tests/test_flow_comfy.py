"""``lora_comfyui.safetensors`` (``ap_erase_fast/lora_formats.py``): a flow run's LoRA on the
original FLUX (BFL) / SD3 (MMDiT) modules, q/k/v fused, kohya keys. Read back by independent
readers: ComfyUI's rule (``comfy/lora.py``: ``lora_unet_<module>`` ↔ ``diffusion_model.<module>
.weight``, W += alpha/rank(down) · up·down), applied here to the base transformer in the original
layout and converted to diffusers by diffusers' own single-file converter; and diffusers'
``FluxPipeline.load_lora_weights`` / ``lora_state_dict`` (its kohya FLUX converter). Each must
give the merged θ′ of the run."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_flow_single_file import original_transformer

from ap_erase_fast.backbones import make_backbone
from ap_erase_fast.conditioning import Cond
from ap_erase_fast.engine import Eraser
from ap_erase_fast.export import write_outputs
from ap_erase_fast.lora import attach, merged_copy
from ap_erase_fast.lora_formats import COMFYUI_WEIGHTS, fuse_lora, original_layout_state_dict, original_module_table
from ap_erase_fast.models import load_components
from ap_erase_fast.models.flow_single_file import convert_transformer

pytest.importorskip("peft")
FAMILY = {"tiny-sd3": "sd3", "tiny-flux": "flux"}
_BASES: dict = {}


def _base(model):
    """The built-in model, loaded once per module and only read (never given adapters)."""
    if model not in _BASES:
        _BASES[model] = load_components(model)
    return _BASES[model]


def comfy_merge(base: dict, lora: dict) -> dict:
    """ComfyUI's reading of a kohya LoRA onto original-layout weights ``base`` (names without
    ``diffusion_model.``); every key of ``lora`` must be used (ComfyUI warns "lora key not
    loaded" otherwise)."""
    out, used = dict(base), set()
    for key, weight in base.items():
        if not key.endswith(".weight"):
            continue
        name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
        if f"{name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        alpha = lora.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        out[key] = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        used |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
    assert used == set(lora), sorted(set(lora) - used)[:3]
    return out


def _update_error(got: dict, want: dict, base: dict) -> tuple[float, float]:
    """(max |got − want|, max |want − base|) over the tensors: the error against the update."""
    err = max(float((got[k] - want[k]).abs().max()) for k in want)
    moved = max(float((want[k] - base[k]).abs().max()) for k in want)
    return err, moved


def _velocity(bb, transformer, seed=3):
    g = torch.Generator().manual_seed(seed)
    _, c, h, w = bb.latent_shape(None)
    states, pooled = bb.cond_shapes()
    cond = Cond((torch.randn(2, *states, generator=g), torch.randn(2, *pooled, generator=g)))
    with torch.no_grad():
        return bb.velocity(transformer, torch.randn(2, c, h, w, generator=g), torch.tensor([0.9, 0.3]), cond)


def _random_lora(model, targets, rank=3, alpha=6.0):
    """A fresh model with adapters on ``targets`` whose A and B are both random (so every part
    of a fused module moves the weights)."""
    comps = load_components(model)
    trained = attach(comps.unet, targets, rank, alpha, seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in trained:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return comps


def _check_comfy_reading(model, denoiser, lora, tmp_name="lora.safetensors"):
    """ComfyUI's rule on the original-layout base, back through diffusers' converter, equals the
    merged θ′ (weights: the update to 1e-5; outputs to 1e-5)."""
    family = FAMILY[model]
    base = _base(model).unet
    merged_original = comfy_merge(original_transformer(family, base.state_dict()), lora)
    _, read = convert_transformer(family, merged_original, tmp_name)
    want = merged_copy(denoiser)
    err, moved = _update_error(read.state_dict(), want.state_dict(), base.state_dict())
    assert moved > 1e-3 and err <= 1e-5 * moved, (err, moved)
    bb = make_backbone(_base(model), "cpu", 6)
    v_want = _velocity(bb, want)
    rel = float((_velocity(bb, read) - v_want).abs().max() / v_want.abs().max())
    assert rel < 1e-5, rel


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_run_writes_the_comfyui_lora_and_comfyui_reads_theta_prime(tiny_cfg, tmp_path, model):
    """A LoRA run with --train-method full (adapters on every linear/conv layer: fused q/k/v and
    FLUX's q/k/v/MLP, SD3's context qkv of the last block, the embedders, the swapped final
    norms, SD3's patch-embedding convolution) written by write_outputs: lora_comfyui.safetensors
    holds only kohya keys on original modules, and read as ComfyUI reads it it is the merged
    θ′. Mutations checked by hand (each fails here): the last part of a fused module left out
    of up (a zero block); q and k placed in each other's rows; alpha = one part's rank instead
    of the fused down rank (off by 3 and 4 on the fused modules); the run's alpha in .alpha with
    B unscaled (kohya's usual convention, wrong for a fused rank); A/B swapped; the (shift,
    scale) swap of the final norm not applied (FLUX), of SD3's last context norm not applied
    (SD3); the export hook removed (no file)."""
    cfg = tiny_cfg(model=model, train_method="full", lora_rank=2, lora_alpha=6.0, lr=5e-2, steps=2,
                   mixed_precision="no", ddim_steps=6, k_closest=40, num_centers=8, max_sequence_length=8)
    er = Eraser(cfg).setup()
    er.train()
    folder = tmp_path / "out"
    folder.mkdir()
    write_outputs(folder, er.unet, er.trained_state(), er.run_info(), er.log, er.backbone.pipeline_class())
    lora = load_file(str(folder / COMFYUI_WEIGHTS))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert all(float(lora[k]) == lora[k.replace(".alpha", ".lora_down.weight")].shape[0] for k in lora
               if k.endswith(".alpha"))
    fused = "lora_unet_double_blocks_0_img_attn_qkv" if model == "tiny-flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert lora[f"{fused}.lora_down.weight"].shape[0] == 3 * 2  # q, k, v: rank 2 each
    _check_comfy_reading(model, er.unet, lora)


@pytest.mark.parametrize("model,method", [("tiny-flux", "xattn"), ("tiny-flux", "xattn_kv"), ("tiny-flux", "noxattn"),
                                          ("tiny-sd3", "xattn_kv"), ("tiny-sd3", "noxattn")])
def test_partial_fused_modules_read_exactly(model, method):
    """Train methods that adapt only some parts of a fused module (FLUX xattn: linear1's q, k, v
    without the MLP; xattn_kv: k and v of the text stream's qkv, not q; noxattn: linear1's MLP
    part alone): the missing parts are zero rows of up and the reading is still θ′ exactly
    (random A and B). Mutations checked: part offsets counted only over adapted parts (the rows
    of k land in q's place: xattn_kv fails); the last present part left out of up (fails)."""
    comps = _random_lora(model, make_backbone(_base(model), "cpu", 6).lora_targets(method))
    _check_comfy_reading(model, comps.unet, original_layout_state_dict(comps.unet))


def test_diffusers_loads_the_comfyui_file_into_tiny_flux(tmp_path):
    """diffusers' own kohya FLUX reader (FluxPipeline.load_lora_weights) on the file, into a
    fresh tiny-flux: the fused transformer's update and its outputs are θ′'s. The modules are the
    ones diffusers 0.42 reads at tiny width: its converter splits linear1 at FLUX.1's 3072
    (asserts otherwise) and drops the top-level modules (img_in, txt_in, time_in, vector_in,
    guidance_in, final_layer: it returns them without the ``transformer.`` prefix), so those are
    checked by the test below and by ComfyUI's rule above. Block 0's add_k_proj has no adapter
    (a fused txt qkv with a missing part).
    Mutations checked: .alpha = 6 (the random adapters' alpha) with B scaled (fails); q and k
    swapped in the FLUX img qkv (fails)."""
    from safetensors.torch import save_file

    skip = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    targets = [n for n, m in _base("tiny-flux").unet.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
               and not (n.startswith("single_transformer_blocks.") and n.endswith(skip))
               and n != "transformer_blocks.0.attn.add_k_proj"]
    comps = _random_lora("tiny-flux", targets)
    path = tmp_path / COMFYUI_WEIGHTS
    save_file(original_layout_state_dict(comps.unet), str(path))
    pipe = load_components("tiny-flux").to_pipeline()
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want = merged_copy(comps.unet)
    base = _base("tiny-flux").unet.state_dict()
    err, moved = _update_error(pipe.transformer.state_dict(), want.state_dict(), base)
    assert moved > 1e-2 and err <= 1e-5 * moved, (err, moved)
    bb = make_backbone(comps, "cpu", 6)
    v_want = _velocity(bb, want)
    assert float((_velocity(bb, pipe.transformer) - v_want).abs().max() / v_want.abs().max()) < 1e-5


def test_diffusers_reads_the_layout_at_flux_dev_width():
    """At FLUX.1-dev's own sizes (shipped config on the meta device: 3072 wide, linear1 3·3072 +
    12288 rows), adapters on every module kind of the first and last double and single blocks
    and on the top-level modules, one part of a fused linear1 without adapter: diffusers'
    ``FluxPipeline.lora_state_dict`` (its kohya converter) gives back every adapter's B·A
    (checked on random probe vectors; the top-level ones come back without the ``transformer.``
    prefix, see above). Mutation checked: .alpha = 6 with B scaled (fails)."""
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from ap_erase_fast.models import shipped

    with init_empty_weights():
        meta = FluxTransformer2DModel.from_config(shipped.load_config("flux.1-dev", "transformer"))
    shapes = {n: tuple(m.weight.shape) for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = ("transformer_blocks.0.", "transformer_blocks.18.", "single_transformer_blocks.0.",
              "single_transformer_blocks.37.")
    keep = [n for n in shapes if n.startswith(blocks) or not n.startswith(("transformer_blocks.",
                                                                           "single_transformer_blocks."))]
    g = torch.Generator().manual_seed(0)
    factors = {n: (torch.randn(2, shapes[n][1], generator=g), torch.randn(shapes[n][0], 2, generator=g))
               for n in keep if n != "single_transformer_blocks.37.attn.to_v"}
    state = fuse_lora(factors, original_module_table("flux", shapes), {n: s[0] for n, s in shapes.items()})
    read = FluxPipeline.lora_state_dict(dict(state))
    for name, (a, b) in factors.items():
        key = f"transformer.{name}" if f"transformer.{name}.lora_A.weight" in read else name
        x = torch.randn(a.shape[1], 2, generator=g)
        want = b @ (a @ x)
        got = read[f"{key}.lora_B.weight"] @ (read[f"{key}.lora_A.weight"] @ x)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, name
