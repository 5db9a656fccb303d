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
        # shapes2-flow: comps.unet is an SD3 transformer (velocity), sampled by its Euler sampler
        self.flow = self.comps.family in ("sd3", "flux")
        self.base_unet = self.comps.unet
        self.classifier = load_classifier(os.path.join(shipped_dir(model), "classifier.safetensors"))

    def components_for_run(self):
        """A components object whose UNet is a fresh copy of the base (the engine trains it)."""
        return dataclasses.replace(self.comps, unet=copy.deepcopy(self.base_unet))

    def generate(self, unet, prompts, seeds, steps: int = EVAL_STEPS):
        """Images in [0, 1] of ``prompts`` by the denoiser ``unet`` (the base or an erased copy):
        DDIM for the UNet worlds, the SD3 pipeline's flow sampler for shapes2-flow; the same
        guidance and seeds either way."""
        from ..shapes.sample import generate

        c = self.comps
        if self.flow:
            import torch

            from ..shapes.flow_nets import decode, denoise

            mods = {"transformer": unet, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2,
                    "text_encoder_3": c.text_encoder_3}
            tokenizers = {"tokenizer": c.tokenizer, "tokenizer_2": c.tokenizer_2, "tokenizer_3": c.tokenizer_3}
            with torch.no_grad():
                z = denoise(mods, tokenizers, dict(c.scheduler.config), prompts, seeds, steps=steps,
                            guidance=EVAL_GUIDANCE)
                return torch.cat([decode(c.vae, z[i:i + 256]) for i in range(0, len(z), 256)])
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
