"""What an evaluation reads: the train run, the held-out concepts and the prompt CSV.

Every bad input is a :class:`UserError` (one line, exit code 2) naming the file and the fix.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..csvfile import read_csv
from ..errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CONCEPTS = DATA_DIR / "eval_concepts.txt"

SEED_COLUMNS = ("seed", "evaluation_seed")  # the I2P CSV spells it evaluation_seed
ID_COLUMNS = ("id", "case_number")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass
class RunInfo:
    """The parts of a train run's ``run.json`` an evaluation needs."""

    path: str | None
    info: dict
    run_json_sha256: str | None

    @property
    def config(self) -> dict:
        return self.info.get("config", {})

    @property
    def erased(self) -> list[str]:
        return list(self.config.get("erase") or [])

    @property
    def model(self) -> str:
        return self.config.get("model") or self.info.get("model", {}).get("id")


def load_run(path: str) -> RunInfo:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"run folder {path} does not exist; pass the --output folder of an "
                        f"'ap-erase train' run")
    run_json = folder / "run.json"
    if not run_json.is_file():
        raise UserError(f"{run_json} is missing; {path} is not the output folder of an "
                        f"'ap-erase train' run")
    try:
        info = json.loads(run_json.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {run_json}: {exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise UserError(f"{run_json} has no 'config' section; is it from 'ap-erase train'?")
    if not info["config"].get("erase"):
        raise UserError(f"{run_json} records no erased concepts (config.erase)")
    return RunInfo(path=str(folder.absolute()), info=info, run_json_sha256=file_sha256(run_json))


def load_concepts(path: str | None, exclude: list[str]) -> tuple[list[str], dict]:
    """Held-out concepts: one per line (``#`` comments), or a CSV with a ``concept`` column.

    Concepts equal (case-insensitively) to an erased concept are dropped; order is kept,
    duplicates removed.
    """
    src = Path(path) if path else DEFAULT_CONCEPTS
    if not src.is_file():
        raise UserError(f"concept list {src} does not exist")
    text = src.read_text(encoding="utf-8")
    if src.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "concept" not in {k.strip().lower() for k in rows[0]}:
            raise UserError(f"concept CSV {src} needs a 'concept' column")
        key = next(k for k in rows[0] if k.strip().lower() == "concept")
        items = [r[key] for r in rows]
    else:
        items = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    skip = {c.strip().lower() for c in exclude}
    out, seen = [], set()
    for item in items:
        c = " ".join(str(item).split())
        if c and c.lower() not in skip and c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
    if not out:
        raise UserError(f"concept list {src} holds no concept (after removing the erased ones)")
    return out, {"path": str(src.absolute()) if path else "builtin:data/eval_concepts.txt",
                 "sha256": file_sha256(src), "count": len(out)}


@dataclass
class PromptRow:
    index: int
    prompt: str
    seed: int
    id: str | None = None
    cls: str | None = None  # ImageNet class name or index, for the classifier
    concept: str | None = None  # the concept the prompt is about (erased or not)
    group: str = "all"  # "erased", "preserved", or "all" when the CSV says nothing
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"index": self.index, "id": self.id, "prompt": self.prompt, "seed": self.seed,
             "class": self.cls, "concept": self.concept, "group": self.group,
             "extra": self.extra or None}
        return {k: v for k, v in d.items() if v is not None}


def _norm(s: str | None) -> str:
    return " ".join(str(s or "").split()).lower()


def assign_group(row: PromptRow, erased: list[str]) -> None:
    """``erased`` if the row's concept (else its class name) is an erased concept, ``preserved``
    if the row names a concept or class that is not erased, ``all`` if it names neither."""
    key = row.concept if row.concept else row.cls
    if not key:
        row.group = "all"
        return
    names = {_norm(c) for c in erased}
    row.group = "erased" if _norm(key) in names else "preserved"


def read_prompt_csv(path: str, erased: list[str]) -> tuple[list[PromptRow], dict]:
    f = read_csv(path, "prompt file")
    header = f.header or []
    if "prompt" not in header:
        raise UserError(f"prompt file {path} has no 'prompt' column (columns: "
                        f"{', '.join(header) or 'none'}); it needs 'prompt' and 'seed'")
    seed_col = next((c for c in SEED_COLUMNS if c in header), None)
    if seed_col is None:
        raise UserError(f"prompt file {path} has no 'seed' column (or 'evaluation_seed'); every "
                        f"prompt needs its own seed")
    id_col = next((c for c in ID_COLUMNS if c in header), None)
    rows = []
    for n, (line, cells) in enumerate(f.records):
        # the first column of a name wins; a short row lacks its last columns
        rec = {}
        for k, v in zip(header, cells):
            rec.setdefault(k, v.strip())
        prompt = rec.get("prompt")
        if prompt is None:
            raise UserError(f"prompt file {path}, line {line}: missing prompt")
        try:
            seed = int(float(rec.get(seed_col) or ""))
        except ValueError:
            raise UserError(f"prompt file {path}, line {line}: seed {rec.get(seed_col)!r} is not "
                            f"an integer") from None
        row = PromptRow(index=n, prompt=prompt, seed=seed, id=rec.get(id_col) if id_col else None,
                        cls=rec.get("class") or None, concept=rec.get("concept") or None)
        assign_group(row, erased)
        rows.append(row)
    if not rows:
        raise UserError(f"prompt file {path} holds no prompt")
    return rows, {"path": str(f.path.absolute()), "sha256": f.sha256, "rows": len(rows),
                  "columns": header}


def default_prompts(erased: list[str], heldout: list[str], seeds: int = 2,
                    max_heldout: int = 6) -> list[PromptRow]:
    """Without ``--prompts``: each erased concept and the first ``max_heldout`` held-out
    concepts, the concept itself as the prompt, seeds 0..seeds-1."""
    rows = []
    for concept, group in [(c, "erased") for c in erased] + [(c, "preserved") for c in heldout[:max_heldout]]:
        for s in range(seeds):
            rows.append(PromptRow(index=len(rows), prompt=concept, seed=s, concept=concept, group=group))
    return rows
