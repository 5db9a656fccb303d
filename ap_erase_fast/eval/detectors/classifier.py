"""ResNet-50 ImageNet classifier (transformers ``ResNetForImageClassification``, no torchvision)
and the object-erasure rates of the paper (ESR/PSR, as ESD and AP report them).

For images whose prompt row has a ``class`` (an ImageNet index or a label name):

* ESR-k (erased rows)    = fraction of images whose class is **not** in the top-k predictions;
* PSR-k (preserved rows) = fraction of images whose class **is** in the top-k predictions;

for k = 1 and 5. Preprocessing: short side resized to 256 (bicubic), central 224 crop, ImageNet
mean/std — the ``microsoft/resnet-50`` image-processor settings.

Weights: ``DIR/resnet50/`` with ``model.safetensors`` (or ``pytorch_model.bin``) and normally the
``config.json`` of the same model (e.g. a copy of the ``microsoft/resnet-50`` hub folder). Without a
config the shipped ResNet-50 architecture (``data/eval_resnet50_config.json``) is used, and class
names must then be given as indices. Label names come from the folder's ``config.json``
(``id2label``); the library ships no ImageNet class list.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import UserError
from .common import find_file, hash_files, load_state_dict, model_files, normalise, require_folder, resize_center_crop

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "data" / "eval_resnet50_config.json"
EXPECT = ("a transformers ResNetForImageClassification folder (config.json + model.safetensors), "
          "e.g. the files of the hub model microsoft/resnet-50")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResNetClassifier:
    name = "resnet50"
    kind = "single"

    def __init__(self, weights_dir: str, device: str):
        from transformers import ResNetConfig, ResNetForImageClassification

        folder = require_folder(weights_dir, "resnet50", "ResNet-50", EXPECT)
        weights = find_file(folder, ("model.safetensors", "pytorch_model.bin"), "ResNet-50", EXPECT)
        cfg_path = folder / "config.json"
        cfg_dict = json.loads((cfg_path if cfg_path.is_file() else SHIPPED_CONFIG).read_text())
        config = ResNetConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
        model = ResNetForImageClassification(config)
        state = load_state_dict(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "num_batches_tracked" not in k]
        if missing or unexpected:
            raise UserError(f"ResNet weights {weights} do not match the model in "
                            f"{cfg_path if cfg_path.is_file() else SHIPPED_CONFIG}: "
                            f"{len(missing)} missing, {len(unexpected)} unexpected tensors")
        self.model = model.to(device).eval()
        self.device = device
        labels = cfg_dict.get("id2label") if cfg_path.is_file() else None
        self.id2label = {int(k): str(v) for k, v in labels.items()} if labels else {}
        self.num_labels = int(config.num_labels)
        self.files = hash_files(model_files(folder))
        self.settings = {"architecture": "ResNetForImageClassification",
                         "config": str(cfg_path if cfg_path.is_file() else "builtin:data/eval_resnet50_config.json"),
                         "num_labels": self.num_labels, "preprocess": "short side 256 bicubic, center crop 224, ImageNet mean/std",
                         "topk": [1, 5]}

    def class_index(self, cls: str) -> int:
        text = str(cls).strip()
        if text.lstrip("-").isdigit():
            idx = int(text)
            if not 0 <= idx < self.num_labels:
                raise UserError(f"class index {idx} is outside the classifier's {self.num_labels} labels")
            return idx
        want = " ".join(text.lower().replace("_", " ").split())
        for idx, label in self.id2label.items():
            names = [" ".join(n.lower().replace("_", " ").split()) for n in label.split(",")]
            if want in names:
                return idx
        if not self.id2label:
            raise UserError(f"class {text!r}: the ResNet folder has no config.json with id2label, so "
                            f"classes must be ImageNet indices")
        raise UserError(f"class {text!r} is not an ImageNet label of the classifier (see id2label "
                        f"in its config.json); use the label or its index")

    def prepare(self, rows) -> None:
        if not any(r.cls for r in rows):
            raise UserError("the resnet50 detector needs a 'class' column in the prompt CSV "
                            "(ImageNet label or index per prompt)")
        self._targets = {r.index: self.class_index(r.cls) for r in rows if r.cls}

    @torch.no_grad()
    def score(self, images, rows) -> list[dict]:
        x = normalise(resize_center_crop(images, 224, 256), MEAN, STD, self.device)
        logits = self.model(pixel_values=x).logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
        out = []
        for row, top in zip(rows, top5):
            rec = {"top5": top}
            target = self._targets.get(row.index)
            if target is not None:
                rec.update(target=target, top1_hit=top[0] == target, top5_hit=target in top)
            out.append(rec)
        return out

    def aggregate(self, records: list[dict], model: str) -> dict:
        out = {}
        for group in ("erased", "preserved", "all"):
            recs = [r[model]["resnet50"] for r in records if r["row"]["group"] == group and "target" in r[model]["resnet50"]]
            if not recs:
                continue
            n = len(recs)
            acc1 = sum(r["top1_hit"] for r in recs) / n
            acc5 = sum(r["top5_hit"] for r in recs) / n
            if group == "erased":
                out[group] = {"images": n, "ESR-1": 1 - acc1, "ESR-5": 1 - acc5}
            elif group == "preserved":
                out[group] = {"images": n, "PSR-1": acc1, "PSR-5": acc5}
            else:
                out[group] = {"images": n, "top1_accuracy": acc1, "top5_accuracy": acc5}
        return out
