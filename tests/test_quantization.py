"""A quantized frozen base for LoRA (``--base-quantization int8|nf4``, ap_erase_fast/quantization.py)
and the other options that fit SD3/FLUX on a 24 GB card (text encoders released after encoding,
gradient checkpointing, 8-bit Adam states), on tiny-flux and tiny-sd3, on the CPU.

bitsandbytes 0.50.2 runs all of it on the CPU: int8 and NF4 quantization, the NF4 dequantization
(its bundled CPU library), and in training mode (the engine's) both layers dequantize the weight
and multiply in the input's dtype, forward and backward. So the CPU references here are exact:
the quantized model equals the float model with the dequantized weights.
"""
from __future__ import annotations

import gc
import json
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from _updates import relative_l2, run_updates
from test_definitions import first_step_erasure_outputs

from ap_erase_fast.backbones import make_backbone
from ap_erase_fast.conditioning import Cond
from ap_erase_fast.config import EraseConfig
from ap_erase_fast.engine import Eraser
from ap_erase_fast.errors import UserError
from ap_erase_fast.models import load_components

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
from ap_erase_fast.quantization import (dequantized_weight, linear_weight_bytes,  # noqa: E402
                                        quantize_base, quantized_bytes)

MODELS = ("tiny-flux", "tiny-sd3")
KINDS = ("int8", "nf4")


def _cfg(tiny_cfg, model, **kw):
    base = dict(model=model, lora_rank=4, max_sequence_length=8, ddim_steps=6, k_closest=40,
                num_centers=8, mixed_precision="no")
    base.update(kw)
    return tiny_cfg(**base)


def _inputs(bb, seed=3):
    """Fresh random transformer inputs (latents, σ, text states, pooled vector)."""
    g = torch.Generator().manual_seed(seed)
    _, c, h, w = bb.latent_shape(None)
    states, pooled = bb.cond_shapes()
    return (torch.randn(2, c, h, w, generator=g), torch.tensor([0.9, 0.3]),
            Cond((torch.randn(2, *states, generator=g), torch.randn(2, *pooled, generator=g))))


def _velocity(bb, module, inputs):
    x, sigma, cond = inputs
    with torch.no_grad():
        return bb.velocity(module, x, sigma, cond)


def _rel(got, want):
    return float((got - want).norm() / want.norm())


# --------------------------------------------------------------------------- the quantized base


@pytest.mark.parametrize("model", MODELS)
def test_quantized_base_against_float_references(model):
    """Quantizing replaces every nn.Linear (bias kept), in training mode (as the engine runs
    it) the quantized transformer equals the float transformer with the dequantized weights
    (fp32 rounding: 1e-5), and it is close to the original: measured relative L2 error on these
    random inputs, int8 0.004-0.006, NF4 0.10-0.13 (tiny models' uniform random weights suit
    NF4's normal-quantile code less than trained weights do). The bytes run.json reports are
    the quantized layers' own and match the memory model's formula (linear_weight_bytes).
    Mutations checked: NF4 without double quantization (the byte check), the bias zeroed (the
    error bound: 0.29), fp4 instead of nf4 (the error bound: tiny-flux 0.163)."""
    base = load_components(model)
    bb = make_backbone(base, "cpu", 6, max_sequence_length=8)
    inputs = _inputs(bb)
    want = _velocity(bb, base.unet, inputs)
    linears = {n: m for n, m in base.unet.named_modules() if type(m) is torch.nn.Linear}
    for kind, bound in (("int8", 0.01), ("nf4", 0.15)):
        q = load_components(model).unet
        info = quantize_base(q, kind, "cpu")
        q.train()
        layers = {n: m for n, m in q.named_modules() if n in linears}
        assert all(type(m) is (bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
                   for m in layers.values())
        assert not any(type(m) is torch.nn.Linear for m in q.modules())
        assert info["layers"] == len(linears) and info["weight_bytes"] == sum(
            quantized_bytes(m) for m in layers.values()) == sum(
            linear_weight_bytes(m.out_features, m.in_features, kind) for m in linears.values())
        got = _velocity(bb, q, inputs)
        err = _rel(got, want)
        assert 1e-4 < err < bound, (kind, err)
        ref = load_components(model).unet  # the float model of the dequantized weights
        with torch.no_grad():
            for n, m in ref.named_modules():
                if n in layers:
                    m.weight.copy_(dequantized_weight(layers[n]))
        assert _rel(got, _velocity(bb, ref, inputs)) < 1e-5, kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_first_preservation_term_is_zero_with_a_quantized_base(tiny_cfg, model, kind):
    """θ′₀ = θ with the quantized base: the first preservation term is exactly 0 (fp32), the
    erasure term is w·(1+η)²·mse(ε_θ(z,c_e), ε_θ(z,"")) (w = (1−ᾱ)/ᾱ of the step's timestep),
    and there is one copy of the base: every linear layer is quantized, θ has no frozen tensors
    and the adapters are the only parameters that require grad; int8 layers have no LLM.int8()
    outlier threshold (invisible in CPU numbers: bitsandbytes' CPU training path is weight-only).
    Mutations checked: B of the adapters drawn non-zero (preservation term 1.9e-5), the int8
    threshold 6 (the threshold check)."""
    eta = 1.5
    er = Eraser(_cfg(tiny_cfg, model, base_quantization=kind, train_method="noxattn",
                     negative_guidance=eta, erase=["garbage truck", "church"])).setup()
    assert er.frozen_tensors == {} and not hasattr(er, "frozen")
    assert not any(type(m) is torch.nn.Linear for n, m in er.unet.named_modules() if ".lora_" not in n)
    assert {n for n, p in er.unet.named_parameters() if p.requires_grad} == set(er.trained_names)
    # no LLM.int8() outlier columns: they are chosen over the batch (quantization.py)
    assert all(m.state.threshold == 0.0 for m in er.unet.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    records, e_c, e_0 = first_step_erasure_outputs(er, "no")
    first = records[0]
    a = float(er.tables.alphas_cumprod[(1000 // er.cfg.ddim_steps) * first["t_enc"] + 1])
    expected = (1 - a) / a * (1 + eta) ** 2 * F.mse_loss(e_c, e_0).item()
    assert first["loss_erase"] == pytest.approx(expected, rel=1e-5)


def test_first_preservation_term_with_nf4_in_bf16(tiny_cfg):
    """NF4 computed in bf16 (--mixed-precision bf16: the compute dtype of the layers, the
    adapters' fp32 masters): the first step's preservation term stays at rounding level (the
    bf16 bound of test_definitions), the quantized codes are not cast by the fast profile's
    bf16 storage of untrained weights. Mutation checked: the engine casting every parameter of a
    linear layer, codes included (the codes' dtype check)."""
    er = Eraser(_cfg(tiny_cfg, "tiny-flux", base_quantization="nf4", mixed_precision="bf16",
                     train_method="noxattn")).setup()
    assert er.quantization["compute_dtype"] == "bfloat16"
    codes = [m.weight for m in er.unet.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert codes and all(w.dtype == torch.uint8 for w in codes)
    first_step_erasure_outputs(er, "bf16")


@pytest.mark.parametrize("model", MODELS)
def test_lora_update_follows_the_float_base(tiny_cfg, model):
    """The LoRA update θ′ − θ₀ after one outer step on the quantized base against the float
    base's (same seed and draws; Adam's first step is close to lr·sign(g), so this compares
    gradient signs): int8 cos ≥ 0.99 (measured 0.996-0.997, relative L2 0.08-0.09), NF4 cos ≥ 0.7
    (measured 0.81-0.88, relative L2 0.49-0.61, tiny random weights), and the update norms agree
    within 10 %. Mutation checked: the int8 weights halved when quantized (cos 0.39)."""
    runs = {}
    for kind in ("none", *KINDS):
        d, _, _ = run_updates(_cfg(tiny_cfg, model, steps=1, lr=1e-2, train_method="xattn",
                                   base_quantization=kind))
        runs[kind] = d
    ref = torch.cat([v.flatten() for v in runs["none"].values()])
    for kind, floor in (("int8", 0.99), ("nf4", 0.7)):
        got = torch.cat([v.flatten() for v in runs[kind].values()])
        cos = float(F.cosine_similarity(got, ref, dim=0))
        assert cos >= floor, (kind, cos, relative_l2(runs[kind], runs["none"]))
        assert 0.9 < float(got.norm() / ref.norm()) < 1.1, kind


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("model,kind,layers", [("tiny-flux", "int8", 36), ("tiny-flux", "nf4", 36),
                                               ("tiny", "nf4", 50)])
def test_cli_train_with_a_quantized_base(tmp_path, small_vocab, model, kind, layers):
    """ap-erase train --model tiny-flux --lora-rank 4 --base-quantization KIND end to end (and
    the SD UNet of tiny: the same code): the run folder holds the LoRA (no unet/), run.json
    records the quantization (layers, bytes, bitsandbytes version) in base_quantization and
    config."""
    from ap_erase_fast.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", model, "--erase", "garbage truck", "--steps", "2",
                 "--lora-rank", "4", "--base-quantization", kind, "--vocab", small_vocab,
                 "--k-closest", "40", "--num-centers", "8", "--ddim-steps", "6", "--quiet",
                 "--output", str(out)] + (["--max-sequence-length", "8"] if model != "tiny" else []))
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    q = info["base_quantization"]
    assert info["config"]["base_quantization"] == kind and q["kind"] == kind
    assert q["layers"] == layers and q["bitsandbytes"] == bnb.__version__
    assert q["weight_bytes"] < q["weight_bytes_before"] / (3 if kind == "int8" else 4)
    names = {p.name for p in out.iterdir()}
    assert {"lora", "pytorch_lora_weights.safetensors", "trained.safetensors"} <= names
    assert "unet" not in names
    assert f"base model's {kind} copy" in (out / "README.md").read_text()  # the model card says so


def test_resume_with_a_quantized_base_is_bit_identical(tiny_cfg, tmp_path):
    """A checkpointed and resumed run on an NF4 base ends bit-identical to an uninterrupted one
    (the base is quantized again, identically, on resume; adapters, optimizer and π come from
    the checkpoint)."""
    from _updates import assert_resume_bit_identical

    assert_resume_bit_identical(lambda **kw: _cfg(tiny_cfg, "tiny-flux", **kw), tmp_path, at=1, steps=2,
                                base_quantization="nf4")


def test_tiny_sd3_with_every_24gb_option(tmp_path, small_vocab):
    """tiny-sd3 with the 24 GB recipe together: NF4 base, LoRA, gradient checkpointing, 8-bit
    AdamW; the loop runs and the adapters move."""
    from ap_erase_fast import erase

    r = erase(EraseConfig(model="tiny-sd3", erase=["garbage truck"], steps=2, lora_rank=4,
                          base_quantization="nf4", gradient_checkpointing=True,
                          optimizer="adamw8bit", vocab=small_vocab, k_closest=40, num_centers=8,
                          ddim_steps=6, max_sequence_length=8, quiet=True, device="cpu"),
              write=False)
    assert r.run_info["base_quantization"]["kind"] == "nf4"
    assert any(".lora_B." in n and v.abs().max() > 0 for n, v in r.trained.items())


def _one_error_line(capsys, argv, tmp_path):
    from ap_erase_fast.cli import main

    out = tmp_path / "never"
    code = main(argv + ["--output", str(out)])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if not ln.startswith(("note:", "warning:"))]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    return err[0]


def test_refusals_are_one_line(capsys, tmp_path, small_vocab, monkeypatch):
    """One 'error:' line, exit 2, nothing written: without --lora-rank; with --merge;
    (and with --deepspeed or --compile: validate refuses them); bitsandbytes missing; bitsandbytes without a working kernel on the device (the probe: here
    its matmuls made to raise as an unsupported backend does). Mutation checked: the probe
    removed (the unsupported kernel then fails inside the loop with a traceback)."""
    argv = ["train", "--model", "tiny-flux", "--erase", "x", "--steps", "1", "--vocab", small_vocab,
            "--k-closest", "40", "--num-centers", "8", "--ddim-steps", "6",
            "--max-sequence-length", "8", "--quiet"]
    assert "only LoRA training" in _one_error_line(capsys, argv + ["--base-quantization", "int8"], tmp_path)
    assert "--merge is not available" in _one_error_line(
        capsys, argv + ["--base-quantization", "nf4", "--lora-rank", "4", "--merge"], tmp_path)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)
        assert "needs bitsandbytes" in _one_error_line(
            capsys, argv + ["--base-quantization", "nf4", "--lora-rank", "4"], tmp_path)

    for extra in (dict(deepspeed="ds.json"), dict(compile=True)):  # refused before anything is read
        with pytest.raises(UserError, match="drop one of them"):
            _cfg(lambda **kw: EraseConfig(**kw), "tiny-flux", base_quantization="int8", erase=["x"], **extra).validate()

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device\nsecond line")

    for kind, op in (("int8", "matmul"), ("nf4", "matmul_4bit")):
        with monkeypatch.context() as m:
            m.setattr(bnb, op, unsupported)
            line = _one_error_line(capsys, argv + ["--base-quantization", kind, "--lora-rank", "4"], tmp_path)
            assert f"--base-quantization {kind} does not run on cpu" in line and "no kernel" in line


# --------------------------------------------------------------------------- the other 24 GB options


@pytest.mark.parametrize("model", MODELS)
def test_flow_text_encoders_are_freed_after_encoding(tiny_cfg, model):
    """The fast profile encodes "", the concepts and R once, then releases the text encoders:
    after setup no reference to any of them is left (their memory is freed), and the loop runs
    on the precomputed conditionings. Mutation checked: the release call removed (the
    encoders stay alive)."""
    comp = load_components(model)
    keys = [k for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(comp, k) is not None]
    refs = [weakref.ref(getattr(comp, k)) for k in keys]
    er = Eraser(_cfg(tiny_cfg, model, lora_rank=0), components=comp).setup()
    del comp
    gc.collect()
    assert all(r() is None for r in refs), [k for k, r in zip(keys, refs) if r() is not None]
    er.run_outer_step()


@pytest.mark.parametrize("model,kw", [("tiny-sd3", dict(lora_rank=0)),
                                      ("tiny-flux", dict(lora_rank=4, base_quantization="int8"))])
def test_flow_gradient_checkpointing_gives_the_same_result(tiny_cfg, model, kw):
    """--gradient-checkpointing on the flow transformers (full fine-tuning; LoRA on a quantized
    base): checkpointing is on, and two outer steps give the same draws and the same trained
    tensors as without it (fp32: 1e-6). Mutation checked: the engine not enabling it (the flag
    check)."""
    plain = Eraser(_cfg(tiny_cfg, model, **kw)).setup()
    ckpt = Eraser(_cfg(tiny_cfg, model, gradient_checkpointing=True, **kw)).setup()
    assert ckpt.unet.gradient_checkpointing and not plain.unet.gradient_checkpointing
    for er in (plain, ckpt):
        er.train()
    assert [r["samples"] for r in plain.log] == [r["samples"] for r in ckpt.log]
    for name, value in plain.trained_state().items():
        torch.testing.assert_close(ckpt.trained_state()[name], value, rtol=1e-6, atol=1e-8)


def test_flow_adamw8bit_keeps_8bit_states_and_follows_adamw(tiny_cfg):
    """--optimizer adamw8bit on tiny-flux (full noxattn: bitsandbytes keeps 8-bit states for
    tensors of ≥ 4096 values, fp32 below): uint8 states exist and the update after two outer
    steps follows torch's AdamW (cos ≥ 0.99). Mutation checked: the 8-bit optimizer replaced by
    plain AdamW in make_optimizer (the uint8 check)."""
    runs = {}
    for opt in ("adamw", "adamw8bit"):
        d, _, er = run_updates(_cfg(tiny_cfg, "tiny-flux", lora_rank=0, train_method="noxattn",
                                    optimizer=opt, lr=1e-3))
        runs[opt] = torch.cat([v.flatten() for v in d.values()])
    states = [s for s in er.theta.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)
    assert float(F.cosine_similarity(runs["adamw8bit"], runs["adamw"], dim=0)) >= 0.99
    # the memory model's formula (benchmarks/bench_memory_flow.py) is the states' own size
    bench = _bench_module()
    for p, st in er.theta.optimizer.state.items():
        own = sum(v.numel() * v.element_size() for k, v in st.items() if k in ("state1", "state2", "absmax1", "absmax2"))
        assert own == bench.adam_state_bytes(p.numel(), True), p.shape


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory_flow.py"
    spec = importlib.util.spec_from_file_location("bench_memory_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", MODELS)
def test_memory_model_activation_accounting_matches_a_real_forward(model):
    """docs/memory_flow.md's activation rows come from a forward on the meta device (flash
    attention's saves stood in for SDPA); the same accounting on a real CPU forward of the tiny
    models (fp32, torch's own SDPA) gives the same bytes: equal on tiny-sd3, within 3 KB on
    tiny-flux (its rotary tables), with and without checkpointing, bf16 and int8 bases. What
    this cannot check, since both sides share it: the rules on top of the recorded tensors
    (int8 keeps its layers' inputs; checkpointing keeps the block inputs plus one block); the
    measured rows of the report check those. Mutation checked: the log-sum-exp left out of the
    flash stand-in (tiny-sd3: 3232 bytes short)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from ap_erase_fast.models import shipped

    bench = _bench_module()
    family, cls = {"tiny-flux": ("flux", FluxTransformer2DModel), "tiny-sd3": ("sd3", SD3Transformer2DModel)}[model]
    for kind in ("none", "int8"):
        real = bench.activation_bytes(load_components(model).unet, family, 16, 8, kind, device="cpu",
                                      dtype=torch.float32, flash=False)
        with torch.device("meta"):
            meta_model = cls.from_config(shipped.load_config(model, "transformer"))
        meta = bench.activation_bytes(meta_model, family, 16, 8, kind, dtype=torch.float32)
        for mode in ("no_checkpointing", "checkpointing"):
            assert abs(meta[mode] - real[mode]) <= (0 if model == "tiny-sd3" else 3072), (kind, mode, meta, real)
        assert meta["checkpointing"] < meta["no_checkpointing"]
