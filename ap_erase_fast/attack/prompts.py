"""The text an attack works with: the attacked prompt of a concept, the candidate tokens of the
prompt attack, and the rephrasings of a ShapesWorld 2 concept (the free attack)."""
from __future__ import annotations

import re

from ..errors import UserError

VOCABS = ("auto", "world", "tokenizer")
SHAPE_MODELS = ("shapes", "shapes2")
_WORD_TOKEN = re.compile(r"^[a-z]{2,}</w>$")


def concept_prompt(model_id: str, concept: str) -> str:
    """The plain prompt of ``concept``: in a shapes world its evaluation prompt ("a <shape>";
    ShapesWorld 2: "an image of a <shape>"), for any other model the concept itself."""
    if model_id in SHAPE_MODELS:
        from ..shapes.loading import WORLDS
        from ..shapes.sample import _prefix

        return f"{_prefix(WORLDS[model_id])} {concept.strip().lower()}"
    return concept.strip()


def shape_label(model_id: str, concept: str) -> int | None:
    """The classifier's shape index of ``concept`` when it is a shape of the model's world."""
    if model_id not in SHAPE_MODELS:
        return None
    from ..shapes.loading import world_of

    shapes = list(world_of(model_id).SHAPES)
    key = concept.strip().lower()
    return shapes.index(key) if key in shapes else None


def _single_token(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def candidate_tokens(tokenizer, model_id: str, vocab: str) -> tuple[list[int], str]:
    """Token ids the prompt attack may choose, and what they are. ``world``: every word of the
    shapes world's captions that is one token; ``tokenizer``: every whole-word token of 2+
    letters a-z (each decodes to a word that tokenizes back to it, so the found prompt can be
    typed); ``auto``: ``world`` for a shapes model, else ``tokenizer``."""
    if vocab not in VOCABS:
        raise UserError(f"unknown --vocab {vocab!r}; choose from {', '.join(VOCABS)}")
    if vocab == "auto":
        vocab = "world" if model_id in SHAPE_MODELS else "tokenizer"
    if vocab == "world":
        if model_id not in SHAPE_MODELS:
            raise UserError(f"--vocab world needs a shapes world model ({', '.join(SHAPE_MODELS)}), "
                            f"not {model_id!r}; use --vocab tokenizer")
        from ..shapes.loading import world_of

        words = sorted({w for c in world_of(model_id).all_captions() for w in c.split()})
        ids = sorted({i for i in (_single_token(tokenizer, w) for w in words) if i is not None})
        return ids, f"{model_id} caption words ({len(ids)} single-token words)"
    ids = sorted(i for tok, i in tokenizer.get_vocab().items() if _WORD_TOKEN.match(tok))
    return ids, f"whole-word tokens of the tokenizer, letters a-z only ({len(ids)})"


def token_words(tokenizer, ids: list[int]) -> list[str]:
    """The words of whole-word tokens (``</w>`` dropped)."""
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(list(ids))]


def rephrasings(model_id: str, concept: str, count: int, seed: int) -> tuple[list[dict], dict]:
    """Up to ``count`` captions of ShapesWorld 2 that name the shape ``concept`` in another form:
    training captions (any prefix, size, colour, fill and background words, alone and combined)
    that are neither members of the preservation vocabulary R nor evaluation prompts. One per
    combination of named attributes first (picked with ``seed``), then more of each in turn."""
    if model_id != "shapes2":
        raise UserError(f"the rephrasing attack is defined on ShapesWorld 2 (--model shapes2 runs); "
                        f"this run's model is {model_id!r}; leave 'rephrase' out of --attacks")
    import numpy as np

    from ..shapes import world2 as w

    shape = concept.strip().lower()
    if shape not in w.SHAPES:
        raise UserError(f"the rephrasing attack needs an erased shape of ShapesWorld 2, not {concept!r}")
    excluded = set(w.shapes2_vocabulary()) | set(w.eval_prompts())
    groups: dict[tuple, list[str]] = {}
    named = {"size": w.SIZES, "colour": w.COLOURS, "fill": w.FILLS}
    for c in w.all_captions():
        words = c.split()
        if shape not in words or c in excluded:
            continue
        key = tuple(a for a, values in named.items() if any(v in words for v in values))
        key += ("background",) if "background" in words else ()
        groups.setdefault(key, []).append(c)
    rng = np.random.default_rng(int(seed))
    pools = {k: [v[i] for i in rng.permutation(len(v))] for k, v in sorted(groups.items())}
    chosen: list[dict] = []
    while len(chosen) < count and any(pools.values()):
        for key, pool in pools.items():
            if pool and len(chosen) < count:
                chosen.append({"prompt": pool.pop(0), "names": list(key)})
    info = {"source": "ShapesWorld 2 captions of the shape, minus R and the evaluation prompts",
            "available": sum(len(v) for v in groups.values()), "groups": len(groups), "seed": seed}
    return chosen, info
