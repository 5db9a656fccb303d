"""Single-file SD3.5 and FLUX.1 checkpoints (``models/flow_single_file.py``): files in Stability's
and Black Forest Labs' layouts are written here from the built-in tiny-sd3 / tiny-flux by an
inverse mapping written for this test (diffusers names → original names, fused q/k/v, the
final norm's (shift, scale) order), and must load back as exactly the same modules; a diffusers
folder supplies what the file lacks; every bad input is one line."""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_models import _vae_to_ldm

from ap_erase_fast.models import ModelLoadError, load_components, module_content_hash

MODELS = ("tiny-sd3", "tiny-flux")
P = "model.diffusion_model."


# --------------------------------------------------------------------------- the inverse mapping


def _swap(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# original module <- diffusers modules whose outputs it stacks (weight and bias follow)
FLUX_TOP = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
            "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
            "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
            "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
            "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
            "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
            "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
            "final_layer.linear": ["proj_out"]}
FLUX_DOUBLE = {"img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
               "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
               "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
               "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
               "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"]}
FLUX_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                     "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                     "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                     "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
FLUX_SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
               "linear2": ["proj_out"]}
FLUX_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
SD3_TOP = {"x_embedder.proj": ["pos_embed.proj"], "context_embedder": ["context_embedder"],
           "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
           "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
           "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
           "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
           "final_layer.linear": ["proj_out"]}
SD3_BLOCK = {"x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
             "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
             "x_block.attn.proj": ["attn.to_out.0"], "context_block.attn.proj": ["attn.to_add_out"],
             "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"], "x_block.attn2.proj": ["attn2.to_out.0"],
             "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
             "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
             "x_block.adaLN_modulation.1": ["norm1.linear"]}
SD3_NORMS = {"x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
             "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
             "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
             "x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight"}


def original_transformer(family: str, sd: dict) -> dict:
    """A diffusers FLUX / SD3 transformer state dict in BFL's / Stability's original names
    (no prefix); every diffusers tensor is used exactly once."""
    out, used = {}, set()

    def put(dst, srcs, swap=False):
        for suffix in ("weight", "bias"):
            names = [f"{s}.{suffix}" for s in srcs]
            if all(n in sd for n in names):
                t = torch.cat([sd[n] for n in names], 0)
                out[f"{dst}.{suffix}"] = (_swap(t) if swap else t).contiguous()
                used.update(names)

    def copy(dst, src):
        if src in sd:
            out[dst] = sd[src].contiguous()
            used.add(src)

    def blocks(prefix):
        return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})

    top = FLUX_TOP if family == "flux" else SD3_TOP
    for dst, srcs in top.items():
        put(dst, srcs)
    put("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True)
    if family == "flux":
        for i in blocks("transformer_blocks."):
            for dst, srcs in FLUX_DOUBLE.items():
                put(f"double_blocks.{i}.{dst}", [f"transformer_blocks.{i}.{s}" for s in srcs])
            for dst, src in FLUX_DOUBLE_NORMS.items():
                copy(f"double_blocks.{i}.{dst}", f"transformer_blocks.{i}.{src}")
        for i in blocks("single_transformer_blocks."):
            for dst, srcs in FLUX_SINGLE.items():
                put(f"single_blocks.{i}.{dst}", [f"single_transformer_blocks.{i}.{s}" for s in srcs])
            for dst, src in FLUX_SINGLE_NORMS.items():
                copy(f"single_blocks.{i}.{dst}", f"single_transformer_blocks.{i}.{src}")
    else:
        copy("pos_embed", "pos_embed.pos_embed")
        ids = blocks("transformer_blocks.")
        for i in ids:
            for dst, srcs in SD3_BLOCK.items():
                put(f"joint_blocks.{i}.{dst}", [f"transformer_blocks.{i}.{s}" for s in srcs])
            put(f"joint_blocks.{i}.context_block.adaLN_modulation.1", [f"transformer_blocks.{i}.norm1_context.linear"],
                swap=i == ids[-1])  # the last block's context norm is AdaLayerNormContinuous
            for dst, src in SD3_NORMS.items():
                copy(f"joint_blocks.{i}.{dst}", f"transformer_blocks.{i}.{src}")
    assert used == set(sd), sorted(set(sd) - used)
    return out


def _clip(module, prefix):
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.contiguous()
            for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def original_file(comps, *, prefix=P, encoders=False, vae=False) -> dict:
    """The tensors of a single file of ``comps`` in the original layout."""
    family = comps.family
    out = {prefix + k: v for k, v in original_transformer(family, comps.unet.state_dict()).items()}
    if encoders:
        out.update(_clip(comps.text_encoder, "text_encoders.clip_l.transformer."))
        t5 = comps.text_encoder_3 if family == "sd3" else comps.text_encoder_2
        if family == "sd3":
            out.update(_clip(comps.text_encoder_2, "text_encoders.clip_g.transformer."))
        out.update({"text_encoders.t5xxl.transformer." + k: v.contiguous() for k, v in t5.state_dict().items()
                    if k != "encoder.embed_tokens.weight"})  # tied to shared.weight, stored once
    if vae:
        n = len(comps.vae.config.block_out_channels)
        out.update({"first_stage_model." + _vae_to_ldm(k, n): v.contiguous() for k, v in comps.vae.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def comps():
    return {m: load_components(m) for m in MODELS}


def _base_folder(comps, model, where, weights=True):
    """A copy of the built-in model's diffusers folder (without any weights when not ``weights``:
    configs, tokenizers and scheduler only) and without its transformer."""
    folder = where / f"{model}-base"
    if not folder.exists():
        shutil.copytree(comps[model].pipeline_path, folder)
        shutil.rmtree(folder / "transformer")
        if not weights:
            for f in glob.glob(str(folder / "*" / "*.safetensors")):
                os.remove(f)
    return folder


def _same(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sb:
        if k not in skip:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("prefix,colocated,dtype", [("", False, torch.bfloat16), (P, True, torch.float32)])
def test_flux_transformer_file_with_a_folder_loads_exactly(comps, tmp_path, prefix, colocated, dtype):
    """A BFL-layout FLUX file (with and without the model.diffusion_model. prefix; bf16 as FLUX
    ships, and fp32), completed by the folder it lies in or by model_folder: the transformer
    equals the built-in one tensor for tensor (bf16: its bf16 values, loaded as fp32; fp32: so
    its content hash too), the rest is the folder's; source records the file, its sha256, the
    config matched and the folder. Mutations checked: diffusers' converter called without the
    width padding (tiny-flux fails to convert); proj_mlp cut back to D rows instead of 4·D
    (shape mismatch); the folder beside the file not looked for (the co-located case fails);
    the file hash over its first 64 bytes."""
    c = comps["tiny-flux"]
    folder = _base_folder(comps, "tiny-flux", tmp_path)
    path = (folder if colocated else tmp_path) / "flux1-tiny.safetensors"
    save_file({k: v.to(dtype) for k, v in original_file(c, prefix=prefix).items()}, str(path))
    got = load_components(str(path), model_folder=None if colocated else str(folder))
    assert got.family == "flux"
    want = copy.deepcopy(c.unet).to(dtype).to(torch.float32)
    _same(got.unet, want)
    assert got.content_hash == module_content_hash(want)
    assert (got.content_hash == c.content_hash) == (dtype == torch.float32)
    _same(got.text_encoder, c.text_encoder)
    _same(got.text_encoder_2, c.text_encoder_2)
    src = got.source
    assert src["format"] == "single_file" and src["path"] == str(path) and src["config"] == "tiny-flux"
    assert src["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src["folder"] == str(folder) and src["from_file"] == ["transformer"] and src["guidance_embeds"]
    assert got.pipeline_path is None and not got.random_weights


def test_flux_schnell_file_has_no_guidance_embedder(comps, tmp_path):
    """Without guidance_in the file is FLUX.1-schnell-shaped: the transformer is built without
    the guidance embedder and holds every other tensor unchanged. Mutation checked: the
    guidance embedder always configured (the file then lacks its tensors: fails)."""
    c = comps["tiny-flux"]
    folder = _base_folder(comps, "tiny-flux", tmp_path)
    state = {k: v for k, v in original_file(c, prefix="").items() if not k.startswith("guidance_in.")}
    save_file(state, str(folder / "schnell.safetensors"))
    got = load_components(str(folder / "schnell.safetensors"))
    assert not got.unet.config.guidance_embeds and not got.source["guidance_embeds"]
    want = {k: v for k, v in c.unet.state_dict().items() if ".guidance_embedder." not in k}
    assert set(got.unet.state_dict()) == set(want)
    assert all(torch.equal(got.unet.state_dict()[k], v) for k, v in want.items())


def test_sd3_file_with_encoders_and_vae_on_a_configs_only_folder(comps, tmp_path):
    """An SD3.5-layout file holding the MMDiT, CLIP-L, CLIP-G, T5 and the VAE, completed by a
    folder without any weights (configs, tokenizers, scheduler): every module equals the
    built-in one, except CLIP-L's projection, the identity (SD3 uses CLIP-L's pooled output
    unprojected; diffusers' own single-file rule). A file of the MMDiT alone takes the folder's
    encoders and VAE. Mutations checked: the identity projection left out (CLIP-L differs);
    T5's token embedding stored once not given to both tied names (the file "lacks" one); the
    folder loader ignoring the file's text encoders, or its VAE (the configs-only folder has no
    weights for them: fails)."""
    c = comps["tiny-sd3"]
    bare = _base_folder(comps, "tiny-sd3", tmp_path, weights=False)
    path = bare / "sd3.5_tiny.safetensors"
    save_file(original_file(c, encoders=True, vae=True), str(path))
    got = load_components(str(path))
    assert got.source["from_file"] == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    for name in ("unet", "text_encoder_2", "text_encoder_3", "vae"):
        _same(getattr(got, name), getattr(c, name))
    _same(got.text_encoder, c.text_encoder, skip={"text_projection.weight"})
    assert torch.equal(got.text_encoder.text_projection.weight, torch.eye(32))
    t5 = got.text_encoder_3
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()

    full = _base_folder(comps, "tiny-sd3", tmp_path / "full")
    alone = tmp_path / "mmdit.safetensors"
    save_file(original_file(c), str(alone))
    got = load_components(str(alone), model_folder=str(full))
    assert got.source["from_file"] == ["transformer"] and got.source["config"] == "tiny-sd3"
    for name in ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        _same(getattr(got, name), getattr(c, name))


def test_train_on_a_flux_single_file_and_load_the_card(comps, tmp_path, small_vocab):
    """ap-erase train --model <file> --model-folder <base folder> (the folder completes it)
    with a LoRA and --merge: run.json names the single file, its sha256 and the base
    transformer's content hash (the built-in model's: same weights, same identity); the
    ComfyUI file is written; the card's code loads the base as the run did and its LoRA gives
    the merged transformer. Mutation checked: the card's flow-file branch removed (the card
    then calls FluxPipeline.from_single_file: the exec fails)."""
    from ap_erase_fast.cli import main

    c = comps["tiny-flux"]
    folder = _base_folder(comps, "tiny-flux", tmp_path)
    (tmp_path / "downloads").mkdir()
    path = tmp_path / "downloads" / "flux1-tiny.safetensors"  # not beside the folder: --model-folder
    save_file(original_file(c), str(path))
    out = tmp_path / "run"
    code = main(["train", "--model", str(path), "--model-folder", str(folder), "--erase", "garbage truck", "--steps", "2", "--vocab", small_vocab,
                 "--k-closest", "40", "--num-centers", "8", "--ddim-steps", "6", "--max-sequence-length", "8",
                 "--lora-rank", "2", "--merge", "--quiet", "--output", str(out)])
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["sha256"] == c.content_hash
    assert info["model"]["source"]["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (out / "lora_comfyui.safetensors").is_file()
    card = (out / "README.md").read_text()
    code_block = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "model_folder=" in code_block
    scope: dict = {}
    exec(compile(code_block.replace("<this folder>", str(out)), "card", "exec"), scope)  # noqa: S102
    pipe = scope["pipe"]
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    from diffusers import FluxTransformer2DModel

    merged = FluxTransformer2DModel.from_pretrained(str(out / "unet")).state_dict()
    base = c.unet.state_dict()
    got = {k: v for k, v in pipe.transformer.state_dict().items() if "lora" not in k}
    moved = max(float((merged[k] - base[k]).abs().max()) for k in merged)
    assert moved > 0
    err = max(float((got[k] - merged[k]).abs().max()) for k in merged)
    assert err <= 1e-5 * moved, (err, moved)


# --------------------------------------------------------------------------- errors


def _one_line(fn, match):
    with pytest.raises(ModelLoadError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_single_file_errors_are_one_line(comps, tmp_path):
    """Unknown layouts, a FLUX file with nothing to complete it, a truncated file, configs that
    do not fit, stray tensors, a folder of the other family, … each one line that says what to
    do. Mutations checked: the leftover-tensor check removed (the stray-tensor case loads);
    the family check of the folder removed (the SD3 folder is taken for FLUX and fails later,
    on another message); the block-count/width comparison removed (the reason names a tensor
    instead)."""
    from ap_erase_fast.models.flow_single_file import convert_transformer

    flux, sd3 = comps["tiny-flux"], comps["tiny-sd3"]
    state = original_file(flux, prefix="")
    lone = tmp_path / "lone"
    lone.mkdir()

    def write(name, tensors):
        path = lone / name
        save_file(tensors, str(path))
        return str(path)

    other = write("other.safetensors", {"foo": torch.zeros(2)})
    _one_line(lambda: load_components(other), "matches no supported single-file layout")
    named = write("diffusers.safetensors", {k: v.contiguous() for k, v in flux.unet.state_dict().items()})
    _one_line(lambda: load_components(named), "pass the pipeline folder instead")
    alone = write("flux.safetensors", state)
    msg = _one_line(lambda: load_components(alone), "model_folder")
    assert "no text encoders" in msg and "model_index.json" in msg
    sd3_alone = write("sd3.safetensors", original_file(sd3))
    _one_line(lambda: load_components(sd3_alone), "an SD3.5 transformer but no text encoders")
    truncated = lone / "truncated.safetensors"
    truncated.write_bytes((lone / "flux.safetensors").read_bytes()[:-64])
    _one_line(lambda: load_components(str(truncated)), "cannot read checkpoint")

    flux_folder = _base_folder(comps, "tiny-flux", tmp_path)
    sd3_folder = _base_folder(comps, "tiny-sd3", tmp_path)
    _one_line(lambda: load_components(alone, model_folder=str(sd3_folder)), "is an SD3.5 pipeline")
    _one_line(lambda: load_components(alone, model_folder=str(lone)), "no model_index.json")
    _one_line(lambda: load_components(alone, model_folder=str(tmp_path / "nowhere")), "does not exist")
    _one_line(lambda: load_components("tiny-flux", model_folder=str(flux_folder)), "is not a file")
    _one_line(lambda: load_components(alone, model_folder=str(flux_folder), single_file_weights="ema"),
              "no EMA weights")
    stray = write("stray.safetensors", {**state, "double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    _one_line(lambda: load_components(stray, model_folder=str(flux_folder)), "not part of a FLUX.1 transformer")
    lacking = write("lacking.safetensors", {k: v for k, v in state.items() if k != "img_in.weight"})
    _one_line(lambda: load_components(lacking, model_folder=str(flux_folder)), "incomplete or malformed")
    wide = dict(state)
    wide["txt_in.weight"] = torch.zeros(32, 80)  # a T5 width no shipped config has
    wide_path = write("wide.safetensors", wide)
    msg = _one_line(lambda: load_components(wide_path, model_folder=str(flux_folder)), "matches no shipped config")
    assert "flux.1-dev: the file has 1 double and 2 single blocks of width 32, the config 19 double" in msg
    assert "tiny-flux: context_embedder.weight has shape (32, 80), the config expects (32, 64)" in msg
    # the tiny weights against the real FLUX.1-dev config alone
    msg = _one_line(lambda: convert_transformer("flux", state, "tiny.safetensors", candidates=("flux.1-dev",)),
                    "matches no shipped config (flux.1-dev: the file has 1 double and 2 single blocks of width 32, "
                    "the config 19 double and 38 single blocks of width 3072)")
    no_cfg = _base_folder(comps, "tiny-sd3", tmp_path / "nocfg", weights=False)
    os.remove(no_cfg / "text_encoder_2" / "config.json")
    with_te = write("sd3_te.safetensors", original_file(sd3, encoders=True))
    _one_line(lambda: load_components(with_te, model_folder=str(no_cfg)), "text_encoder_2/config.json: no such file")


def test_file_hash_is_remembered_per_path_size_and_time(tmp_path, monkeypatch):
    """file_sha256 is the sha256 of the bytes, kept under the cache root and used again only
    while the file's path, size and modification time are unchanged. Mutations checked: the
    memo key without size and time (the rewritten file keeps its old hash); the memo read back
    wrongly (the second call differs)."""
    from ap_erase_fast.models.flow_single_file import file_sha256

    monkeypatch.setenv("AP_ERASE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(str(path))
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(list((tmp_path / "cache" / "file-sha256").iterdir())) == 1
    assert file_sha256(str(path)) == first
    path.write_bytes(b"b" * 1001)
    assert file_sha256(str(path)) == hashlib.sha256(b"b" * 1001).hexdigest()
