"""Shared helpers: locating weight files, hashing them, and image preprocessing without
torchvision (PIL resizes, numpy/torch normalisation)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError
from ..inputs import file_sha256


def require_folder(weights_dir: str, sub: str, what: str, expect: str) -> Path:
    folder = Path(weights_dir) / sub
    if not folder.is_dir():
        raise UserError(f"{what} weights not found: {folder} does not exist; put {expect} there "
                        f"(or pass --weights DIR holding '{sub}/')")
    return folder


def find_file(folder: Path, names: tuple[str, ...], what: str, expect: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{what} weights not found in {folder}: expected {' or '.join(names)} ({expect})")


def hash_files(paths) -> dict[str, str]:
    return {str(p): file_sha256(p) for p in paths}


def load_state_dict(path: Path) -> dict:
    """A state dict from .safetensors or a torch file (``weights_only=True``: tensors only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read weights {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights {path} do not hold a state dict")
    return state


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".pth", ".pt"))


def resize_center_crop(images: list[np.ndarray], size: int, shortest_edge: int) -> np.ndarray:
    """Resize each RGB uint8 image so its short side is ``shortest_edge`` (bicubic), then take the
    central ``size``×``size`` crop. Returns float32 [N, 3, size, size] in [0, 1]."""
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(img)
        w, h = pil.size
        scale = shortest_edge / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        pil = pil.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
        out.append(np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out)


def normalise(x: np.ndarray, mean, std, device) -> torch.Tensor:
    t = torch.from_numpy(x)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((t - m) / s).to(device)


def env_path(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None
