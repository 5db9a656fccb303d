"""Reading the CSV files users hand in (prompt files of ``ap-erase eval`` and ``attack``, concept
pairs of the black-box attack): one reader, so every such file is opened, decoded and reported
the same way; each caller checks its own columns."""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass
class CsvFile:
    """A CSV file read whole: its header names (stripped, lower case), its non-blank records with
    the line each ends on, and the sha256 of its bytes."""

    path: Path
    header: list[str] | None  # None: the file is empty
    records: list[tuple[int, list[str]]]
    sha256: str

    def column(self, name: str) -> int | None:
        """The index of the first column called ``name``, or None."""
        return self.header.index(name) if self.header and name in self.header else None


def read_csv(path: str, what: str) -> CsvFile:
    """The file at ``path`` (UTF-8, an optional BOM); ``what`` names it in the one-line errors
    (``"prompt file"``, ``"concept-pairs file"``): a missing file, undecodable bytes and malformed
    CSV are a :class:`UserError`. Rows whose cells are all blank are dropped."""
    src = Path(path)
    if not src.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        data = src.read_bytes()
        reader = csv.reader(data.decode("utf-8-sig").splitlines(keepends=True))
        header = next(reader, None)
        records = [(reader.line_num, rec) for rec in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    return CsvFile(path=src, header=None if header is None else [h.strip().lower() for h in header],
                   records=[(line, rec) for line, rec in records if any(c.strip() for c in rec)],
                   sha256=hashlib.sha256(data).hexdigest())
