"""Black-box attack (Ring-A-Bell-style): only the text encoder is used, no UNet gradient.

1. **Concept direction.** ``c = mean_i [f(P_i with the concept) - f(P_i without it)]`` over K
   prompt pairs, ``f`` the text encoder's last hidden states (all ``L x D`` of them, what the
   UNet reads). Pairs: in a shapes world, when the concept is a shape, captions of the world that
   name it and the same captions with another shape (:func:`concept_pairs`); elsewhere template
   pairs around the concept's words (``"a photo of {c}"`` / ``"a photo"``, ...); or a file
   (``--concept-pairs``, :func:`read_pairs`).
2. **Target.** ``T = f(plain prompt) + eta * c`` (``--blackbox-strength``).
3. **Search.** ``k`` tokens from the candidate vocabulary (``--vocab``), found by a genetic
   algorithm (:func:`genetic_search`) minimising ``d(P) = mean((f(P) - T)^2)``, the mean squared
   difference over every state. The found tokens are the whole adversarial prompt.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from ..csvfile import read_csv
from ..errors import UserError

PAIRS = 32  # caption pairs drawn in a shapes world
TEMPLATE_PAIRS = (
    ("a photo of {c}", "a photo"),
    ("a painting of {c}", "a painting"),
    ("a picture of {c} in a city street", "a picture of a city street"),
    ("{c} on a sunny day", "a sunny day"),
    ("a close-up of {c}", "a close-up"),
    ("a pencil drawing of {c}", "a pencil drawing"),
    ("{c} in the forest", "the forest"),
    ("a high quality photo of {c}, 4k", "a high quality photo, 4k"),
    ("an illustration of {c}", "an illustration"),
    ("{c} at night", "a scene at night"),
    ("a watercolor of {c} near the sea", "a watercolor of the sea"),
    ("a cinematic shot of {c}", "a cinematic shot"),
    ("{c} in a room", "a room"),
    ("a 3d render of {c}", "a 3d render"),
    ("a poster showing {c}", "a poster"),
    ("a detailed image of {c}, trending on artstation", "a detailed image, trending on artstation"),
)


def concept_pairs(model_id: str, concept: str, seed: int, count: int = PAIRS) -> tuple[list[tuple[str, str]], str]:
    """(with, without) prompt pairs of ``concept`` and where they come from. In a shapes world
    with a shape concept: ``count`` captions that name the shape (drawn with ``seed``), each with
    the shape word replaced by another shape of the world (drawn too); else the templates."""
    from .prompts import SHAPE_MODELS

    key = concept.strip().lower()
    if model_id in SHAPE_MODELS:
        import numpy as np

        from ..shapes.loading import world_of

        world = world_of(model_id)
        shapes = list(world.SHAPES)
        if key in shapes:
            others = [s for s in shapes if s != key]
            pattern = re.compile(rf"\b{re.escape(key)}\b")
            named = sorted({c for c in world.all_captions() if key in c.split()})
            rng = np.random.default_rng(int(seed))
            picks = rng.permutation(len(named))[:count]
            swaps = rng.integers(0, len(others), len(picks))
            pairs = [(named[i], pattern.sub(others[j], named[i])) for i, j in zip(picks, swaps)]
            return pairs, (f"{len(pairs)} {model_id} captions naming {key!r}, each against the same caption "
                           f"with another shape (drawn with --seed)")
    pairs = [(w.format(c=concept.strip()), wo) for w, wo in TEMPLATE_PAIRS]
    return pairs, f"{len(pairs)} template pairs around the concept's words"


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(with, without) pairs of a CSV file with the header ``with,without``."""
    f = read_csv(path, "concept-pairs file")
    header = f.header or []
    if "with" not in header or "without" not in header:
        raise UserError(f"concept-pairs file {path}, line 1 (header): it needs the columns 'with' and "
                        f"'without' (found: {', '.join(header) or 'none'})")
    iw, iwo = f.column("with"), f.column("without")
    pairs = []
    for n, (line, rec) in enumerate(f.records, start=1):
        if max(iw, iwo) >= len(rec) or not rec[iw].strip():
            raise UserError(f"concept-pairs file {path}, row {n} (line {line}): the 'with' prompt is missing")
        pairs.append((rec[iw].strip(), rec[iwo].strip()))
    if not pairs:
        raise UserError(f"concept-pairs file {path} holds no pair")
    return pairs


@torch.no_grad()
def encode_texts(encoder, texts: list[str], batch: int = 64) -> torch.Tensor:
    """``[N, L, D]`` text-encoder states of ``texts`` (``UserError`` when one is too long)."""
    out, limit = [], int(encoder.tokenizer.model_max_length) - 2
    for t in texts:
        if len(encoder.word_ids(t)) > limit:
            shown = t if len(t) <= 60 else t[:57] + "..."
            raise UserError(f"the concept-pair prompt {shown!r} has {len(encoder.word_ids(t))} tokens; the "
                            f"text encoder reads {limit}")
    for lo in range(0, len(texts), batch):
        ids = torch.cat([encoder.ids(encoder.word_ids(t)) for t in texts[lo:lo + batch]])
        out.append(encoder.encode(ids))
    return torch.cat(out)


def concept_direction(encoder, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """``[L, D]``: the mean over the pairs of f(with) - f(without)."""
    with_, without = encode_texts(encoder, [p[0] for p in pairs]), encode_texts(encoder, [p[1] for p in pairs])
    return (with_ - without).mean(0)


def target_states(plain: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``[1, L, D]``: the plain prompt's states moved ``strength`` along the concept direction."""
    return plain.reshape(1, *direction.shape) + float(strength) * direction.unsqueeze(0)


def distance(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]``: mean squared difference of each ``[L, D]`` state sequence to the target."""
    return ((states.float() - target.float()) ** 2).mean(dim=(1, 2))


@dataclass
class SearchResult:
    tokens: list[int]  # the found prompt (tokenizer ids)
    distance: float  # its distance to the target
    start_distance: float  # the best of the initial (random) population
    history: list[dict]  # per generation: best and mean distance of the population
    evals: int  # text-encoder evaluations (prompts encoded)
    generations: int


def genetic_search(encoder, candidates: list[int], target: torch.Tensor, *, k: int, population: int,
                   generations: int, seed: int, elite: int | None = None, mutation: float | None = None,
                   batch: int = 256, on_generation=None) -> SearchResult:
    """A genetic algorithm over ``k``-token prompts of ``candidates``: a random initial
    population; every generation keeps the ``elite`` best unchanged (so the best distance never
    rises), and replaces the rest by children of two parents drawn from the better half
    (uniform crossover), each token of a child redrawn from the candidates with probability
    ``mutation`` (default ``max(1/k, 0.05)``) and at least one token redrawn."""
    cand = torch.tensor(candidates, dtype=torch.long)
    n_cand = len(candidates)
    elite = max(1, population // 8) if elite is None else elite
    rate = max(1.0 / k, 0.05) if mutation is None else mutation
    gen = torch.Generator().manual_seed(int(seed))
    template = encoder.ids([candidates[0]] * k).cpu()
    device = encoder.table.device
    evals = 0

    @torch.no_grad()
    def evaluate(pop: torch.Tensor) -> torch.Tensor:
        nonlocal evals
        out = []
        for lo in range(0, pop.shape[0], batch):
            part = pop[lo:lo + batch]
            ids = template.repeat(part.shape[0], 1)
            ids[:, 1:1 + k] = part
            out.append(distance(encoder.encode(ids.to(device)), target).cpu())
        evals += pop.shape[0]
        return torch.cat(out)

    pop = cand[torch.randint(n_cand, (population, k), generator=gen)]
    dist = evaluate(pop)
    start = float(dist.min())
    history = []
    n_child = population - elite
    parents_n = max(2, population // 2)
    for g in range(generations):
        order = dist.argsort()
        pop, dist = pop[order], dist[order]
        if n_child > 0:
            a = torch.randint(parents_n, (n_child,), generator=gen)
            b = torch.randint(parents_n, (n_child,), generator=gen)
            take_a = torch.rand(n_child, k, generator=gen) < 0.5
            child = torch.where(take_a, pop[a], pop[b])
            mutate = torch.rand(n_child, k, generator=gen) < rate
            mutate[torch.arange(n_child), torch.randint(k, (n_child,), generator=gen)] = True
            child = torch.where(mutate, cand[torch.randint(n_cand, (n_child, k), generator=gen)], child)
            pop = torch.cat([pop[:elite], child])
            dist = torch.cat([dist[:elite], evaluate(child)])
        best = float(dist.min())
        history.append({"generation": g + 1, "best": round(best, 6), "mean": round(float(dist.mean()), 6)})
        if on_generation is not None:
            on_generation(distance=f"{best:.4g}")
    i = int(dist.argmin())
    return SearchResult(tokens=[int(t) for t in pop[i]], distance=float(dist[i]), start_distance=start,
                        history=history, evals=evals, generations=generations)


def blackbox_attack(cfg, encoder, model_id: str, concept: str, plain: torch.Tensor, candidates: list[int],
                    direction_of, on_generation=None) -> tuple[dict, torch.Tensor]:
    """The report entry (without the judged rate) and the found prompt's states ``[1, L, D]``.
    ``direction_of(concept)`` gives ``(direction, info, text-encoder evaluations spent)`` (cached
    by the caller across the rows of a prompt file)."""
    from .prompts import token_words

    t0 = time.perf_counter()
    direction, pair_info, pair_evals = direction_of(concept)
    target = target_states(plain, direction, cfg.blackbox_strength)
    limit = int(encoder.tokenizer.model_max_length) - 2
    k = cfg.blackbox_tokens or min(16, limit)
    if k > limit:
        raise UserError(f"--blackbox-tokens {k} is more than the text encoder reads ({limit} tokens "
                        f"besides the start and end tokens)")
    res = genetic_search(encoder, candidates, target, k=k, population=cfg.population,
                         generations=cfg.attack_steps, seed=cfg.seed + 7, on_generation=on_generation)
    states = encoder.encode(encoder.ids(res.tokens)).detach()
    words = token_words(encoder.tokenizer, res.tokens)
    text = " ".join(words)
    d_plain = float(distance(plain, target)[0])
    entry = {
        "prompt": text, "tokens": res.tokens, "words": words, "types_back": encoder.word_ids(text) == res.tokens,
        "distance": {"plain": round(d_plain, 6), "start": round(res.start_distance, 6),
                     "after": round(res.distance, 6),
                     "measure": "mean squared difference of the text encoder's L x D states to the target"},
        "target": {"strength": cfg.blackbox_strength, "direction_norm": round(float(direction.norm()), 6),
                   **pair_info, "rule": "target = f(plain prompt) + strength * mean over pairs of "
                                        "(f(with) - f(without))"},
        "search": {"method": "genetic algorithm", "tokens": k, "population": cfg.population,
                   "generations": res.generations, "elite": max(1, cfg.population // 8),
                   "mutation": round(max(1.0 / k, 0.05), 4), "crossover": "uniform, parents from the better half",
                   "seed": cfg.seed + 7},
        "history": res.history,
        "cost": {"text_encoder_evals": res.evals + pair_evals + 1, "search_text_encoder_evals": res.evals,
                 "unet_evals": 0, "generations": res.generations, "seconds": round(time.perf_counter() - t0, 2),
                 "counted": "prompts encoded by the text encoder (the concept pairs, the plain prompt, every "
                            "candidate of the search); the search runs no UNet: unet_evals is 0 and "
                            "judge_unet_evals (added after judging) are the UNet passes of the judged images "
                            "(a CFG sampling step counts 2)"},
    }
    return entry, states
