"""Text embeddings and the preservation set R of each erased concept (ALGORITHM.md §2).

R is chosen the way the authors choose it: embed every vocabulary word with the text encoder
(the full last hidden state, [77, D]), score each by minus its L2 distance to the erased
concept's embedding, keep the words whose lower-cased characters are all in ``a-z</>`` (the
authors' ``detect_special_tokens``; "African" and "TV" are kept, "x1" and "e-mail" are not),
take the k closest, run a 1-D k-means on those k scores and keep, for each centre, the word
whose score is nearest (all k words when k ≤ the number of centres, as the authors do). R is
therefore spread over the range of distances, not just the nearest words. Words keep their
spelling in the prompts they become. Phrases of such words separated by single spaces are
accepted too (a documented extension: the authors' lists hold single words).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

# R candidates: words whose lower-cased characters are all in a-z</> (the authors' filter), or
# phrases of such words separated by single spaces (this library's extension).
_CANDIDATE = re.compile(r"^[a-z</>]+( [a-z</>]+)*$")


def is_candidate(word: str) -> bool:
    """Whether ``word`` may be a member of R: the authors' filter (lower-case, then every
    character in ``a-z</>``), extended to phrases of such words joined by single spaces."""
    return _CANDIDATE.match(word.lower()) is not None


def mentions(concept: str, candidate: str) -> bool:
    """Whether ``candidate`` is ``concept``, one of its words, or a phrase containing it."""
    concept = " ".join(re.findall(r"[a-z]+", concept.lower()))
    candidate = candidate.lower()
    if not concept:
        return False
    if candidate == concept or candidate in concept.split():
        return True
    return re.search(r"(^| )" + re.escape(concept) + r"( |$)", candidate) is not None


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def check_concept_has_tokens(tokenizer, concept: str) -> None:
    """A concept must have tokens; one longer than the text encoder reads is cut, with a
    warning that says where (the cut text is what gets erased)."""
    ids = tokenizer(concept, truncation=True).input_ids
    if len(ids) <= 2:  # only the start and end tokens
        raise UserError(f"the concept {concept!r} tokenizes to nothing; give a concept with words")
    limit = tokenizer.model_max_length
    full = tokenizer(concept, truncation=True, max_length=max(limit, 10 * len(concept) + 2)).input_ids
    if len(full) > limit and os.environ.get("RANK", "0") == "0":
        import sys

        kept = tokenizer.decode(ids[1:-1]).strip()
        print(f"warning: the concept {_clip(concept)!r} is {len(full) - 2} tokens long; the text "
              f"encoder reads only its first {limit - 2} (up to \"...{kept[-30:].strip()}\"), the "
              f"rest is ignored", file=sys.stderr)


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], batch_size: int = 64,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Text-encoder last hidden states [N, L, D] (fp32, on ``device``), batched."""
    device = device or next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenize(tokenizer, prompts[start:start + batch_size]).to(device)
        out.append(text_encoder(ids)[0].float())
    return torch.cat(out) if out else torch.empty(0)


def embedding_cache_key(encoder_key: str, words: list[str]) -> str:
    h = hashlib.sha256()
    h.update(b"ap_erase_fast.vocab_embeddings.v2\0")
    h.update(encoder_key.encode())
    h.update(b"\0")
    h.update("\n".join(words).encode("utf-8"))
    return h.hexdigest()[:32]


def vocabulary_embeddings(encode_rows, words: list[str], encoder_key: str,
                          cache_dir: str | os.PathLike | None) -> tuple[torch.Tensor, bool]:
    """The conditioning rows of ``words`` [N, F] fp32 on CPU (``encode_rows(prompts)`` gives
    them: a backbone's ``encode(prompts).flat()``), read from or written to the cache under a key
    of ``encoder_key`` (the backbone's text-encoder hash) and the words.

    Returns (rows, cache_hit). ``cache_dir`` None disables the cache.
    """
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None:
        key = embedding_cache_key(encoder_key, words)
        path = Path(cache_dir) / f"vocab-{key}.safetensors"
        if path.is_file():
            try:
                emb = load_file(str(path))["embeddings"]
                if emb.shape[0] == len(words):
                    return emb, True
            except Exception:  # noqa: BLE001 - a broken cache file is recomputed
                pass
    emb = encode_rows(words).float().cpu().contiguous()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"embeddings": emb}, str(tmp), metadata={"num_words": str(len(words))})
            os.replace(tmp, path)
        except OSError as exc:
            warnings.warn(f"could not write the embedding cache {path}: {exc}", stacklevel=2)
    return emb, False


@dataclass
class PreservationSet:
    concept: str
    words: list[str]
    distances: list[float]  # L2 distance of each word of R to the concept
    indices: list[int]  # rows of the vocabulary table
    candidates: int  # words that passed the a–z filter


def select_preservation_set(concept: str, concept_embedding: torch.Tensor, words: list[str],
                            table: torch.Tensor, k_closest: int, num_centers: int,
                            exclude_erased: bool = False) -> PreservationSet:
    """The authors' R: L2 top-k, then one representative per 1-D k-means centre (or all k
    candidates when there are no more of them than centres)."""
    from sklearn.cluster import KMeans

    from .ops import l2_scores

    dist = l2_scores(concept_embedding.to(table.dtype), table).cpu().numpy().astype(np.float64)
    order = np.argsort(dist, kind="stable")  # closest first == score (−dist) descending
    keep = [int(i) for i in order
            if is_candidate(words[i]) and not (exclude_erased and mentions(concept, words[i]))]
    if not keep:
        raise UserError("no vocabulary word is made of the letters a-z only; R would be empty "
                        "(check --vocab)")
    top = keep[:k_closest]
    if len(top) <= num_centers:  # the authors return the candidates themselves
        return PreservationSet(concept=concept, words=[words[i] for i in top],
                               distances=[float(dist[i]) for i in top], indices=top,
                               candidates=len(keep))
    scores = -dist[top]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate scores make k-means warn; dedupe handles it
        km = KMeans(n_clusters=num_centers, random_state=0, n_init=10).fit(scores[:, None])
    chosen: list[int] = []
    for centre in km.cluster_centers_[:, 0]:
        j = int(np.argmin(np.abs(scores - centre)))
        if top[j] not in chosen:
            chosen.append(top[j])
    chosen.sort(key=lambda i: (dist[i], i))
    return PreservationSet(concept=concept, words=[words[i] for i in chosen],
                           distances=[float(dist[i]) for i in chosen], indices=chosen,
                           candidates=len(keep))


def fixed_preservation_set(concept: str, concept_embedding: torch.Tensor, prompts: list[str],
                           table: torch.Tensor) -> PreservationSet:
    """R given by the user (``--preserve-set``), in the given order, with its distances."""
    from .ops import l2_scores

    dist = l2_scores(concept_embedding.to(table.dtype), table).cpu().tolist()
    return PreservationSet(concept=concept, words=list(prompts), distances=[float(d) for d in dist],
                           indices=list(range(len(prompts))), candidates=len(prompts))


def describe_sets(sets: list[PreservationSet]) -> dict:
    return {s.concept: {"words": s.words, "distances": [round(d, 6) for d in s.distances],
                        "candidates": s.candidates} for s in sets}

