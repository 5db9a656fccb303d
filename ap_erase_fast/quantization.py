"""A quantized frozen base for LoRA erasure (``--base-quantization int8|nf4``).

With LoRA, θ is the denoiser with its adapters off and θ′ the same module with them on, so the
base weights are never trained: they can be stored in 8 or 4 bits, and θ and θ′ then share one
quantized copy (the memory point: FLUX.1-dev's transformer takes 22.2 GiB in bf16, 11.1 GiB in
int8, 5.7 GiB in NF4; docs/memory_flow.md). Every ``torch.nn.Linear`` of the denoiser (SD3/FLUX
transformer, or an SD/SDXL UNet: the same code) is replaced by a bitsandbytes layer before the
adapters are attached; convolutions, norms and embeddings keep their float weights. peft then
wraps those layers with its bitsandbytes LoRA layers (the adapters stay fp32).

* ``int8``: ``bnb.nn.Linear8bitLt`` with ``threshold=0`` (no LLM.int8() outlier decomposition):
  per output row absmax int8 weights. LLM.int8()'s outlier path picks its fp16 columns over the
  whole batch, so a sample's output would depend on the rest of its batch; θ and θ′ see the
  same sample in batches of different make-up, and θ′₀ = θ must hold exactly. On CUDA the
  activations are quantized per row (int8 × int8 matmul); on CPU, in training mode, bitsandbytes
  dequantizes the weight and multiplies in the input's dtype (weight-only int8).
* ``nf4``: ``bnb.nn.Linear4bit``, 4-bit NormalFloat in blocks of 64 with double-quantized block
  scales (QLoRA's recipe, ≈ 4.13 bits per weight), computed in the run's dtype (bf16 under
  mixed precision, else fp32): the weight is dequantized and multiplied in that dtype.

Before quantizing, a probe runs one small quantized layer forward and backward on the run's
device; when bitsandbytes cannot (missing, or no kernel for that device) the run stops with one
line. The merged denoiser (``--merge``) is refused with a quantized base (:func:`check_settings`
says why).
"""
from __future__ import annotations

import math

from .errors import UserError

NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size
NESTED_BLOCKSIZE = 256  # double quantization: the 8-bit block scales in blocks of 256
INT8_THRESHOLD = 0.0  # no outlier decomposition (module docstring)


def check_settings(cfg) -> None:
    """The settings ``--base-quantization`` needs and those it excludes (one line each); called
    by ``EraseConfig.validate``, before anything is loaded."""
    kind = cfg.base_quantization
    if kind == "none":
        return
    q = f"--base-quantization {kind}"
    if not cfg.lora_rank:
        raise UserError(f"{q} quantizes the frozen base, and only LoRA training leaves the base "
                        f"frozen: add --lora-rank R (e.g. --lora-rank 16)")
    if cfg.merge:
        raise UserError(f"--merge is not available with {q}: the merged weights would carry the "
                        f"quantization error into every layer; load the LoRA onto the original "
                        f"model instead (pipe.load_lora_weights, then pipe.fuse_lora())")
    if cfg.deepspeed:
        raise UserError(f"{q} does not run under --deepspeed (ZeRO would partition the "
                        f"quantized weights); drop one of them")
    if cfg.compile:
        raise UserError(f"{q} is not tested with --compile; drop one of them")


def _bnb(kind: str):
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - missing or broken install
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--base-quantization {kind} needs bitsandbytes ({detail}); install it "
                        f"with pip install 'ap_erase_fast[bnb]' or leave --base-quantization "
                        f"out") from None
    return bnb


def quantized_linear(linear, kind: str, device, compute_dtype=None):
    """A bitsandbytes copy of ``linear`` (frozen), quantized on ``device``.

    The weight is quantized from its float value on the CPU side of the move (bitsandbytes
    quantizes a weight when it is moved from the CPU to the device, or to the CPU itself)."""
    import torch

    bnb = _bnb(kind)
    device = torch.device(device)
    weight = linear.weight.detach()
    if weight.device.type != "cpu":
        weight = weight.cpu()
    has_bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight.float().contiguous(), requires_grad=False,
                                         has_fp16_weights=False)
    elif kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype or torch.float32, quant_type="nf4",
                                  compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.float().contiguous(), requires_grad=False,
                                         quant_type="nf4", blocksize=NF4_BLOCKSIZE,
                                         compress_statistics=True, module=layer)
    else:
        raise ValueError(f"unknown quantization {kind!r}")
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to("cpu", copy=True),
                                        requires_grad=False)
    return layer.to(device).requires_grad_(False)


def dequantized_weight(layer):
    """The float weight a quantized layer computes with (fp32): NF4 codes × block scales, or
    int8 rows × their absmax / 127."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    cb = layer.state.CB if layer.state.CB is not None else layer.weight.CB
    scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    if cb is None:
        cb = layer.weight.data
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def is_quantized_layer(module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        return False
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantized_bytes(layer) -> int:
    """Bytes a quantized layer's weight takes on its device: the codes and every scale (bias
    not included)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        qs = layer.weight.quant_state
        parts = [layer.weight.data, qs.absmax, qs.code]
        if qs.nested:
            parts += [qs.state2.absmax, qs.state2.code, qs.offset]
        return sum(t.numel() * t.element_size() for t in parts)
    cb = layer.state.CB if layer.state.CB is not None else layer.weight.data
    scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    return cb.numel() * cb.element_size() + scb.numel() * scb.element_size()


def linear_weight_bytes(out_features: int, in_features: int, kind: str, dtype_bytes: int = 2) -> int:
    """Bytes of one linear layer's weight stored as ``kind`` ("none": ``dtype_bytes`` per
    weight): what :func:`quantized_bytes` measures, from the shape alone (the memory model of
    docs/memory_flow.md)."""
    n = out_features * in_features
    if kind == "none":
        return n * dtype_bytes
    if kind == "int8":
        return n + 4 * out_features  # int8 codes + one fp32 absmax per output row
    if kind == "nf4":
        blocks = math.ceil(n / NF4_BLOCKSIZE)
        # packed 4-bit codes, an 8-bit scale per block, an fp32 scale per 256 blocks, the NF4
        # code (16 fp32), the 8-bit scales' code (256 fp32) and their offset (one fp32)
        return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * (16 + 256 + 1)
    raise ValueError(f"unknown quantization {kind!r}")


def probe(kind: str, device, compute_dtype=None) -> None:
    """Quantize one small layer on ``device`` and run it forward and backward in training mode,
    as the loop will; one line (UserError) when bitsandbytes cannot."""
    import torch

    bnb = _bnb(kind)
    device = torch.device(device)
    try:
        g = torch.Generator().manual_seed(0)
        float_layer = torch.nn.Linear(128, 64)
        with torch.no_grad():
            float_layer.weight.copy_(torch.randn(64, 128, generator=g) / 16)
        layer = quantized_linear(float_layer, kind, device, compute_dtype).train()
        x = torch.randn(4, 128, generator=g).to(device, compute_dtype or torch.float32)
        x.requires_grad_(True)
        y = layer(x)
        y.float().square().sum().backward()
        if not (torch.isfinite(y).all() and x.grad is not None and torch.isfinite(x.grad).all()):
            raise RuntimeError("non-finite output or gradient")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises, said in one line
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"--base-quantization {kind} does not run on {device.type} with "
                        f"bitsandbytes {getattr(bnb, '__version__', '?')} ({detail}); use "
                        f"another --device or leave --base-quantization out") from None


def quantize_base(denoiser, kind: str, device, compute_dtype=None) -> dict:
    """Replace every ``torch.nn.Linear`` of ``denoiser`` by its ``kind`` copy on ``device``, one
    layer at a time (the float weights of one layer at most are on the device beside the
    quantized ones), and mark the model as peft expects of a bitsandbytes model; returns what
    run.json records (``base_quantization``)."""
    import torch

    bnb = _bnb(kind)
    probe(kind, device, compute_dtype)
    found = [(parent, name, child) for parent in denoiser.modules()
             for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    if not found:
        raise UserError(f"--base-quantization {kind}: the denoiser has no linear layer to quantize")
    layers, before, after, params = len(found), 0, 0, 0
    found.reverse()
    while found:  # dropping each float layer as soon as its copy is in place
        parent, name, child = found.pop()
        before += child.weight.numel() * child.weight.element_size()
        params += child.weight.numel()
        layer = quantized_linear(child, kind, device, compute_dtype)
        after += quantized_bytes(layer)
        setattr(parent, name, layer)
        del child, parent
    # peft's LoRA dispatch wraps bitsandbytes layers only in a model that says it is quantized
    setattr(denoiser, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    info = {"kind": kind, "bitsandbytes": getattr(bnb, "__version__", "?"),
            "layers": layers, "quantized_weights": params,
            "weight_bytes_before": before, "weight_bytes": after}
    if kind == "int8":
        info["int8_threshold"] = INT8_THRESHOLD
    else:
        info.update(nf4_blocksize=NF4_BLOCKSIZE, double_quant=True,
                    compute_dtype=str(compute_dtype or torch.float32).replace("torch.", ""))
    return info
