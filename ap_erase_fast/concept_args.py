"""Concept and prompt arguments: ``--erase "a, b"``, a file of concepts one per line, and
``--preserve-set`` lists that may hold the empty prompt."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

CONCEPT_FILE_SUFFIXES = (".txt", ".csv", ".list")


def looks_like_path(text: str) -> bool:
    """Whether a concept argument is meant as a file: it ends in .txt, .csv or .list, or it
    holds a path separator and starts like a path (/, ./, ../, ~) or names an existing folder
    ("AC/DC" stays a concept)."""
    s = text.strip()
    if s.lower().endswith(CONCEPT_FILE_SUFFIXES):
        return True
    seps = [sep for sep in (os.sep, os.altsep) if sep]
    if not any(sep in s for sep in seps):
        return False
    if s.startswith(("/", "./", "../", "~")):
        return True
    head = os.path.dirname(os.path.expanduser(s))
    return bool(head) and os.path.isdir(head)


def parse_concepts(value: str | list[str], flag: str = "--erase") -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; an existing file → one concept per non-empty line. An
    argument that looks like a file path (:func:`looks_like_path`) but is no file is an error,
    not a concept."""
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        item = str(item)
        path = os.path.expanduser(item.strip())
        if item.strip() and os.path.isfile(path):
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"{flag} {item}: cannot read the file ({exc})") from None
            out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            continue
        for part in [item] + item.split(","):
            if part.strip() and looks_like_path(part):
                what = "is a folder, not a file" if os.path.isdir(
                    os.path.expanduser(part.strip())) else "no such file"
                raise UserError(f"{flag} {part.strip()}: {what} (it looks like a file of "
                                f"concepts, one per line); fix the path")
        out += [part.strip() for part in item.split(",") if part.strip()]
    return out


def parse_prompt_list(value: str | list[str], flag: str = "--preserve-set") -> list[str]:
    """Like :func:`parse_concepts`, but ``""`` (two double quotes) is kept as the empty prompt
    and list items from Python or a config file are taken as they are."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return ["" if item in ('""', "''") else item for item in parse_concepts(str(value), flag)]
