"""LPIPS (Zhang et al. 2018), version 0.1, AlexNet backbone — the variant the authors use
(``lpips.LPIPS(net='alex')``) — written in plain torch so that torchvision is not needed.

    LPIPS(x, y) = Σ_l mean_{h,w} ( w_l · ( n(f_l(x)) − n(f_l(y)) )² )

x, y are RGB in [−1, 1], shifted and scaled by LPIPS' ScalingLayer; f_l are the outputs of the
five ReLUs of AlexNet's ``features`` (after conv1..conv5); n() divides each spatial position by its
channel L2 norm (+1e−10); w_l ≥ 0 are the learned 1×1 linear weights of LPIPS v0.1.

Files (``DIR/lpips/``), read with ``torch.load(weights_only=True)`` or safetensors:

* ``alexnet.pth``: torchvision's ImageNet AlexNet state dict (``alexnet-owt-7be5be79.pth``; only
  the ``features.*`` tensors are used);
* ``alex.pth``: the LPIPS v0.1 linear layers (``lpips/weights/v0.1/alex.pth`` of the lpips package,
  keys ``lin0.model.1.weight`` … ``lin4.model.1.weight``).

Images smaller than 64 px are upsampled (bilinear) to 64 px first: AlexNet's pooling needs that
size (the tiny model's 16-px images); real models' images are used at their own size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserError
from .common import find_file, hash_files, load_state_dict, require_folder

EXPECT_BACKBONE = ("torchvision's AlexNet ImageNet weights, alexnet-owt-7be5be79.pth from "
                   "download.pytorch.org/models/, saved as alexnet.pth")
EXPECT_LIN = "the LPIPS v0.1 linear weights, lpips/weights/v0.1/alex.pth from the lpips package"
# (conv index in AlexNet.features, in, out, kernel, stride, padding); a ReLU follows each conv and
# max-pool(3, 2) precedes conv 3 and conv 6 (features indices as torchvision numbers them)
ALEX_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
              (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 64


class LPIPSMetric:
    name = "lpips"
    kind = "pair"  # compares the base and erased images of the same row

    def __init__(self, weights_dir: str, device: str):
        folder = require_folder(weights_dir, "lpips", "LPIPS", f"alexnet.pth ({EXPECT_BACKBONE}) and alex.pth ({EXPECT_LIN})")
        backbone = find_file(folder, ("alexnet.pth", "alexnet-owt-7be5be79.pth", "alexnet.safetensors"),
                             "LPIPS backbone", EXPECT_BACKBONE)
        lin = find_file(folder, ("alex.pth", "alex.safetensors"), "LPIPS linear layers", EXPECT_LIN)
        feats = load_state_dict(backbone)
        lins = load_state_dict(lin)
        self.convs = []
        for idx, cin, cout, *_ in ALEX_CONVS:
            w, b = feats.get(f"features.{idx}.weight"), feats.get(f"features.{idx}.bias")
            if w is None or b is None or tuple(w.shape) != (cout, cin, *w.shape[2:]):
                raise UserError(f"{backbone} is not a torchvision AlexNet state dict (features.{idx}.weight "
                                f"missing or of the wrong shape)")
            self.convs.append((w.float().to(device), b.float().to(device)))
        self.lins = []
        for i, (_, _, cout, *_) in enumerate(ALEX_CONVS):
            w = lins.get(f"lin{i}.model.1.weight")
            if w is None or tuple(w.shape) != (1, cout, 1, 1):
                raise UserError(f"{lin} is not an LPIPS v0.1 AlexNet linear-layer file (lin{i}.model.1.weight "
                                f"missing or not of shape (1, {cout}, 1, 1))")
            self.lins.append(w.float().to(device))
        self.device = device
        self.files = hash_files([backbone, lin])
        self.settings = {"version": "0.1", "net": "alex", "implementation": "ap_erase_fast (plain torch)",
                         "min_size": MIN_SIZE, "input": "RGB in [-1, 1]"}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        shift = torch.tensor(SHIFT, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(SCALE, device=x.device).view(1, 3, 1, 1)
        h = (x - shift) / scale
        out = []
        for i, ((w, b), (_, _, _, _, stride, pad)) in enumerate(zip(self.convs, ALEX_CONVS)):
            if i in (1, 2):
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            h = F.relu(F.conv2d(h, w, b, stride=stride, padding=pad))
            out.append(h)
        return out

    @torch.no_grad()
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS between batches x, y [N, 3, H, W] in [−1, 1]; returns [N]."""
        if min(x.shape[-2:]) < MIN_SIZE:
            size = (max(MIN_SIZE, x.shape[-2]), max(MIN_SIZE, x.shape[-1]))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        total = torch.zeros(x.shape[0], device=x.device)
        for fx, fy, w in zip(self.features(x), self.features(y), self.lins):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += F.conv2d((nx - ny) ** 2, w).mean((1, 2, 3))
        return total

    def to_tensor(self, images) -> torch.Tensor:
        arr = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        return torch.from_numpy(arr).to(self.device)

    def pair_score(self, base_images, erased_images) -> list[dict]:
        d = self.distance(self.to_tensor(base_images), self.to_tensor(erased_images))
        return [{"score": float(v)} for v in d.tolist()]

    def aggregate(self, records: list[dict], model: str = "pair") -> dict:
        out = {}
        for group in ("erased", "preserved", "all"):
            vals = [r["pair"]["lpips"]["score"] for r in records if r["row"]["group"] == group]
            if vals:
                out[group] = {"images": len(vals), "lpips": sum(vals) / len(vals)}
        return out
