"""SDXL through the backbone layer: the built-in tiny-sdxl model, loading (diffusers folders, SGM
single files), the conditioning against diffusers' own SDXL pipeline, the train-method rules on
the real SDXL UNet, and AP runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_definitions import COMBOS, first_step_erasure_outputs
from test_models import _openclip_state_dict, _unet_to_ldm, _vae_to_ldm

from ap_erase_fast.backbones import Cond, make_backbone
from ap_erase_fast.engine import Eraser
from ap_erase_fast.models import (
    TRAIN_METHODS,
    ModelLoadError,
    count_trainable,
    load_components,
    module_content_hash,
)


@pytest.fixture(scope="module")
def xl():
    return load_components("tiny-sdxl")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- tiny-sdxl


def test_tiny_sdxl_is_deterministic_sdxl_shaped_and_cached(xl):
    """Two builds give the same tensors, the caller's RNG is untouched, the parts are SDXL's and
    the cached folder loads back as the same SDXL model. Mutations checked: the UNet left with
    torch's initialisation (differs from the cached folder; the pinned hash fails too); no
    fork_rng around the build (the caller's RNG moves); tokenizer_2 padding with <|endoftext|>."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = load_components("tiny-sdxl")
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert module_content_hash(getattr(again, name)) == module_content_hash(getattr(xl, name))
    assert xl.family == "sdxl" and xl.random_weights and xl.model_id == "tiny-sdxl"
    assert xl.extra == {"force_zeros_for_empty_prompt": True}
    assert xl.unet.config.addition_embed_type == "text_time"
    assert type(xl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert xl.tokenizer.pad_token_id == 49407 and xl.tokenizer_2.pad_token_id == 0
    assert xl.default_resolution == 16 and type(xl.scheduler).__name__ == "DDIMScheduler"
    sched = xl.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, "epsilon")
    # the cached folder is a StableDiffusionXLPipeline folder that loads back as the same model
    with open(os.path.join(xl.pipeline_path, "model_index.json")) as fh:
        index = json.load(fh)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    folder = load_components(xl.pipeline_path)
    assert folder.family == "sdxl" and folder.content_hash == xl.content_hash
    assert module_content_hash(folder.text_encoder_2) == module_content_hash(xl.text_encoder_2)
    assert type(xl.to_pipeline()).__name__ == "StableDiffusionXLPipeline"


def test_tiny_sdxl_weights_are_pinned(xl):
    import diffusers

    if not diffusers.__version__.startswith("0.42."):
        pytest.skip("pinned for diffusers 0.42 parameter naming")
    assert xl.content_hash == "76c6ec262f53ab4e4bab41ea8c2de6378403fae1f84841c902f79448bfea8cd2"


# --------------------------------------------------------------------------- conditioning


def test_cond_flat_unflat_round_trip_with_two_parts():
    """Mutations checked: unflat reading the row back to front; flat without the second part."""
    states = torch.randn(3, 5, 4, generator=_gen(0))
    pooled = torch.randn(3, 6, generator=_gen(1), requires_grad=True)
    cond = Cond((states, pooled))
    rows = cond.flat()
    assert rows.shape == (3, 5 * 4 + 6)
    back = Cond.unflat(rows, cond.shapes())
    assert all(torch.equal(a, b) for a, b in zip(back.parts, cond.parts))
    assert torch.equal(rows[1], torch.cat([states[1].flatten(), pooled[1]]))
    back.parts[1].sum().backward()  # differentiable through both
    assert torch.equal(pooled.grad, torch.ones_like(pooled))
    with pytest.raises(ValueError):
        Cond.unflat(rows[:, 1:], cond.shapes())


@pytest.mark.parametrize("force_zeros", [True, False])
def test_encode_matches_diffusers_sdxl_encode_prompt(xl, force_zeros):
    """States, pooled vector and the unconditional ("") conditioning equal what diffusers'
    StableDiffusionXLPipeline.encode_prompt computes (with force_zeros_for_empty_prompt as
    the model says). Mutations checked: the last hidden state instead of the penultimate; the
    pooled vector from the first encoder's pooler output; the encoders' states in the other
    order; "" encoded as text while force_zeros is on."""
    xl.extra["force_zeros_for_empty_prompt"] = force_zeros
    try:
        pipe = xl.to_pipeline()
        backbone = make_backbone(xl, "cpu", 10)
        prompts = ["a photo of a garbage truck", "Van Gogh, starry night!!"]
        pe, ne, pp, npool = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
        ours = backbone.encode(prompts)
        torch.testing.assert_close(ours.parts[0], pe, rtol=0, atol=0)
        torch.testing.assert_close(ours.parts[1], pp, rtol=0, atol=0)
        null = backbone.encode(["", ""])  # the pipeline's batch: same kernels, exact equality
        torch.testing.assert_close(null.parts[0], ne, rtol=0, atol=0)
        torch.testing.assert_close(null.parts[1], npool, rtol=0, atol=0)
        assert (float(null.parts[0].abs().sum()) == 0.0) == force_zeros
        mixed = backbone.encode(["", prompts[0]], batch_size=1)  # batching changes nothing
        torch.testing.assert_close(mixed.parts[0][1], ours.parts[0][0])
        torch.testing.assert_close(mixed[0].flat(), null[0].flat())
        assert backbone.encode([]).shapes() == ours.shapes() == ((77, 64), (32,))
    finally:
        xl.extra["force_zeros_for_empty_prompt"] = True


def test_predict_passes_pooled_and_time_ids_as_the_sdxl_pipeline(xl):
    """predict = the UNet called as StableDiffusionXLPipeline calls it: its prompt embeddings,
    its pooled embeddings and its add_time_ids for the latents' pixel size (non-square here).
    Mutations checked: time ids (W, H, …) instead of (H, W, …); crop (H, W) instead of (0, 0);
    the pooled vector dropped (zeros); time ids of the model's default resolution."""
    pipe = xl.to_pipeline()
    backbone = make_backbone(xl, "cpu", 10)
    x = torch.randn(2, 4, 8, 12, generator=_gen(2))
    t = torch.tensor([10, 700])
    h, w = 8 * 2, 12 * 2  # tiny-sdxl's VAE factor is 2
    pe, _, pp, _ = pipe.encode_prompt(["a cat", "a dog"], device="cpu", do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pe.dtype,
                                 text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        ref = xl.unet(x, t, encoder_hidden_states=pe,
                      added_cond_kwargs={"text_embeds": pp, "time_ids": ids.repeat(2, 1)}).sample
        ours = backbone.predict(xl.unet, x, t, backbone.encode(["a cat", "a dog"]))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.equal(backbone.time_ids(x), torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32))


# --------------------------------------------------------------------------- train methods


def test_parameter_counts_sdxl_on_meta():
    """The train-method rules on the real SDXL base UNet (shipped config, meta device).
    Mutations checked: add_embedding trained under noxattn (+5,245,440)."""
    from diffusers import UNet2DConditionModel

    from ap_erase_fast.models import shipped

    with torch.device("meta"):  # built once; count_trainable("sdxl", m) builds one per call
        unet = UNet2DConditionModel.from_config(shipped.load_config("sdxl", "unet"))
    counts = {m: count_trainable(unet, m) for m in TRAIN_METHODS}
    assert counts["full"] == count_trainable("sdxl", "full") == 2_567_463_684
    assert counts["xattn"] == 545_670_400
    assert counts["noxattn"] == 2_014_485_120
    add_embedding = 2816 * 1280 + 1280 + 1280 * 1280 + 1280
    time_and_out = (320 * 1280 + 1280 + 1280 * 1280 + 1280) + 2 * 320 + (320 * 4 * 9 + 4)
    assert counts["noxattn"] == counts["full"] - counts["xattn"] - add_embedding - time_and_out
    # to_k and to_v (2048 → width, no bias) of every transformer block: 2 blocks per attention
    # at width 640, 10 at 1280 (2 down + 3 up attentions per level), 10 in the middle
    assert counts["xattn_kv"] == 2 * 2048 * (640 * 2 * 5 + 1280 * 10 * 5 + 1280 * 10) == 340_787_200
    assert 0 < counts["selfattn"] < counts["noxattn"]


def test_train_methods_on_tiny_sdxl_names(xl):
    backbone = make_backbone(xl, "cpu", 10)
    names = [n for n, _ in xl.unet.named_parameters()]
    assert any(n.startswith("add_embedding.") for n in names)
    assert not any(backbone.is_trained(n, "noxattn") for n in names
                   if n.startswith(("add_embedding.", "time_embedding.", "conv_out.", "conv_norm_out.")))
    assert all(("attn2" in n) == backbone.is_trained(n, "xattn") for n in names)
    assert any(".transformer_blocks.1.attn2." in n for n in names)  # 2 blocks per attention
    assert all(backbone.is_trained(n, "full") for n in names)


# --------------------------------------------------------------------------- loading


def _unet_to_sgm(name: str, cfg) -> str:
    """diffusers SDXL UNet name → SGM name (the CompVis mapping plus the added-conditioning MLP)."""
    if name.startswith("add_embedding."):
        layer, param = name.split(".")[1:]
        return {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[layer] + "." + param
    return _unet_to_ldm(name, cfg)


def sgm_state_dict(comps) -> dict:
    """An SGM-layout (Stability's SDXL) checkpoint of SDXL components: UNet, CLIP ViT-L under
    conditioner.embedders.0.transformer, OpenCLIP under conditioner.embedders.1.model, VAE."""
    out = {"model.diffusion_model." + _unet_to_sgm(k, comps.unet.config): v.clone()
           for k, v in comps.unet.state_dict().items()}
    for k, v in comps.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["conditioner.embedders.0.transformer." + k] = v.clone()
    te2 = _openclip_state_dict(comps.text_encoder_2, extra_layer=False)
    te2["cond_stage_model.model.text_projection"] = comps.text_encoder_2.text_projection.weight.T.contiguous()
    out.update({"conditioner.embedders.1.model." + k[len("cond_stage_model.model."):]: v
                for k, v in te2.items()})
    n = len(comps.vae.config.block_out_channels)
    for k, v in comps.vae.state_dict().items():
        key = "first_stage_model." + _vae_to_ldm(k, n)
        if ".mid.attn_1." in key and key.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out[key] = v.clone()
    return out


def _same_model(a, b):
    """Same tensors in every module, same conditioning and same UNet outputs."""
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ba, bb = make_backbone(a, "cpu", 10), make_backbone(b, "cpu", 10)
    prompts = ["a garbage truck", "", "church"]
    ca, cb = ba.encode(prompts), bb.encode(prompts)
    assert all(torch.equal(p, q) for p, q in zip(ca.parts, cb.parts))
    x, t = torch.randn(3, 4, 8, 8, generator=_gen(3)), torch.tensor([1, 400, 900])
    with torch.no_grad():
        assert torch.equal(ba.predict(a.unet, x, t, ca), bb.predict(b.unet, x, t, cb))


def test_sdxl_diffusers_folder_loads_as_sdxl(xl, tmp_path):
    """A diffusers SDXL folder as SDXL base ships it (Euler scheduler, both tokenizers) loads
    as the same model; force_zeros_for_empty_prompt comes from model_index.json. Mutations
    checked: the flag read as always true; tokenizer_2 loaded from tokenizer/."""
    from diffusers import EulerDiscreteScheduler

    from ap_erase_fast.models import shipped

    pipe = xl.to_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(shipped.load_config("sdxl", "scheduler"))
    pipe.save_pretrained(str(tmp_path / "xl"), safe_serialization=True)
    comps = load_components(str(tmp_path / "xl"))
    assert comps.family == "sdxl" and comps.source["sd_version"] == "xl"
    assert comps.source["format"] == "diffusers" and comps.extra["force_zeros_for_empty_prompt"] is True
    assert type(comps.scheduler).__name__ == "DDIMScheduler"
    assert comps.tokenizer_2.pad_token_id == 0 and comps.tokenizer.pad_token_id == 49407
    _same_model(comps, xl)
    index = tmp_path / "xl" / "model_index.json"
    index.write_text(index.read_text().replace('"force_zeros_for_empty_prompt": true',
                                               '"force_zeros_for_empty_prompt": false'))
    plain = load_components(str(tmp_path / "xl"))
    assert plain.extra["force_zeros_for_empty_prompt"] is False
    null = make_backbone(plain, "cpu", 10).encode([""])
    assert float(null.parts[0].abs().sum()) > 0 and float(null.parts[1].abs().sum()) > 0


def test_sdxl_single_file_sgm_layout_loads(xl, tmp_path):
    """An SGM single file written from tiny-sdxl loads onto the shipped tiny-sdxl configs as
    the same model (tensors, conditioning, UNet outputs). Mutations checked: the second text
    encoder read with the SD2 prefix (no tensors found)."""
    from safetensors.torch import save_file

    path = tmp_path / "xl.safetensors"
    save_file(sgm_state_dict(xl), str(path))
    comps = load_components(str(path))
    assert comps.family == "sdxl" and comps.source["config"] == "tiny-sdxl"
    assert comps.source["format"] == "single_file" and comps.extra["force_zeros_for_empty_prompt"]
    assert comps.content_hash == xl.content_hash and comps.pipeline_path is None
    _same_model(comps, xl)
    assert type(comps.to_pipeline()).__name__ == "StableDiffusionXLPipeline"


def test_full_size_sgm_layout_converts_exactly_on_meta():
    """The SGM key set of the real SDXL base architecture (shipped configs) converts onto the
    shipped configs exactly: UNet names and shapes, and both text encoders."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ap_erase_fast.models import shipped
    from ap_erase_fast.models.single_file import (
        SDXL_OPENCLIP_PREFIX,
        shape_mismatch,
        _text_encoder,
    )

    ucfg = shipped.load_config("sdxl", "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ucfg)
        te1 = CLIPTextModel(CLIPTextConfig(**shipped.model_kwargs(shipped.load_config("sdxl", "text_encoder"))))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**shipped.model_kwargs(
            shipped.load_config("sdxl", "text_encoder_2"))))
    sgm = {"model.diffusion_model." + _unet_to_sgm(k, unet.config): v for k, v in unet.state_dict().items()}
    assert len(sgm) == len(unet.state_dict()) == 1680
    assert "model.diffusion_model.label_emb.0.2.weight" in sgm
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in sgm
    assert shape_mismatch(convert_ldm_unet_checkpoint(sgm, ucfg), unet) is None
    state = {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
             for k, v in te1.state_dict().items()}
    assert te2.config.num_hidden_layers == 32  # all of bigG's layers: SDXL reads the penultimate
    open_clip = _openclip_state_dict(te2, extra_layer=False)
    open_clip["cond_stage_model.model.text_projection"] = torch.empty(1280, 1280, device="meta")
    state.update({SDXL_OPENCLIP_PREFIX + k[len("cond_stage_model.model."):]: v for k, v in open_clip.items()})
    for component, family, ref in (("text_encoder", "clip", te1), ("text_encoder_2", "openclip", te2)):
        model = _text_encoder(state, family, "sdxl", "x", component, SDXL_OPENCLIP_PREFIX)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
            k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_unsupported_sdxl_variants_one_line_errors(xl, tmp_path):
    """A refiner-type folder (no text_encoder/), an SGM file without the OpenCLIP embedder and
    an SDXL UNet whose added conditioning does not fit its text encoders are refused, each with
    its own message. Mutations checked: the refiner check removed (the generic missing-folder
    message does not match)."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "only_te2"
    shutil.copytree(xl.pipeline_path, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelLoadError, match="refiner-type model") as info:
        load_components(str(folder))
    assert "\n" not in str(info.value)
    state = {k: v for k, v in sgm_state_dict(xl).items() if not k.startswith("conditioner.embedders.1.")}
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(ModelLoadError, match="without SDXL base's two text encoders"):
        load_components(str(tmp_path / "half.safetensors"))
    from types import SimpleNamespace as NS

    from ap_erase_fast.models.loading import check_sdxl_widths

    def parts(width_2, projection, added):
        unet = NS(config=NS(cross_attention_dim=64, addition_time_embed_dim=8,
                            projection_class_embeddings_input_dim=added))
        return {"unet": unet, "text_encoder": NS(config=NS(hidden_size=32)),
                "text_encoder_2": NS(config=NS(hidden_size=width_2, projection_dim=projection))}

    check_sdxl_widths(parts(32, 32, 80), "m")
    with pytest.raises(ModelLoadError, match="cross-attention dim 64"):
        check_sdxl_widths(parts(48, 32, 80), "m")
    with pytest.raises(ModelLoadError, match="refiner"):  # five time ids (aesthetic score)
        check_sdxl_widths(parts(32, 32, 72), "m")


# --------------------------------------------------------------------------- AP on tiny-sdxl


def _perturbed_sdxl():
    comp = load_components("tiny-sdxl")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in comp.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return comp


# every profile and schedule, each low-precision dtype once (tests/test_definitions.py runs them
# all on tiny; what differs on SDXL is the backbone, which every combination calls alike)
SDXL_COMBOS = [c for c in COMBOS if c in (("reference", "faithful", "no"), ("fast", "faithful", "no"),
                                          ("fast", "faithful", "bf16"), ("fast", "shared", "fp16"))]


@pytest.mark.parametrize("combo", SDXL_COMBOS, ids=["-".join(c) for c in SDXL_COMBOS])
def test_definitions_hold_on_tiny_sdxl(tiny_cfg, combo):
    """tests/test_definitions.py's first-step checks on tiny-sdxl (UNet perturbed so no norm
    weight is exact in bf16/fp16): with one sample, θ = θ′₀ makes the first preservation term
    exactly 0; the erasure term is w(t)·(1+η)²·mse(ε_θ(z,c_e), ε_θ(z,"")) with "" = SDXL's
    zero conditioning and ᾱ from the scheduler's own table; drawn words are members of R.
    Mutations checked: every frozen tensor kept in the compute dtype, norms included (bf16
    fails); time ids built from the batch dimension (θ and θ′ see batches of different sizes:
    the preservation term is not 0); "" encoded as text; Cond.cat taking the first prompt's
    pooled vector for the whole batch."""
    profile, schedule, mp = combo
    eta = 1.5
    cfg = tiny_cfg(model="tiny-sdxl", profile=profile, schedule=schedule, mixed_precision=mp,
                   train_method="noxattn", negative_guidance=eta, erase=["garbage truck", "church"])
    er = Eraser(cfg, components=_perturbed_sdxl()).setup()
    assert float(er.models.null.flat().abs().sum()) == 0.0  # force_zeros_for_empty_prompt
    records, e_c, e_0 = first_step_erasure_outputs(er, mp)
    first = records[0]
    steps = er.cfg.ddim_steps
    a = float(er.components.scheduler.alphas_cumprod[(1000 // steps) * first["t_enc"] + 1])
    expected = (1 - a) / a * (1 + eta) ** 2 * F.mse_loss(e_c, e_0).item()
    assert first["loss_erase"] == pytest.approx(expected, rel=1e-5 if mp == "no" else 2e-3)
    for rec in records + er.run_outer_step():
        lo = (1000 // steps) * rec["t_enc"]
        for s in rec["samples"]:
            assert s["adv_word"] in er.search.sets[er.cfg.erase.index(s["concept"])].words
            assert lo <= s["t_ddpm"] < lo + 1000 // steps


def test_fast_profile_is_the_reference_computation_on_tiny_sdxl(tiny_cfg):
    """fp32 + classic attention: the fast profile reproduces the reference's draws, loss log
    and updates on tiny-sdxl (tests/test_engine.py's tolerances; measured: θ 2.4e-4, π 1.0e-5).
    noxattn only: under xattn the second search step's loss is ~3e-11 on this model, its π
    gradient sits near Adam's eps, and Adam turns the batching-order rounding of that gradient
    (0.5 % of a 3e-11 loss) into a π update difference of 1.0e-4, above PI_TOL, while θ agrees
    to 9e-5. Mutations checked (fast path): the θ′ backward of 2·loss; the π search gradient
    negated."""
    from test_engine import assert_fast_equals_reference

    assert_fast_equals_reference(lambda **kw: tiny_cfg(model="tiny-sdxl", **kw), "noxattn")


def test_bf16_shared_schedule_runs_on_tiny_sdxl(tiny_cfg):
    """The Python API with bf16 and the shared schedule: every trained tensor moves, losses are
    finite."""
    from ap_erase_fast import erase

    base = load_components("tiny-sdxl").unet.state_dict()
    result = erase(tiny_cfg(model="tiny-sdxl", mixed_precision="bf16", schedule="shared"), write=False)
    assert result.run_info["backbone"]["family"] == "sdxl"
    assert result.run_info["compute_dtype"] == "bfloat16"
    assert [r["kind"] for r in result.log] == ["shared", "shared"]
    assert all(not torch.equal(v, base[n]) for n, v in result.trained.items())
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in result.log)


def test_cli_train_tiny_sdxl_end_to_end(tmp_path, small_vocab):
    """ap-erase train --model tiny-sdxl as a user runs it (subprocess, fast profile); the output
    UNet drops into the model's StableDiffusionXLPipeline and generates. Mutations checked:
    make_backbone giving SDXL components the SD backbone."""
    out = tmp_path / "erased"
    proc = subprocess.run(
        [sys.executable, "-m", "ap_erase_fast", "train", "--model", "tiny-sdxl", "--erase",
         "garbage truck", "--steps", "2", "--vocab", small_vocab, "--k-closest", "60",
         "--num-centers", "12", "--ddim-steps", "10", "--output", str(out)],
        check=False, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"output: {out}" in proc.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["backbone"] == {"family": "sdxl", "prediction_type": "epsilon", "empty_prompt": "zeros",
                                "time_ids": "original = target = run resolution, crop (0, 0)"}
    assert info["model"]["id"] == "tiny-sdxl" and info["latent_shape"] == [1, 4, 8, 8]
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    base = load_components("tiny-sdxl")
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))]
    assert changed and all("attn2" in n for n in changed)
    pipe = StableDiffusionXLPipeline.from_pretrained(base.pipeline_path, unet=unet)
    image = pipe("a garbage truck", num_inference_steps=2, height=16, width=16,
                 generator=_gen(0), output_type="np").images[0]
    assert image.shape == (16, 16, 3) and float(image.std()) > 0

    # ap-erase eval on the SDXL run: ε-space through the SDXL backbone, images through
    # StableDiffusionXLPipeline, the card updated
    from ap_erase_fast.eval import EvalConfig, evaluate

    rep = evaluate(EvalConfig(run=str(out), eps_seeds=1, eps_timesteps=2, eps_ddim_steps=10,
                              steps=2, batch_size=4, quiet=True, device="cpu"))
    e = rep["eps_space"]["erasure"]["garbage truck"]
    assert e["shift"] > 0 and e["gap_base"] > 0
    assert rep["images"] is not None
    assert "gap (erased)" in (out / "README.md").read_text()


def test_bench_sdxl_preset_builds_an_sdxl_run(monkeypatch):
    """The sdxl step-benchmark preset builds SDXL components the engine runs (configs swapped
    for tiny-sdxl's here: the real architecture is for a GPU). Mutations checked: the preset's
    components without family="sdxl"."""
    from ap_erase_fast import EraseConfig
    from ap_erase_fast.bench import sdxl_components
    from ap_erase_fast.models import shipped

    real = shipped.load_config
    monkeypatch.setattr(shipped, "load_config",
                        lambda v, c: real("tiny-sdxl" if v == "sdxl" else v, c))
    comps = sdxl_components(torch.device("cpu"))
    assert comps.family == "sdxl" and comps.default_resolution == 64
    cfg = EraseConfig(erase=["garbage truck"], steps=1, quiet=True, device="cpu", ddim_steps=4,
                      preserve_set=["church", "cat"], train_method="xattn")
    er = Eraser(cfg, progress=False, components=comps).setup()
    assert er.latent_shape == (1, 4, 8, 8) and er.run_outer_step()


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_lora_outputs_load_into_the_sdxl_pipeline_and_reproduce_theta_prime(tiny_cfg, tmp_path, method):
    """A tiny-sdxl LoRA run's outputs in StableDiffusionXLPipeline: the run folder itself and
    lora/ through pipe.load_lora_weights(folder), lora_kohya.safetensors through the single-file
    loader, and the merged unet/ all give θ′'s outputs (the UNet called with SDXL's pooled
    embeddings and time ids). Mutations checked: no pytorch_lora_weights.safetensors at the top
    of the run folder (diffusers takes trained.safetensors, loads nothing and the run folder
    gives θ's outputs); the alpha/rank scale not folded into the diffusers file."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from ap_erase_fast.export import write_outputs

    cfg = tiny_cfg(model="tiny-sdxl", steps=2, lora_rank=4, lora_alpha=8.0, train_method=method,
                   lr=5e-2, merge=True, mixed_precision="no")
    er = Eraser(cfg).setup()
    er.train()
    folder = tmp_path / "run"
    folder.mkdir()
    write_outputs(folder, er.unet, er.trained_state(), er.run_info(), er.log,
                  er.backbone.pipeline_class())
    x = torch.randn(2, 4, 8, 8, generator=_gen(3))
    t = torch.tensor([900, 300])
    cond = er.models.concepts[0].expand(2)
    with torch.no_grad():
        want = er.backbone.predict(er.unet, x, t, cond)
        base_out = er.models.query("frozen", "check", x, t, cond)
    assert (want - base_out).abs().max() > 1e-4  # the LoRA changes the output

    def check(unet, what):
        with torch.no_grad():
            got = er.backbone.predict(unet, x, t, cond)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, (what, err)

    for source in (folder, folder / "lora", folder / "lora_kohya.safetensors"):
        pipe = load_components("tiny-sdxl").to_pipeline()
        assert isinstance(pipe, StableDiffusionXLPipeline)
        pipe.load_lora_weights(str(source))
        check(pipe.unet, source.name)
    check(UNet2DConditionModel.from_pretrained(str(folder / "unet")), "merged")
