"""ShapesWorld: a procedural, seeded image world small enough to learn on a CPU.

One object per 32x32 RGB image: one of six shapes in one of six colours, with a random size,
position and rotation, on a grey background of random shade and slight tint. Drawing is
vectorised numpy with 2x supersampling (anti-aliased edges); the same seed gives the same images
on every machine. Captions come from a fixed set of templates, so the set of every caption the
model was trained on is known (:func:`all_captions`).
"""
from __future__ import annotations

import numpy as np

from ..models.vocab import load_vocabulary, register_vocabulary

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
SIZE = 32
_SS = 2  # supersampling factor
MIN_RADIUS, MAX_RADIUS = 7.0, 13.0
COLOUR_JITTER = 0.07

SHAPE_TEMPLATES = ("a {s}", "a photo of a {s}", "a picture of a {s}", "{s}", "a {s} shape")
COLOUR_SHAPE_TEMPLATES = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a picture of a {c} {s}",
    "a {c} {s} on a gray background",
    "{c} {s}",
)
# Caption mix during training: shape only / colour and shape / empty (classifier-free dropout).
P_SHAPE_ONLY, P_COLOUR_SHAPE = 0.35, 0.55


def _polygon_mask(px, py, verts):
    """Even-odd point-in-polygon test. px, py: [P]; verts: [n, V, 2] -> bool [n, P]."""
    x0 = verts[:, :, 0][:, :, None]
    y0 = verts[:, :, 1][:, :, None]
    x1 = np.roll(verts[:, :, 0], -1, axis=1)[:, :, None]
    y1 = np.roll(verts[:, :, 1], -1, axis=1)[:, :, None]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    inside = crosses & (px < xint)
    return (inside.sum(axis=1) % 2) == 1


def _regular_vertices(cx, cy, radius, theta, count, inner=None):
    """Vertices of a regular polygon (or a star when ``inner`` gives the inner radius ratio)."""
    n_v = count * (2 if inner is not None else 1)
    k = np.arange(n_v)
    ang = theta[:, None] - np.pi / 2 + 2 * np.pi * k[None, :] / n_v
    rad = np.broadcast_to(radius[:, None], ang.shape).copy()
    if inner is not None:
        rad[:, 1::2] *= inner
    return np.stack([cx[:, None] + rad * np.cos(ang), cy[:, None] + rad * np.sin(ang)], axis=-1)


def shape_masks(shape_idx, cx, cy, radius, theta, size=SIZE):
    """Coverage in [0, 1] of each object over a ``size`` x ``size`` grid, [n, size, size]."""
    n = len(shape_idx)
    g = (np.arange(size * _SS) + 0.5) / _SS
    py, px = np.meshgrid(g, g, indexing="ij")
    px, py = px.ravel(), py.ravel()
    dx = px[None, :] - cx[:, None]
    dy = py[None, :] - cy[:, None]
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    u, v = c * dx + s * dy, -s * dx + c * dy  # object frame
    r = radius[:, None]
    dist = np.sqrt(dx * dx + dy * dy)
    mask = np.zeros((n, px.size), dtype=bool)
    for si, name in enumerate(SHAPES):
        sel = shape_idx == si
        if not sel.any():
            continue
        if name == "circle":
            m = dist[sel] <= r[sel]
        elif name == "ring":
            m = (dist[sel] <= r[sel]) & (dist[sel] >= 0.58 * r[sel])
        elif name == "square":
            half = 0.8 * r[sel]
            m = (np.abs(u[sel]) <= half) & (np.abs(v[sel]) <= half)
        elif name == "cross":
            w = 0.34 * r[sel]
            au, av = np.abs(u[sel]), np.abs(v[sel])
            m = ((au <= w) & (av <= r[sel])) | ((av <= w) & (au <= r[sel]))
        elif name == "triangle":
            verts = _regular_vertices(cx[sel], cy[sel] + 0.2 * radius[sel], 1.1 * radius[sel], theta[sel], 3)
            m = _polygon_mask(px, py, verts)
        elif name == "star":
            verts = _regular_vertices(cx[sel], cy[sel], 1.1 * radius[sel], theta[sel], 5, inner=0.45)
            m = _polygon_mask(px, py, verts)
        else:  # pragma: no cover
            raise AssertionError(name)
        mask[sel] = m
    cov = mask.reshape(n, size, _SS, size, _SS).mean(axis=(2, 4))
    return cov.astype(np.float32)


def render(n, rng, shapes=None, colours=None):
    """``n`` images as float32 ``[n, 3, 32, 32]`` in ``[0, 1]`` plus shape and colour indices.

    ``rng``: a ``numpy.random.Generator`` (or an int seed). ``shapes`` / ``colours``: index
    arrays to draw (default: uniform).
    """
    rng = np.random.default_rng(rng)
    shape_idx = rng.integers(0, len(SHAPES), n) if shapes is None else np.broadcast_to(np.asarray(shapes), (n,))
    colour_idx = rng.integers(0, len(COLOURS), n) if colours is None else np.broadcast_to(np.asarray(colours), (n,))
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS, n)
    margin = radius + 1.0
    cx = rng.uniform(margin, SIZE - margin)
    cy = rng.uniform(margin, SIZE - margin)
    theta = rng.uniform(-0.25, 0.25, n)
    cov = shape_masks(np.asarray(shape_idx), cx, cy, radius, theta)
    base = np.array([COLOUR_RGB[COLOURS[i]] for i in range(len(COLOURS))], dtype=np.float32)
    fg = base[colour_idx] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (n, 3)).astype(np.float32)
    grey = rng.uniform(0.15, 0.85, (n, 1))
    bg = (grey + rng.uniform(-0.05, 0.05, (n, 3))).astype(np.float32)
    a = cov[:, None]
    img = a * fg[:, :, None, None] + (1 - a) * bg[:, :, None, None]
    img = img + rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), np.asarray(shape_idx).copy(), np.asarray(colour_idx).copy()


def caption(shape: str, colour: str, u: float, t: int) -> str:
    """The caption for one image: ``u`` in [0, 1) picks the kind, ``t`` the template."""
    if u < P_SHAPE_ONLY:
        return SHAPE_TEMPLATES[t % len(SHAPE_TEMPLATES)].format(s=shape)
    if u < P_SHAPE_ONLY + P_COLOUR_SHAPE:
        return COLOUR_SHAPE_TEMPLATES[t % len(COLOUR_SHAPE_TEMPLATES)].format(c=colour, s=shape)
    return ""


def all_captions() -> list[str]:
    """Every caption the training distribution can produce (the empty one last)."""
    out = [t.format(s=s) for s in SHAPES for t in SHAPE_TEMPLATES]
    out += [t.format(c=c, s=s) for s in SHAPES for c in COLOURS for t in COLOUR_SHAPE_TEMPLATES]
    return out + [""]


def distractor_words(count: int = 150) -> list[str]:
    """``count`` common English words that name no shape or colour of the world (every 15th of
    the built-in vocabulary, in its order): prompts the model never saw in training."""
    taken = set(SHAPES) | set(COLOURS) | {"shape", "photo", "picture", "gray", "grey", "background"}
    words = [w for w in load_vocabulary(None) if w not in taken]
    return words[::15][:count]


def shapes_vocabulary() -> list[str]:
    """The ShapesWorld preservation vocabulary: every non-empty training caption (210) plus
    150 distractor words."""
    return [c for c in all_captions() if c] + distractor_words()


register_vocabulary("shapes", shapes_vocabulary)


def labels_of(shape_idx, colour_idx):
    """The attribute labels of rendered images, as the classifier heads name them."""
    return {"shape": shape_idx, "colour": colour_idx}


def render_labelled(n, rng):
    """``(images, {"shape": ..., "colour": ...})``: :func:`render` in the form the trainer uses."""
    x, s, c = render(n, rng)
    return x, labels_of(s, c)


def draw_captions(labels, rng):
    """One training caption per image (``labels``: index arrays), drawn with ``rng``."""
    n = len(labels["shape"])
    u = rng.random(n)
    tt = rng.integers(0, 5, n)
    return [caption(SHAPES[int(s)], COLOURS[int(c)], float(uu), int(ti))
            for s, c, uu, ti in zip(labels["shape"], labels["colour"], u, tt)]
