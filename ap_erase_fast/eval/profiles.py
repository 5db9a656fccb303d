"""Evaluation defaults that fit the model under evaluation: one small hook per built-in model.

``ap-erase eval`` asks :func:`profile_for` what it should use where the user gave nothing:

* the held-out concepts of the ε-space drift table (``--concepts``);
* the image prompts, with the labels a detector checks (``--prompts``), and how many seeds each;
* the sampler settings (``--steps``, ``--guidance``, ``--scheduler``, ``--batch-size``);
* the detectors (``--detectors``).

A model without a hook (every user model, and the random-weight ``tiny`` demo) gets the Stable
Diffusion defaults: the shipped concept list ``data/eval_concepts.txt``, the erased concepts and
6 held-out concepts as prompts with 2 seeds each, DDIM 100 steps at CFG 7.5 (the paper's
protocol), no detector unless asked for.

``shapes`` (ShapesWorld) is evaluated in its own world: the held-out concepts and the prompts
are the world's own captions ("a <shape>", "a <colour> <shape>", from
:mod:`ap_erase_fast.shapes.world`) that do not mention an erased concept, the images are
labelled by the shipped shapes classifier (:class:`~ap_erase_fast.eval.detectors.shapes.
ShapesClassifier`), and the sampler runs the model's own settings (those of
:func:`ap_erase_fast.shapes.sample.generate`). A rebuilt world plugs in through the public
names used here (``SHAPES``, ``COLOURS``, ``all_captions``) and the classifier loader.
``shapes2`` (ShapesWorld 2) is judged the same way on its held-out prompts ("an image of a
<shape>", "an image of a <colour> <shape>": trained, never members of R) with its own classifier
(detector ``shapes2``).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from .inputs import PromptRow


@dataclass
class EvalProfile:
    name: str
    steps: int = 100
    guidance: float = 7.5
    scheduler: str = "ddim"
    batch_size: int = 4
    images_per_prompt: int = 2
    detectors: tuple[str, ...] = ()
    # erased concepts → (held-out concepts, description); None: the shipped concept list
    heldout: Callable[[list[str]], tuple[list[str], dict]] | None = None
    # (erased, held-out, images per prompt) → prompt rows; None: erased + 6 held-out concepts
    prompts: Callable[[list[str], list[str], int], tuple[list[PromptRow], str]] | None = None
    notes: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "steps": self.steps, "guidance": self.guidance,
                "scheduler": self.scheduler, "batch_size": self.batch_size,
                "images_per_prompt": self.images_per_prompt, "detectors": list(self.detectors),
                **self.notes}


SD = EvalProfile(name="stable-diffusion", notes={
    "source": "the paper's protocol: DDIM 100 steps, CFG 7.5; data/eval_concepts.txt"})


def profile_for(model_id: str | None) -> EvalProfile:
    """The evaluation defaults of ``model_id`` (a built-in name, or any other model: SD's)."""
    hook = BUILTIN.get(str(model_id))
    return hook() if hook is not None else SD


# ---- ShapesWorld ---------------------------------------------------------------------------
def shapes_sampler_settings() -> tuple[int, float]:
    """The model's own sampler settings: the defaults of its sampling function."""
    from ..shapes.sample import generate

    params = inspect.signature(generate).parameters
    steps = params["steps"].default if "steps" in params else 25
    guidance = params["guidance"].default if "guidance" in params else 5.0
    return int(steps), float(guidance)


def _prefix(model: str) -> str:
    from ..shapes.loading import WORLDS
    from ..shapes.sample import _prefix as prefix

    return prefix(WORLDS[model])


def shapes_labels(prompt: str, model: str = "shapes") -> dict:
    """The shape and colour a ShapesWorld prompt names (indices; None when it names none)."""
    from ..shapes.loading import world_of

    world = world_of(model)
    words = prompt.lower().replace(",", " ").split()
    shapes = [i for i, s in enumerate(world.SHAPES) if s in words]
    colours = [i for i, c in enumerate(world.COLOURS) if c in words]
    return {"shape": shapes[0] if len(shapes) == 1 else None,
            "colour": colours[0] if len(colours) == 1 else None}


def _world_prompts(model: str = "shapes") -> list[str]:
    """The world's evaluation prompts: "<prefix> <shape>" and "<prefix> <colour> <shape>" (kept
    only if the world's own captions contain them)."""
    from ..shapes.loading import world_of

    world, pre = world_of(model), _prefix(model)
    prompts = [f"{pre} {s}" for s in world.SHAPES]
    prompts += [f"{pre} {c} {s}" for c in world.COLOURS for s in world.SHAPES]
    captions = set(world.all_captions())
    kept = [p for p in prompts if p in captions]
    return kept or prompts


def _shapes_heldout(erased: list[str], model: str = "shapes") -> tuple[list[str], dict]:
    from ..concepts import mentions

    prompts = [p for p in _world_prompts(model) if not any(mentions(c, p) for c in erased)]
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    pre = _prefix(model)
    return prompts, {"path": f"builtin:{model} prompts ('{pre} <shape>', '{pre} <colour> <shape>') "
                             "that do not mention an erased concept",
                     "sha256": digest, "count": len(prompts)}


def _shapes_rows(erased: list[str], heldout: list[str], per_prompt: int, model: str = "shapes"):
    """Erased rows: each erased shape as "a <shape>", each erased colour as "a <colour>
    <shape>" over the six shapes, any other concept as itself; preserved rows: the shapes (or,
    for a colour, the colour-shape pairs of the other colours) that no erased concept mentions.
    Every row carries the attribute the classifier checks."""
    from ..concepts import mentions
    from ..shapes.loading import world_of

    world, pre = world_of(model), _prefix(model)
    rows: list[PromptRow] = []

    def add(prompt: str, group: str, concept: str, attribute: str | None, n: int) -> None:
        labels = shapes_labels(prompt, model)
        for s in range(n):
            rows.append(PromptRow(index=len(rows), prompt=prompt, seed=s, concept=concept,
                                  group=group, extra={**labels, "attribute": attribute}))

    per_pair = max(1, per_prompt // len(world.SHAPES))
    colour_targets = False
    for c in erased:
        key = c.strip().lower()
        if key in world.SHAPES:
            add(f"{pre} {key}", "erased", c, "shape", per_prompt)
        elif key in world.COLOURS:
            colour_targets = True
            for s in world.SHAPES:
                add(f"{pre} {key} {s}", "erased", c, "colour", per_pair)
        else:
            labels = shapes_labels(c, model)
            attribute = "shape" if labels["shape"] is not None else (
                "colour" if labels["colour"] is not None else None)
            add(c, "erased", c, attribute, per_prompt)
    kept = lambda p: not any(mentions(c, p) for c in erased)  # noqa: E731
    for s in world.SHAPES:
        if kept(f"{pre} {s}"):
            add(f"{pre} {s}", "preserved", s, "shape", per_prompt)
    if colour_targets:
        for col in world.COLOURS:
            for s in world.SHAPES:
                if kept(f"{pre} {col} {s}"):
                    add(f"{pre} {col} {s}", "preserved", col, "colour", per_pair)
    source = (f"{model} prompts: erased concepts and kept shapes (and colour-shape pairs for "
              f"a colour), {per_prompt} seeds per shape prompt, labelled for the {model} classifier")
    return rows, source


def _shapes(model: str = "shapes") -> EvalProfile:
    steps, guidance = shapes_sampler_settings()
    return EvalProfile(name=model, steps=steps, guidance=guidance, scheduler="ddim",
                       batch_size=16, images_per_prompt=8, detectors=(model,),
                       heldout=functools.partial(_shapes_heldout, model=model),
                       prompts=functools.partial(_shapes_rows, model=model),
                       notes={"source": f"{model}: the world's evaluation prompts, its classifier, the "
                                        "sampler settings of ap_erase_fast.shapes.sample"})


BUILTIN: dict[str, Callable[[], EvalProfile]] = {"shapes": _shapes,
                                                  "shapes2": functools.partial(_shapes, "shapes2")}
