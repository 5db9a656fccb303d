"""The set-up phase's device memory (docs/memory_flow.md, "The set-up phase").

Two helpers the fast profile uses when it computes in bf16/fp16 (the engine's compute dtype):

* :func:`move_denoiser` moves the denoiser, loaded in fp32 on the CPU, to the device one
  parameter at a time, casting on the device the parameters the engine stores in the compute
  dtype (the untrained weights autocast casts anyway): the device holds at most one fp32
  parameter beside the finished ones, never the fp32 model, and the result is the same tensors,
  bit for bit, as moving the fp32 model and casting it there;
* :func:`cast_text_encoder` holds a text encoder in the compute dtype (the flow backbones then
  put one encoder at a time on the device: :meth:`~ap_erase_fast.backbones.base.Backbone.hold_text_encoders`).
"""
from __future__ import annotations

import torch


def move_denoiser(module: torch.nn.Module, device, dtype: torch.dtype, cast: set[str]) -> torch.nn.Module:
    """``module`` on ``device``, its parameters named in ``cast`` (names of
    ``module.named_parameters()``) in ``dtype``, the others and every buffer as they are.

    Each parameter is copied to the device as it is and cast there (the cast the engine made on
    the device-resident fp32 model before), then becomes the parameter's data: the same
    ``Parameter`` objects, ``requires_grad`` kept, as ``Module.to`` keeps them (on a device whose
    tensors cannot take a CPU parameter's place, e.g. ``meta``, new ones, as ``Module.to`` makes
    there); the CPU copy is dropped as it goes."""
    device = torch.device(device)
    done: dict[int, torch.nn.Parameter] = {}  # a parameter shared by several modules moves once
    with torch.no_grad():
        for prefix, owner in module.named_modules():
            for key, p in list(owner._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    data = p.data.to(device)
                    if (f"{prefix}.{key}" if prefix else key) in cast:
                        data = data.to(dtype)
                    if torch._has_compatible_shallow_copy_type(p, data):
                        p.data = data
                        done[id(p)] = p
                    else:
                        done[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
                    del data
                owner._parameters[key] = done[id(p)]
    return module.to(device)  # the buffers (the parameters are there already)


def cast_text_encoder(encoder: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``encoder``'s floating-point parameters and buffers in ``dtype``, in place, as
    ``from_pretrained(torch_dtype=dtype)`` would load them: in fp16 the modules a transformers
    model lists in ``_keep_in_fp32_modules`` (T5's ``wo`` projections, which overflow fp16)
    stay fp32."""
    keep = set(getattr(encoder, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()

    def kept(name: str) -> bool:
        return bool(keep) and any(part in keep for part in name.split(".")[:-1])

    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if p.is_floating_point() and p.dtype != dtype and not kept(name):
                p.data = p.data.to(dtype)
        for mod_name, m in encoder.named_modules():
            for name, b in list(m.named_buffers(recurse=False)):
                full = f"{mod_name}.{name}" if mod_name else name
                if b is not None and b.is_floating_point() and b.dtype != dtype and not kept(full):
                    m._buffers[name] = b.to(dtype)
    return encoder
