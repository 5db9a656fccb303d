"""What the shapes worlds expose to the quality instrument: the built-in model, its VAE and text
encoder and the shipped classifier loaded once (:class:`World`), the evaluation prompts of a
target (paired across methods by their fixed seeds), and the oracle's preservation set. The
worlds themselves (shapes, colours, captions) are :mod:`ap_erase_fast.shapes`."""
from __future__ import annotations

import copy
import dataclasses
import os

from ..shapes.loading import WORLDS, world_of

EVAL_STEPS, EVAL_GUIDANCE = 25, 5.0


class World:
    """The base model, its text encoder and VAE, and the classifier, loaded once."""

    def __init__(self, model: str = "shapes"):
        from ..models import load_components
        from ..shapes.loading import shipped_dir
        from ..shapes.train import load_classifier

        self.model = model
        self.comps = load_components(model)
        self.base_unet = self.comps.unet
        self.classifier = load_classifier(os.path.join(shipped_dir(model), "classifier.safetensors"))

    def components_for_run(self):
        """A components object whose UNet is a fresh copy of the base (the engine trains it)."""
        return dataclasses.replace(self.comps, unet=copy.deepcopy(self.base_unet))

    def generate(self, unet, prompts, seeds, steps: int = EVAL_STEPS):
        from ..shapes.sample import generate

        c = self.comps
        return generate(unet, c.text_encoder, c.tokenizer, c.vae, c.scheduler.config, prompts, seeds,
                        steps=steps, guidance=EVAL_GUIDANCE)


def eval_prompts(target: str, images: int, seed: int, model: str = "shapes"):
    """(prompts, seeds, shape index, colour index or -1) of the evaluation of ``target``: the
    world's evaluation prompts ('a <shape>' in ShapesWorld; the held-out 'an image of a <shape>'
    in ShapesWorld 2), ``images`` per shape, or per colour spread over the colour-shape pairs."""
    from ..shapes.sample import labelled, pair_rows, shape_rows

    w, n = world_of(model), WORLDS[model]
    base = 7_919 * (seed + 1) * 100_000
    if target in w.SHAPES:
        return labelled(shape_rows(images, lambda si, j: base + si * 1_000 + j, world=n))
    per_pair = max(1, images // len(w.SHAPES))
    return labelled(pair_rows(per_pair, lambda si, ci, j: base + 50_000 + ci * 1_000 + si * 100 + j,
                              colour_major=True, world=n))


def oracle_set(model: str, target: str, near: list[str]) -> list[str]:
    """The oracle's R: training captions of the near concepts (members of the vocabulary, never
    evaluation prompts): 'a <shape>' per near shape, 'a <colour> <shape>' over every shape per
    near colour."""
    w = world_of(model)
    if target in w.SHAPES:
        return [f"a {s}" for s in near]
    return [f"a {c} {s}" for c in near for s in w.SHAPES]
