"""The CLIP BPE tokenizer, built offline from the vendored ``bpe_simple_vocab_16e6.txt.gz``.

The conversion follows CLIP's own ``SimpleTokenizer``: the first line of the file is a header,
the next 49152 - 256 - 2 = 48894 lines are the merges in priority order; the vocabulary is the
256 byte-level symbols, the same with ``</w>`` appended, one entry per merge, then the two
special tokens, 49408 entries in all (``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407).
"""
from __future__ import annotations

import functools
import gzip
import os

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2


def bpe_path() -> str:
    """Path of the vendored CLIP BPE merges file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", BPE_FILENAME)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to code
    # points from 256 upwards, so every byte sequence becomes a string without whitespace.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def clip_bpe_tables() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of CLIP's tokenizer, read from the vendored BPE file."""
    with gzip.open(bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # pragma: no cover - guards a corrupted asset
        raise RuntimeError(f"CLIP BPE file {bpe_path()} gave {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = MAX_LENGTH):
    """A ``transformers.CLIPTokenizer`` equal to CLIP's, built without any download.

    ``pad_token`` is ``<|endoftext|>`` for SD1.x (OpenAI CLIP) and ``"!"`` (id 0) for SD2.x
    (OpenCLIP), as in the tokenizers the Stable Diffusion repositories ship.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_tables()
    # transformers 5: pass the tables as ``vocab``/``merges``; the old ``vocab_file=`` keyword
    # is silently ignored and yields a 3-token tokenizer.
    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    if tok.vocab_size != VOCAB_SIZE or tok.eos_token_id != VOCAB_SIZE - 1:  # pragma: no cover
        raise RuntimeError("CLIP tokenizer construction went wrong (transformers API change?)")
    return tok
