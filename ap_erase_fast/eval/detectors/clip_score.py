"""CLIP score of each image with its own prompt, as torchmetrics' ``CLIPScore`` (the authors'
tool) defines it: 100 · max(cos(E_image, E_text), 0).

Weights: ``DIR/clip/``, a transformers ``CLIPModel`` folder (``config.json`` +
``model.safetensors``). The authors' artist evaluation uses ``openai/clip-vit-base-patch32``;
copy that hub folder (or another CLIP) there: its files are recorded by hash in the report.
The tokenizer is read from that folder when it holds one, else the vendored CLIP BPE tokenizer
(the same vocabulary as OpenAI CLIP) is used. Image preprocessing without torchvision: short side
resized to the model's image size (bicubic), central crop, mean/std from the folder's
``preprocessor_config.json`` or CLIP's defaults.
"""
from __future__ import annotations

import json

import torch

from ...errors import UserError
from .common import find_file, hash_files, model_files, normalise, require_folder, resize_center_crop

EXPECT = ("a transformers CLIPModel folder (config.json + model.safetensors, tokenizer files "
          "optional), e.g. the files of the hub model openai/clip-vit-base-patch32")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class ClipScorer:
    name = "clip"
    kind = "single"

    def __init__(self, weights_dir: str, device: str):
        from transformers import CLIPModel

        folder = require_folder(weights_dir, "clip", "CLIP", EXPECT)
        find_file(folder, ("config.json",), "CLIP", EXPECT)
        find_file(folder, ("model.safetensors", "pytorch_model.bin"), "CLIP", EXPECT)
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot load CLIP from {folder}: {str(exc).splitlines()[0]}") from None
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            tok_source = str(folder)
        else:
            from ...models.tokenizer import build_clip_tokenizer

            self.tokenizer = build_clip_tokenizer()
            tok_source = "builtin:models/assets/bpe_simple_vocab_16e6.txt.gz"
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        self.mean, self.std = mean, std
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.device = device
        self.files = hash_files(model_files(folder))
        self.settings = {"score": "100 * max(cos(image, text), 0)", "image_size": self.image_size,
                         "tokenizer": tok_source, "mean": list(mean), "std": list(std),
                         "text": "the row's prompt"}

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """CLIP image embeddings [N, D] (float32, not normalised) of RGB uint8 images."""
        x = normalise(resize_center_crop(images, self.image_size, self.image_size), self.mean, self.std, self.device)
        img = self.model.get_image_features(pixel_values=x)
        return getattr(img, "pooler_output", img).float()

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        """CLIP text embeddings [N, D] (float32, not normalised) of ``texts``."""
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt").input_ids.to(self.device)
        txt = self.model.get_text_features(input_ids=ids)
        return getattr(txt, "pooler_output", txt).float()

    def score(self, images, rows) -> list[dict]:
        img, txt = self.image_features(images), self.text_features([r.prompt for r in rows])
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return [{"score": float(v)} for v in (100 * cos.clamp(min=0)).tolist()]

    def aggregate(self, records: list[dict], model: str) -> dict:
        out = {}
        for group in ("erased", "preserved", "all"):
            vals = [r[model]["clip"]["score"] for r in records if r["row"]["group"] == group]
            if vals:
                out[group] = {"images": len(vals), "clip_score": sum(vals) / len(vals)}
        return out
