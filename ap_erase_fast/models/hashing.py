"""Content hash of a module's tensors: identifies base weights in caches and provenance."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping


def module_content_hash(module_or_state_dict) -> str:
    """sha256 hex over every tensor: sorted names, then per tensor its name, dtype, shape, bytes.

    Accepts an ``nn.Module`` (its ``state_dict()``, buffers included) or a mapping of name to
    tensor. Tensors on any device are copied to CPU; meta tensors cannot be hashed.
    """
    import torch

    if isinstance(module_or_state_dict, torch.nn.Module):
        state = module_or_state_dict.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        state = module_or_state_dict
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(module_or_state_dict).__name__}")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type == "meta":
            raise ValueError(f"cannot hash tensor {name!r}: it is on the meta device (no data)")
        t = t.detach()
        h.update(name.encode("utf-8"))
        h.update(b"\0")
        h.update(str(t.dtype).encode("ascii"))
        h.update(repr(tuple(t.shape)).encode("ascii"))
        h.update(b"\0")
        if t.numel():
            flat = t.to("cpu").contiguous().reshape(-1)
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()
