#!/usr/bin/env python
"""SD3/FLUX LoRA erasure on one 24 GB card: the memory model, per component and option, computed
on the meta device from the real configs shipped in ap_erase_fast/models/configs/ (FLUX.1-dev,
SD3.5-medium, SD3.5-large), plus measured rows: a CPU peak-RSS proxy (SD3.5-medium, random
weights, short sequence) and, on a GPU, training rows under a memory cap (benchmarks/gpu_check.sh).

    python benchmarks/bench_memory_flow.py --out benchmarks/results   # model + CPU proxy rows
    python benchmarks/bench_memory_flow.py --no-proxy                 # the model only (seconds)
    python benchmarks/bench_memory_flow.py --measure flux-nf4 --memory-cap-gib 22   # one GPU row
    python benchmarks/bench_memory_flow.py --measure flux-nf4 --tiny  # its plumbing on tiny-flux

Writes memory_flow_model.{md,csv} (machine, versions, commit in both). What is computed and how
is said in docs/memory_flow.md; every number here is either computed (bytes of tensors of known
shapes) or measured (named as such, with the machine).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]  # the package, _common

GIB = 2 ** 30
VARIANTS = {"flux.1-dev": "flux", "sd3.5-medium": "sd3", "sd3.5-large": "sd3"}
IMAGE_TOKENS = 4096  # 1024 px: VAE factor 8, 2×2 patches → 64 × 64
DEFAULT_T5 = {"flux": 512, "sd3": 256}  # the pipelines' max_sequence_length defaults
RANK, METHOD, VOCAB_WORDS, R_ROWS = 16, "xattn", 3000, 100
# the text encoders, from their published configs (openai/clip-vit-large-patch14, the OpenCLIP
# ViT-bigG/14 text tower as SDXL/SD3 ship it, google/t5-v1_1-xxl's encoder)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")
# the GPU rows of benchmarks/gpu_check.sh: random weights from the shipped transformer config
ROWS = {
    "flux-nf4": dict(variant="flux.1-dev", base_quantization="nf4"),
    "flux-int8": dict(variant="flux.1-dev", base_quantization="int8"),
    "sd35m-bf16": dict(variant="sd3.5-medium", base_quantization="none"),
    # CPU proxy rows (short sequence, peak RSS)
    "sd35m-nf4": dict(variant="sd3.5-medium", base_quantization="nf4"),
    "sd35m-int8": dict(variant="sd3.5-medium", base_quantization="int8"),
}
TINY = {"flux.1-dev": "tiny-flux", "sd3.5-medium": "tiny-sd3", "sd3.5-large": "tiny-sd3"}


def gib(n: float) -> float:
    return round(n / GIB, 3)


# --------------------------------------------------------------------------- computed (meta device)


def meta_transformer(variant: str):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from ap_erase_fast.models import shipped

    cls = FluxTransformer2DModel if VARIANTS.get(variant) == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        return cls.from_config(shipped.load_config(variant, "transformer"))


def weight_bytes(model, kind: str) -> dict:
    """Bytes of the transformer as the engine keeps it on the device: linear/conv weights and
    biases in bf16 (kind "none") or the linear weights quantized (int8/nf4, biases bf16);
    norms, embeddings and buffers fp32. Also the fp32 model the loader builds first."""
    import torch

    from ap_erase_fast.quantization import linear_weight_bytes

    buffers = sum(4 * b.numel() for b in model.buffers())
    total = {"fp32_as_loaded": buffers, "stored": buffers}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            total["fp32_as_loaded"] += 4 * p.numel()
            if isinstance(mod, torch.nn.Linear) and name == "weight":
                total["stored"] += linear_weight_bytes(mod.out_features, mod.in_features, kind)
            else:
                total["stored"] += (2 if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) else 4) * p.numel()
    return total


def lora_shapes(model, method: str = METHOD, rank: int = RANK) -> list[int]:
    """Sizes of the adapter tensors (A and B per adapted layer) the backbone's rule gives."""
    import torch

    from ap_erase_fast.models.trainable import flow_parameter_is_trained

    sizes = []
    for name, mod in model.named_modules():
        params = [n for n, _ in mod.named_parameters(recurse=False)]
        if not (isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and params
                and all(flow_parameter_is_trained(f"{name}.{n}", method) for n in params)):
            continue
        if isinstance(mod, torch.nn.Linear):
            sizes += [rank * mod.in_features, mod.out_features * rank]
        else:
            k = mod.kernel_size[0] * mod.kernel_size[1]
            sizes += [rank * mod.in_channels * k, mod.out_channels * rank]
    return sizes


def adam_state_bytes(numel: int, eight_bit: bool) -> int:
    """Adam's two states for one tensor: fp32, or bitsandbytes' 8-bit blockwise states (uint8 +
    an fp32 absmax per 256 values; tensors under 4096 values keep fp32 states)."""
    if eight_bit and numel >= 4096:
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)
    return 8 * numel


class SavedTensors:
    """What autograd keeps for the backward of one forward: the storages of the saved tensors
    (each storage once, parameters excluded), attributed to the transformer block running; the
    inputs each block receives (what gradient checkpointing keeps of it); with ``keep_inputs``,
    also the inputs of those modules (bitsandbytes' int8 matmul keeps its input)."""

    def __init__(self, model, keep_inputs=()):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen, self.by_block, self.inputs = set(), {}, {}
        self.block, self.handles, self.keep, self.alive = "outside", [], list(keep_inputs), []
        for name, mod in model.named_modules():
            if name.count(".") == 1 and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks"):
                self.handles.append(mod.register_forward_pre_hook(self._enter(name), with_kwargs=True))
                self.handles.append(mod.register_forward_hook(lambda *a: setattr(self, "block", "outside")))
        for mod in self.keep:
            self.handles.append(mod.register_forward_pre_hook(self._keep))

    def _enter(self, name):
        def hook(mod, args, kwargs):
            self.block = name
            for t in list(args) + list(kwargs.values()):
                for x in (t if isinstance(t, tuple) else (t,)):
                    if hasattr(x, "untyped_storage"):
                        self.alive.append(x)
                        s = x.untyped_storage()
                        self.inputs.setdefault(s._cdata, s.nbytes())
        return hook

    def _keep(self, mod, args):
        for a in args:
            self.pack(a)

    def pack(self, t):
        self.alive.append(t)  # no storage is freed and its address reused while counting
        s = t.untyped_storage()
        if s._cdata not in self.params and s._cdata not in self.seen:
            self.seen.add(s._cdata)
            self.by_block[self.block] = self.by_block.get(self.block, 0) + s.nbytes()
        return t

    def totals(self) -> dict:
        blocks = [v for k, v in self.by_block.items() if k != "outside"]
        outside = self.by_block.get("outside", 0)
        return {"no_checkpointing": outside + sum(blocks),
                "checkpointing": outside + sum(self.inputs.values()) + max(blocks, default=0)}


@contextlib.contextmanager
def flash_attention_saves():
    """SDPA as flash attention keeps it for the backward (q, k, v, output and the fp32
    log-sum-exp), and layer norms in fp32 as autocast runs them, for forwards on the meta
    device (which would otherwise take the math path and keep the N × N attention matrix)."""
    import torch
    import torch.nn.functional as F

    sdpa, layer_norm = F.scaled_dot_product_attention, F.layer_norm

    class Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = sdpa(q, k, v)
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
            return out

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and not is_causal and scale is None
        return Flash.apply(query, key, value)

    def fp32_layer_norm(x, *args, **kw):
        return layer_norm(x.float(), *args, **kw).to(x.dtype)

    F.scaled_dot_product_attention, F.layer_norm = flash, fp32_layer_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.layer_norm = sdpa, layer_norm


def flow_inputs(family, config, batch, image_tokens, text_len, device="meta", dtype=None):
    import torch

    kw = dict(device=device, dtype=dtype or torch.bfloat16)
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"], **kw),
                    timestep=torch.ones(batch, device=device), guidance=torch.ones(batch, device=device),
                    pooled_projections=torch.randn(batch, config["pooled_projection_dim"], **kw),
                    encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], **kw),
                    txt_ids=torch.zeros(text_len, 3, device=device),
                    img_ids=torch.zeros(image_tokens, 3, device=device), return_dict=False)
    side = 2 * int(math.isqrt(image_tokens))
    return dict(hidden_states=torch.randn(batch, config["in_channels"], side, side, **kw),
                timestep=torch.ones(batch, device=device) * 500,
                pooled_projections=torch.randn(batch, config["pooled_projection_dim"], **kw),
                encoder_hidden_states=torch.randn(batch, 77 + text_len, config["joint_attention_dim"], **kw),
                return_dict=False)


def activation_bytes(model, family, image_tokens, text_len, kind="none", rank=RANK, method=METHOD,
                     device="meta", dtype=None, flash=True):
    """Saved-for-backward bytes of one grad-carrying row (LoRA on, base frozen)."""
    import torch
    from peft import LoraConfig

    from ap_erase_fast.models.trainable import flow_parameter_is_trained

    model.to(dtype or torch.bfloat16)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and all(flow_parameter_is_trained(f"{n}.{k}", method) for k, _ in m.named_parameters(recurse=False))]
    if not any("lora_" in n for n, _ in model.named_parameters()):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True))
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    # bitsandbytes' int8 matmul keeps the input of every quantized layer (plain and LoRA bases)
    rec = SavedTensors(model, [m for n, m in model.named_modules() if kind == "int8"
                               and type(m) is torch.nn.Linear and "lora_" not in n])
    ctx = flash_attention_saves() if flash else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        out = model(**flow_inputs(family, dict(model.config), 1, image_tokens, text_len, device, dtype))[0]
    [h.remove() for h in rec.handles]
    del out
    return rec.totals()


def text_encoder_bytes(family: str) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        parts = {"CLIP-L": (CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)(CLIPTextConfig(**CLIP_L)),
                 "T5-XXL": T5EncoderModel(T5Config(**T5_XXL)),
                 **({"CLIP-G": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))} if family == "sd3" else {})}
    return {k: 4 * sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


def row_floats(family: str, config: dict, text_len: int) -> int:
    if family == "flux":
        return text_len * config["joint_attention_dim"] + config["pooled_projection_dim"]
    return (77 + text_len) * config["joint_attention_dim"] + config["pooled_projection_dim"]


def model_rows(variant: str) -> list[dict]:
    """Every component of the memory model of ``variant`` (bytes, how computed)."""
    family, model, rows = VARIANTS[variant], meta_transformer(variant), []
    config, text_len = dict(model.config), DEFAULT_T5[family]

    def add(component, option, nbytes, how):
        rows.append({"variant": variant, "component": component, "option": option, "bytes": int(nbytes),
                     "gib": gib(nbytes), "how": how})

    add("transformer weights", "fp32 (as loaded, before the cast)", weight_bytes(model, "none")["fp32_as_loaded"],
        "computed")
    for kind, label in (("none", "bf16"), ("int8", "int8 base"), ("nf4", "nf4 base")):
        add("transformer weights", label, weight_bytes(model, kind)["stored"], "computed")
    n = sum(sizes := lora_shapes(model))
    add("LoRA adapters", f"rank {RANK} {METHOD}: {n:,} params, fp32", 4 * n, "computed")
    add("LoRA gradients", "fp32", 4 * n, "computed")
    add("Adam states", "fp32 (adam, adamw)", sum(adam_state_bytes(s, False) for s in sizes), "computed")
    add("Adam states", "8-bit (adamw8bit)", sum(adam_state_bytes(s, True) for s in sizes), "computed")
    for kind, label in (("none", "bf16 / nf4 base"), ("int8", "int8 base")):
        act = activation_bytes(meta_transformer(variant), family, IMAGE_TOKENS, text_len, kind)
        for mode in ("no_checkpointing", "checkpointing"):
            add("activations, per grad row", f"{label}, {mode.replace('_', ' ')}, 1024 px, T5 {text_len}",
                act[mode], "computed (saved tensors on meta)")
    encoders = text_encoder_bytes(family)
    for name, b in encoders.items():
        add("text encoders (encoding phase)", f"{name} fp32", b, "computed")
        add("text encoders (encoding phase)", f"{name} bf16", b // 2, "computed")
    add("set-up phase", "fp32 runs, reference profile: every text encoder fp32 on the device",
        sum(encoders.values()), "the fp32 encoder rows")
    add("set-up phase", "bf16/fp16 fast profile: one text encoder at a time, bf16", max(encoders.values()) // 2,
        "the largest bf16 encoder row")
    largest = 4 * max(p.numel() for p in model.parameters())  # moved to the device in fp32, then cast
    add("set-up phase", "bf16/fp16 fast profile: the transformer moved from the CPU", weight_bytes(model, "none")
        ["stored"] + largest, f"bf16 weights + the largest parameter in fp32 ({gib(largest)} GiB)")
    add("text encoders (training phase)", "released after encoding", 0, "by design")
    for length in sorted({text_len, 64}):
        floats = row_floats(family, config, length)
        add("concept tables", f"vocabulary {VOCAB_WORDS} words, T5 {length} (host RAM)", 4 * floats * VOCAB_WORDS,
            "computed")
        add("concept tables", f"R {R_ROWS} rows per concept, T5 {length} (device)", 4 * floats * R_ROWS, "computed")
    return rows


def totals(rows: list[dict]) -> list[dict]:
    """The device's training-phase sum per option: weights + adapters + gradients + Adam states
    + 2 grad rows of activations (an outer step at batch 1) + R at T5 64."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        v = {(r["component"], r["option"]): r["bytes"] for r in rows if r["variant"] == variant}

        def get(component, start):
            return next(b for (c, o), b in v.items() if c == component and o.startswith(start))
        lora = get("LoRA adapters", "rank") + get("LoRA gradients", "fp32")
        r_table = get("concept tables", "R 100 rows per concept, T5 64")
        for label, wkey, akey in (("bf16", "bf16", "bf16 / nf4 base"), ("int8", "int8 base", "int8 base"),
                                  ("nf4", "nf4 base", "bf16 / nf4 base")):
            for ckpt in ("checkpointing", "no checkpointing"):
                act = get("activations, per grad row", f"{akey}, {ckpt}")
                total = get("transformer weights", wkey) + lora + get("Adam states", "8-bit") + 2 * act + r_table
                out.append({"variant": variant, "component": "training phase total",
                            "option": f"{label} base, LoRA {RANK}, adamw8bit, {ckpt}", "bytes": int(total),
                            "gib": gib(total), "how": "sum of the rows above"})
    return out


# --------------------------------------------------------------------------- measured (a training row)


def random_components(variant: str):
    """The transformer of ``variant`` with random weights (uniform ±1/√fan_in, norms 1), stand-in
    one-layer text encoders of the real output widths (they are released before training
    anyway), the real flow scheduler, a small VAE with the real factor 8 (unused in training)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ap_erase_fast.models import SDComponents, shipped
    from ap_erase_fast.models.tiny_flow import build_tiny_t5_tokenizer
    from ap_erase_fast.models.tokenizer import build_clip_tokenizer

    family = VARIANTS[variant]
    model = meta_transformer(variant).to_empty(device="cpu")
    # one block of 2^20 uniform values tiled over every tensor: memory copies instead of a
    # sequential generator over 12 B values (FLUX), and the values do not matter here
    pool = torch.rand(2 ** 20, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fill(t, scale):
        flat = t.view(-1)
        for i in range(0, flat.numel(), pool.numel()):
            flat[i:i + pool.numel()].copy_(pool[:flat[i:i + pool.numel()].numel()])
        flat.mul_(scale)

    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if p.dim() >= 2:
                    fill(p, 1 / math.sqrt(p[0].numel()))
                else:
                    p.fill_(1.0 if "norm" in type(mod).__name__.lower() or "norm" in name else 0.0)
        for b in model.buffers():  # SD3's sin-cos position table
            fill(b, 1.0)
    small = dict(num_hidden_layers=1, intermediate_size=64, num_attention_heads=4, vocab_size=49408,
                 max_position_embeddings=77)
    t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=64, d_kv=16, num_heads=4, num_layers=1, vocab_size=3200))
    parts = dict(tokenizer=build_clip_tokenizer("<|endoftext|>"))
    if family == "flux":
        parts.update(text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, **small)),
                     text_encoder_2=t5, tokenizer_2=build_tiny_t5_tokenizer())
    else:
        parts.update(text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, projection_dim=768, **small)),
                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, projection_dim=1280, **small)),
                     tokenizer_2=build_clip_tokenizer("!"), text_encoder_3=t5, tokenizer_3=build_tiny_t5_tokenizer())
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8)
    [parts[k].eval() for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if k in parts]
    return SDComponents(unet=model, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
        shipped.load_config(variant, "scheduler")), vae=vae, model_id=f"{variant}-architecture-random",
        content_hash="random", random_weights=True, source={"format": "benchmark"}, default_resolution=1024,
        family=family, **parts)


def measure(row: str, args) -> dict:
    """One training row: set-up, one warm-up outer step, ``--steps`` timed outer steps; peak
    memory of the timed steps (CUDA: max allocated; CPU: peak RSS) and outer steps/s."""
    import torch

    from ap_erase_fast.config import EraseConfig
    from ap_erase_fast.engine import Eraser
    from ap_erase_fast.models import load_components
    from ap_erase_fast.models.vocab import load_vocabulary
    from ap_erase_fast.bench import _peak_rss_kib, _reset_peak_rss
    from ap_erase_fast.runtime import quiet_libraries

    quiet_libraries()
    spec = ROWS[row]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total))
    baseline = _peak_rss_kib() / 2 ** 20
    comps = load_components(TINY[spec["variant"]]) if args.tiny else random_components(spec["variant"])
    res = args.resolution or (16 if args.tiny else 1024)
    cfg = EraseConfig(model=comps.model_id if args.tiny else "tiny", erase=["garbage truck"], steps=args.steps + 1,
                      seed=0, quiet=True, device=str(device), lora_rank=RANK, train_method=METHOD,
                      base_quantization=spec["base_quantization"], gradient_checkpointing=True,
                      optimizer="adamw8bit", mixed_precision=args.mixed_precision, resolution=res,
                      ddim_steps=args.ddim_steps, max_sequence_length=args.max_sequence_length,
                      embedding_cache="none", preserve_set=load_vocabulary()[:args.num_centers])
    t0 = time.perf_counter()
    er = Eraser(cfg, progress=False, components=comps).setup()
    del comps
    setup_s, sync = time.perf_counter() - t0, (lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    er.run_outer_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # free memory glibc kept from the set-up goes back to the OS first
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset = device.type == "cpu" and _reset_peak_rss()
    rss_before = _rss_kib() / 2 ** 20
    t0 = time.perf_counter()
    for _ in range(args.steps):
        er.run_outer_step()
    sync()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / GIB, "cuda max allocated"
    else:
        peak = (_peak_rss_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2 ** 20
        kind = "peak RSS of the timed steps" if reset else "peak RSS of the process"
    return {"row": row, "model": er.components.model_id,  # what the engine did, not what was asked
            "base_quantization": (er.quantization or {}).get("kind", "none"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "memory_cap_gib": (args.memory_cap_gib or "") if device.type == "cuda" else "", "resolution": res,
            "max_sequence_length": er.backbone.max_sequence_length, "ddim_steps": args.ddim_steps,
            "mixed_precision": args.mixed_precision, "peak_gib": round(peak, 3), "peak_kind": kind,
            "process_baseline_gib": round(baseline, 3), "setup_s": round(setup_s, 1),
            "outer_steps_per_s": round(args.steps / elapsed, 4), "outer_steps": args.steps,
            "rss_before_steps_gib": round(rss_before, 3) if device.type == "cpu" else "",
            "options": f"LoRA {RANK} {METHOD}, gradient checkpointing, adamw8bit, R of {args.num_centers}",
            "weights": "random (shipped transformer config; stand-in text encoders)" if not args.tiny
            else "built-in tiny model"}


def _rss_kib() -> int:  # the resident set size now (Linux), KiB
    with open("/proc/self/status") as fh:
        return next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)


# --------------------------------------------------------------------------- the report


def environment() -> dict:
    import torch
    from _common import environment as env

    from ap_erase_fast.runtime import environment as lib_env

    out, lib = env(torch.device("cpu")), lib_env("cpu")
    return {**out, **{k: lib[k] for k in ("ap_erase_fast", "diffusers", "transformers", "bitsandbytes") if k in lib}}


COLUMNS = ["variant", "component", "option", "gib", "bytes", "how"]
MEASURED = ["row", "model", "base_quantization", "device", "resolution", "max_sequence_length", "ddim_steps",
            "mixed_precision", "peak_gib", "peak_kind", "predicted_gib", "process_baseline_gib",
            "rss_before_steps_gib", "setup_s", "outer_steps_per_s", "options", "weights", "status"]


def proxy_prediction(row: dict) -> float:
    """The memory model at the proxy's own size: stored weights + LoRA + gradients + 8-bit Adam
    + 2 grad rows of activations (checkpointing; fp32 activations when the proxy ran fp32)."""
    import torch

    variant, kind, tokens = ROWS[row["row"]]["variant"], row["base_quantization"], (row["resolution"] // 16) ** 2
    model, dtype = meta_transformer(variant), torch.bfloat16 if row["mixed_precision"] == "bf16" else torch.float32
    sizes = lora_shapes(model)
    act = activation_bytes(meta_transformer(variant).to(dtype), VARIANTS[variant], tokens,
                           row["max_sequence_length"], kind, dtype=dtype)["checkpointing"]
    total = (weight_bytes(model, kind)["stored"] + 8 * sum(sizes) + sum(adam_state_bytes(s, True) for s in sizes)
             + 2 * act)
    return gib(total)


def write(out_dir: str, env: dict, rows: list[dict], measured: list[dict]) -> str:
    import csv

    from _common import header_markdown, markdown_table

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "memory_flow_model")
    with open(stem + ".csv", "w", newline="") as fh:  # the environment, then one table of both kinds
        w = csv.writer(fh)
        w.writerow([f"# {k}: {v}" for k, v in env.items()])
        fields = ["kind"] + COLUMNS + [c for c in MEASURED if c not in COLUMNS]
        w.writerow(fields)
        for kind, items in (("computed", rows), ("measured", measured)):
            for r in items:
                w.writerow([kind if f == "kind" else r.get(f, "") for f in fields])
    lines = ["# SD3 / FLUX LoRA erasure: memory per component and option", "", header_markdown(env), "",
             f"Computed rows: tensor bytes from the shipped transformer configs on the meta device; LoRA "
             f"rank {RANK} on the `{METHOD}` layers; 1024 px ({IMAGE_TOKENS} image tokens); activations are "
             "what autograd keeps for one grad-carrying row (flash-attention saves, fp32 layer norms as "
             "under autocast, bf16 otherwise); an outer step at batch 1 has 2 such rows (θ′ at (z, c_e) "
             "and (z_r, c_a)). docs/memory_flow.md explains each row.", "",
             markdown_table(rows, COLUMNS), "", "## Measured", ""]
    if measured:
        lines += ["CPU proxy rows: SD3.5-medium's transformer with random weights at 128 px (64 image "
                  "tokens) and T5 length 8, one warm-up and one timed outer step (DDIM 2, R of 2 prompts) "
                  "on this machine. `peak_gib`: the process's peak RSS during the timed step (reset "
                  "before it); `rss_before_steps_gib`: its RSS when the step began; `predicted_gib`: "
                  "the memory model at the same size (stored weights + LoRA + gradients + 8-bit Adam + "
                  "2 grad rows of activations with checkpointing), which leaves out the libraries "
                  "(`process_baseline_gib`: the peak RSS after the imports, before any model). The "
                  "free memory glibc keeps from the set-up is returned (`malloc_trim`) before the step.",
                  "", markdown_table(measured, MEASURED)]
    else:
        lines += ["No row measured in this run (--no-proxy)."]
    lines += ["", "GPU rows (FLUX.1-dev LoRA NF4 / int8, SD3.5-medium LoRA bf16 under a 22 GiB cap, "
              "benchmarks/gpu_check.sh step `flow-lora-cap-22gib`): not measured on GPU yet."]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return stem


def previous_measured(out_dir: str) -> list[dict]:
    """The measured rows already in ``out_dir`` (a --no-proxy run keeps them), status naming their commit."""
    import csv

    path = os.path.join(out_dir, "memory_flow_model.csv")
    env, fields, *rows = list(csv.reader(open(path).read().splitlines())) if os.path.isfile(path) else [[], []]
    commit = next((c.split(": ", 1)[1] for c in env if c.startswith("# commit: ")), "?")
    return [{**row, "status": f"{row['status']} (measured at commit {commit}, kept)"}
            for row in (dict(zip(fields, r)) for r in rows) if row.get("kind") == "measured"]


def run_child(row: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", row, "--steps", str(args.steps), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"row": row, "status": f"timeout after {args.timeout:.0f} s"}
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"row": row, "status": f"failed: {tail}"}
    return {**json.loads(found[-1][7:]), "status": "ok"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default: a new bench-memory-flow-<date> folder)")
    ap.add_argument("--no-proxy", action="store_true", help="skip the measured CPU proxy rows (those already in --out stay)")
    ap.add_argument("--measure", choices=sorted(ROWS), help="run one training row and print it")
    ap.add_argument("--tiny", action="store_true", help="--measure on the built-in tiny model (plumbing)")
    for flag, kind, default in (("--device", str, None), ("--memory-cap-gib", float, None), ("--steps", int, 1),
                                ("--resolution", int, None), ("--ddim-steps", int, 10),
                                ("--max-sequence-length", int, 64), ("--num-centers", int, 8), ("--timeout", float, 3600),
                                ("--variants", str, ",".join(VARIANTS)), ("--proxy-rows", str, "sd35m-bf16,sd35m-int8,sd35m-nf4")):
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16", "fp16"))
    args = ap.parse_args(argv)
    if args.measure:
        result = measure(args.measure, args)
        cap = f"{result['memory_cap_gib']} GiB cap" if result["memory_cap_gib"] and result["device"] != "cpu" else "no cap"
        base = result["base_quantization"] if result["base_quantization"] != "none" else result["mixed_precision"]
        print(f"GPUCHECK {result['row']} ({result['model']}, {base} base, {result['options']}, {cap}): peak "
              f"{result['peak_gib']} GiB ({result['peak_kind']}), {result['outer_steps_per_s']} outer steps/s "
              f"on {result['device']}", flush=True)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    from _common import new_results_dir

    out = args.out or new_results_dir("memory-flow")
    env, rows = environment(), []
    for variant in args.variants.split(","):
        rows += model_rows(variant)
        print(f"{variant}: {len(rows)} rows", file=sys.stderr, flush=True)
    rows += totals(rows)
    measured = previous_measured(out) if args.no_proxy else []
    if not args.no_proxy:
        for name in args.proxy_rows.split(","):
            result = run_child(name, args, ["--device", "cpu", "--resolution", "128", "--ddim-steps", "2",
                                            "--max-sequence-length", "8", "--mixed-precision", args.mixed_precision,
                                            "--num-centers", "2"])
            if result.get("status") == "ok":
                result["predicted_gib"] = proxy_prediction(result)
            measured.append(result)
            print(f"{name}: {result.get('peak_gib')} GiB {result.get('status')}", file=sys.stderr, flush=True)
    stem = write(out, env, rows, measured)
    print(f"wrote {stem}.csv and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
