"""Batched DDIM sampling with classifier-free guidance, and prompt-following scores, for the
ShapesWorld model (any diffusers UNet / CLIP text encoder / VAE triple works)."""
from __future__ import annotations

import torch

from ..concepts import encode_prompts


def _world(world):
    from .nets import world_module

    return world_module(world)


def _prefix(world):
    """The prompt prefix of evaluation prompts: "a" in ShapesWorld 1, the held-out "an image of
    a" in ShapesWorld 2 (trained, never a member of R)."""
    return "a" if world == 1 else _world(world).EVAL_PREFIX


def labelled(rows):
    """``(prompts, seeds, shape index tensor, colour index tensor)`` from rows of
    ``(prompt, seed, shape index, colour index or -1)``."""
    rows = list(rows)
    return ([r[0] for r in rows], [r[1] for r in rows], torch.tensor([r[2] for r in rows]),
            torch.tensor([r[3] for r in rows]))


def shape_rows(per_shape: int, seed_of, world: int = 1):
    """'<prefix> <shape>' rows, shape by shape; ``seed_of(shape_index, j)`` gives the j-th seed."""
    w, pre = _world(world), _prefix(world)
    for si, s in enumerate(w.SHAPES):
        for j in range(per_shape):
            yield f"{pre} {s}", seed_of(si, j), si, -1


def pair_rows(per_pair: int, seed_of, colour_major: bool = False, world: int = 1):
    """'<prefix> <colour> <shape>' rows for every pair; ``seed_of(shape_index, colour_index, j)``."""
    w, pre = _world(world), _prefix(world)
    pairs = [(si, ci) for si in range(len(w.SHAPES)) for ci in range(len(w.COLOURS))]
    if colour_major:
        pairs.sort(key=lambda p: (p[1], p[0]))
    for si, ci in pairs:
        for j in range(per_pair):
            yield f"{pre} {w.COLOURS[ci]} {w.SHAPES[si]}", seed_of(si, ci, j), si, ci


@torch.no_grad()
def generate(
    unet,
    text_encoder,
    tokenizer,
    vae,
    scheduler_config,
    prompts,
    seeds,
    *,
    steps: int = 25,
    guidance: float = 5.0,
    batch_size: int = 64,
):
    """Images in [0, 1], ``[len(prompts), 3, H, W]``; image ``i`` starts from noise seeded by
    ``seeds[i]``, so the same (prompt, seed) gives the same image whatever the batching."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is needed")
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(dict(scheduler_config))
    sched.set_timesteps(steps)
    out = []
    uncond_all = encode_prompts(text_encoder, tokenizer, [""]).to(dtype)
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i : i + batch_size])
        b = len(p)
        cond = encode_prompts(text_encoder, tokenizer, p).to(dtype)
        ctx = torch.cat([uncond_all.expand(b, -1, -1), cond])
        z = torch.stack(
            [
                torch.randn(unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(int(s)))
                for s in seeds[i : i + batch_size]
            ]
        ).to(device=device, dtype=dtype)
        for t in sched.timesteps:
            eps_u, eps_c = unet(torch.cat([z, z]), t, ctx).sample.chunk(2)
            z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
        x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
        out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def prompt_following(components, classifier, *, per_shape: int = 32, per_pair: int = 8, seed: int = 0,
                     world: int = 1, **kw):
    """Fraction of "<prefix> <shape>" images classified as that shape (per shape), and shape /
    colour / both accuracy on "<prefix> <colour> <shape>" images over every pair (and, per colour,
    the colour accuracy). The prefix is "a" in ShapesWorld 1 and "an image of a" in ShapesWorld 2."""
    unet, text_encoder, tokenizer, vae, sched_cfg = components
    w = _world(world)
    base = seed * 1_000_003
    prompts, seeds, want_s, want_c = labelled([
        *shape_rows(per_shape, lambda si, j: base + si * 1000 + j, world=world),
        *pair_rows(per_pair, lambda si, ci, j: base + 500_000 + si * 10_000 + ci * 100 + j, world=world),
    ])
    images = generate(unet, text_encoder, tokenizer, vae, sched_cfg, prompts, seeds, **kw)
    ps, pc, _, _ = classifier.predict(images)
    shape_only = want_c < 0
    per = {}
    for si, s in enumerate(w.SHAPES):
        m = shape_only & (want_s == si)
        per[s] = float((ps[m] == si).float().mean())
    pair = ~shape_only
    ok_s = ps[pair] == want_s[pair]
    ok_c = pc[pair] == want_c[pair]
    per_colour = {c: float(ok_c[want_c[pair] == ci].float().mean()) for ci, c in enumerate(w.COLOURS)}
    return {
        "prompts": {"shape": f"{_prefix(world)} <shape>",
                    "pair": f"{_prefix(world)} <colour> <shape>"},
        "colour_prompts": per_colour,
        "colour_min": min(per_colour.values()),
        "shape_prompts": per,
        "shape_mean": sum(per.values()) / len(per),
        "shape_min": min(per.values()),
        "pair_shape": float(ok_s.float().mean()),
        "pair_colour": float(ok_c.float().mean()),
        "pair_both": float((ok_s & ok_c).float().mean()),
        "images": {"per_shape": per_shape, "per_pair": per_pair, "seed": seed},
    }, images
