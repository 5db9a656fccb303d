"""Word lists for the preservation-set search (one word or short phrase per prompt)."""
from __future__ import annotations

import csv
import os
from typing import Callable

from ap_erase_fast.errors import UserError

BUILTIN_VOCABULARY = "vocab_en.txt"
# The toy worlds' lists: names reserved here, words supplied by the worlds themselves
# (ap_erase_fast.shapes.world and .world2 call register_vocabulary on import), so that the model
# layer never imports the worlds.
WORLD_VOCABULARIES = {"shapes": "ap_erase_fast.shapes.world", "shapes2": "ap_erase_fast.shapes.world2"}
BUILTIN_NAMES = ("en", *WORLD_VOCABULARIES)
_REGISTERED: dict[str, Callable[[], list[str]]] = {}


def register_vocabulary(name: str, words: Callable[[], list[str]]) -> None:
    """Make ``load_vocabulary(name)`` return ``words()`` (a toy world registers its list)."""
    _REGISTERED[name] = words


def builtin_vocabulary_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "data", BUILTIN_VOCABULARY)


def _unknown(path: str, source: str) -> UserError:
    """The error of a --vocab that is neither a built-in name nor an existing file."""
    names = ", ".join(BUILTIN_NAMES)
    p = os.fspath(path)
    if os.sep not in p and not (os.altsep and os.altsep in p) and "." not in p:
        return UserError(f"unknown vocabulary {p!r}: not a built-in list ({names}) and no such "
                         f"file; use one of {names}, or a .txt (one word per line) or .csv "
                         f"(a 'word' column) file")
    return UserError(f"vocabulary file {source!r} does not exist; give an existing .txt or .csv "
                     f"file, or a built-in list: {names}")


def check_vocabulary_name(path: str) -> None:
    """Raise the one-line error of :func:`load_vocabulary` for a ``path`` that is neither a
    built-in list nor an existing file (cheap: nothing is read)."""
    if path is None or path in BUILTIN_NAMES:
        return
    source = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(source):
        if os.path.isdir(source):
            raise UserError(f"vocabulary {source!r} is a folder; give a .txt or .csv file, or a "
                            f"built-in list: {', '.join(BUILTIN_NAMES)}")
        raise _unknown(path, source)


def load_vocabulary(path: str | None = None) -> list[str]:
    """The words of a vocabulary file, in file order, duplicates removed (first kept).

    ``None`` or ``"en"`` → the built-in list (3000 common English words,
    ``ap_erase_fast/data/vocab_en.txt``); ``"shapes"`` → the ShapesWorld list (every training
    caption plus distractor words, :func:`ap_erase_fast.shapes.world.shapes_vocabulary`);
    ``"shapes2"`` → the ShapesWorld 2 list (645 training captions, no evaluation prompt,
    :func:`ap_erase_fast.shapes.world2.shapes2_vocabulary`); these two are registered by their
    world modules (:func:`register_vocabulary`) when imported.
    ``.csv`` → the ``word`` column (header required). Anything else is read as text: one entry
    per line, surrounding whitespace stripped, blank lines and lines starting with ``#`` ignored.
    Entries are kept as written (no lower-casing): R selection keeps the entries whose
    lower-cased characters are all in ``a-z</>``, as the authors' filter does, and prompts use the
    entries as spelled (:func:`ap_erase_fast.concepts.is_candidate`).
    """
    if path in _REGISTERED:
        return _REGISTERED[path]()
    if path in WORLD_VOCABULARIES:
        raise UserError(f"vocabulary {path!r} is registered by {WORLD_VOCABULARIES[path]}; "
                        f"import that module first")
    if path == "en":
        path = None
    source = builtin_vocabulary_path() if path is None else os.path.expanduser(os.fspath(path))
    if not os.path.isfile(source):
        if path is None:
            raise UserError(f"built-in vocabulary {source!r} does not exist; reinstall "
                            f"ap_erase_fast")
        check_vocabulary_name(path)
    try:
        with open(source, encoding="utf-8-sig", newline="") as fh:
            if source.lower().endswith(".csv"):
                reader = csv.DictReader(fh)
                fields = [f.strip().lower() for f in (reader.fieldnames or [])]
                if "word" not in fields:
                    raise UserError(f"vocabulary file {source!r} has no 'word' column (columns: {', '.join(fields) or 'none'})")
                column = (reader.fieldnames or [])[fields.index("word")]
                raw = [(row.get(column) or "") for row in reader]
            else:
                raw = [line for line in fh.read().splitlines() if not line.lstrip().startswith("#")]
    except UnicodeDecodeError:
        raise UserError(f"vocabulary file {source!r} is not UTF-8 text") from None
    except csv.Error as exc:
        raise UserError(f"vocabulary file {source!r} is not valid CSV: {exc}") from None
    words: list[str] = []
    seen: set[str] = set()
    for entry in raw:
        word = entry.strip()
        if word and word not in seen:
            seen.add(word)
            words.append(word)
    if not words:
        raise UserError(f"vocabulary {source} has no words")
    return words
