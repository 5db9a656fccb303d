"""Judging an attack: images generated from text-encoder states (a plain prompt, an adversarial
one, or one with a learned embedding) by the base or the erased model, the world's classifier
on them, and rates with their 95 % intervals.

Images come from the model's own diffusers pipeline (:func:`ap_erase_fast.eval.generate.
build_pipelines`, the one ``ap-erase eval`` uses), given ``prompt_embeds`` so that what is judged
is exactly the conditioning that was attacked; every image ``i`` starts from
``torch.Generator("cpu").manual_seed(seeds[i])``, so base, erased and attacked images of a seed
share their initial noise. The classifier is ``ap-erase eval``'s ``shapes`` / ``shapes2``
detector; outside a shapes world an ``ap-erase eval`` detector judges instead when one is chosen
(``--detectors``, :mod:`.sdjudge`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

Z95 = 1.959963984540054


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(labels: list[str], want: str) -> dict:
    """Share of ``labels`` equal to ``want``, with its Wilson 95 % interval."""
    hits, n = sum(lab == want for lab in labels), len(labels)
    lo, hi = wilson(hits, n)
    return {"hits": hits, "images": n, "rate": hits / n if n else None,
            "ci95": [round(lo, 4), round(hi, 4)], "interval": "wilson"}


class UnetCounter:
    """Per-sample forward passes of some UNets (forward pre-hooks; a CFG step counts 2)."""

    def __init__(self, *modules):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in set(modules)]

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample")
        self.n += int(x.shape[0]) if x is not None else 0

    def close(self):
        for h in self.handles:
            h.remove()


class Judge:
    """Pipelines of the base and the erased model, and the classifier (in a shapes world) or an
    ``ap-erase eval`` detector (:class:`.sdjudge.DetectorJudge`) that judges their images."""

    def __init__(self, comps, erased_unet, *, steps: int, guidance: float, batch_size: int,
                 resolution: int, device: str, classifier_model: str | None, detector=None):
        from ..eval.generate import build_pipelines

        self.pipes = build_pipelines(comps, erased_unet, "ddim")
        self.steps, self.guidance, self.batch_size = steps, guidance, batch_size
        self.resolution = resolution
        self.detector = detector
        self.classifier = None
        if classifier_model is not None:
            from ..eval.detectors.shapes import ShapesClassifier

            self.classifier = ShapesClassifier(device, model=classifier_model)

    def settings(self) -> dict:
        out = {"library": f"diffusers.{type(self.pipes['base']).__name__}", "scheduler": "ddim",
               "steps": self.steps, "guidance_scale": self.guidance, "resolution": self.resolution,
               "negative_prompt": "", "eta": 0.0,
               "seed": "per image, torch.Generator('cpu').manual_seed(seed)"}
        if self.classifier is not None:
            out["classifier"] = {"name": self.classifier.name, "files": self.classifier.files,
                                 "judged": "top-1 shape of the shape head"}
        if self.detector is not None:
            out["detector"] = self.detector.settings()
        return out

    @property
    def rate_is(self) -> str:
        """What a rate is the share of (the report's ``judge.rate``)."""
        if self.detector is not None:
            return self.detector.rule
        return "share of images the classifier labels as the erased shape"

    def rate_of(self, images: list[np.ndarray], want) -> dict:
        """The rate of ``images`` (hits, images, Wilson 95 %): with a detector, the share it
        judges a hit for ``want``; else the share the shapes classifier labels ``want``."""
        if self.detector is not None:
            return rate(self.detector.hits(images, want), True)
        return rate(self.shapes(images), want)

    @torch.no_grad()
    def generate(self, key: str, states: torch.Tensor, uncond: torch.Tensor, seeds: list[int],
                 output_type: str = "np", on_step=None):
        """Images (uint8 [H, W, 3] list) or latents (``output_type="latent"``: a [N, C, h, w]
        tensor) of ``self.pipes[key]`` for the text ``states`` ([1, L, D], one per seed)."""
        out = []
        extra = {}
        if on_step is not None:
            def callback(pipeline, step, timestep, tensors):
                on_step()
                return tensors

            extra["callback_on_step_end"] = callback
        for lo in range(0, len(seeds), self.batch_size):
            batch = seeds[lo:lo + self.batch_size]
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in batch]
            res = self.pipes[key](
                prompt_embeds=states.expand(len(batch), -1, -1),
                negative_prompt_embeds=uncond.expand(len(batch), -1, -1),
                height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                guidance_scale=self.guidance, eta=0.0, generator=gens, output_type=output_type, **extra)
            if output_type == "latent":
                out.append(res.images)
            else:
                imgs = np.asarray(res.images)
                out += [np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8) for img in imgs]
        return torch.cat(out) if output_type == "latent" else out

    def shapes(self, images: list[np.ndarray]) -> list[str]:
        """The classifier's shape of each image."""
        labels = []
        for lo in range(0, len(images), 256):
            labels += [s["shape"] for s in self.classifier.score(images[lo:lo + 256], None)]
        return labels


def save_grid(rows: list[tuple[str, list[np.ndarray]]], path, cell: int = 96) -> None:
    """One row of images per (label, images): base / erased / attacked, a seed per column."""
    from PIL import Image, ImageDraw

    label_w = 110
    cols = max(len(imgs) for _, imgs in rows)
    grid = Image.new("RGB", (label_w + cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, imgs) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, img in enumerate(imgs):
            pil = Image.fromarray(img)
            resample = Image.NEAREST if max(pil.size) < cell else Image.BICUBIC
            grid.paste(pil.resize((cell, cell), resample), (label_w + c * cell, r * cell))
    grid.save(path, format="PNG")
