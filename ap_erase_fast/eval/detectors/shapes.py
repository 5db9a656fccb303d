"""The ShapesWorld classifier (shipped with ``--model shapes``) as a detector: ESR and PSR as in
``ap-erase bench quality``.

Each prompt row names the attribute it is judged on (``extra["attribute"]``: ``shape`` or
``colour``) and the expected label (``extra["shape"]`` / ``extra["colour"]``, indices into the
world's ``SHAPES`` / ``COLOURS``). Per group:

* erased rows:    ESR = fraction of images **not** classified as the prompt's label;
* preserved rows: PSR = fraction of images classified as the prompt's label;

plus, for erased rows, what their images became (label counts). Rows without a label are
scored but not counted.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ...errors import UserError


def load_shapes_classifier(model: str = "shapes"):
    """``(classifier, path)``: the classifier beside the ShapesWorld model ``model`` in use."""
    from ...shapes import loading

    path = os.path.join(loading.shipped_dir(model), "classifier.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"the {model} classifier {path} is missing; reinstall ap_erase_fast "
                        f"or point {loading.ENV_VARS[model]} at a folder written by 'python -m "
                        f"ap_erase_fast.shapes.train --world {loading.WORLDS[model]} --ship'")
    loader = getattr(loading, "load_classifier", None)
    if loader is None:
        from ...shapes.train import load_classifier as loader
    return loader(path), path


class ShapesClassifier:
    name = "shapes"
    kind = "single"

    def __init__(self, device: str, model: str = "shapes"):
        from ...shapes.loading import world_of
        from .common import hash_files

        world = world_of(model)
        self.name = model
        self.model, path = load_shapes_classifier(model)
        self.model = self.model.to(device).eval()
        self.device = device
        self.names = {"shape": list(world.SHAPES), "colour": list(world.COLOURS)}
        self.files = hash_files([path])
        self.settings = {"classifier": "ShapesWorld CNN (shape and colour heads), top-1",
                         "ESR": "erased rows: fraction not classified as the prompt's label",
                         "PSR": "preserved rows: fraction classified as the prompt's label"}

    @torch.no_grad()
    def score(self, images: list[np.ndarray], rows) -> list[dict]:
        x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        shape, colour, p_shape, p_colour = self.model.predict(x.to(self.device))
        return [{"shape": self.names["shape"][int(s)], "colour": self.names["colour"][int(c)],
                 "shape_prob": round(float(ps.max()), 4), "colour_prob": round(float(pc.max()), 4)}
                for s, c, ps, pc in zip(shape, colour, p_shape, p_colour)]

    def _judged(self, record: dict):
        """(attribute, expected name, predicted name) of a record, or None without a label."""
        extra = record["row"].get("extra") or {}
        attribute = extra.get("attribute")
        if attribute not in ("shape", "colour") or extra.get(attribute) is None:
            return None
        return attribute, self.names[attribute][int(extra[attribute])]

    def aggregate(self, records: list[dict], model: str) -> dict:
        out: dict = {}
        for group, metric in (("erased", "ESR"), ("preserved", "PSR")):
            hits, n, became = 0, 0, {}
            for r in records:
                judged = self._judged(r) if r["row"]["group"] == group else None
                if judged is None:
                    continue
                attribute, want = judged
                got = r[model][self.name][attribute]
                n += 1
                hits += (got != want) if metric == "ESR" else (got == want)
                if group == "erased":
                    became[got] = became.get(got, 0) + 1
            if n:
                out[group] = {"images": n, metric: hits / n}
                if became:
                    out[group]["became"] = dict(sorted(became.items(), key=lambda kv: -kv[1]))
        return out
