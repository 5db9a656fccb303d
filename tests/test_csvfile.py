"""The one CSV reader behind the prompt files (``ap-erase eval``, ``ap-erase attack``) and the
black-box attack's concept pairs: the same errors, line numbers and blank-row handling for all."""
from __future__ import annotations

import pytest

from ap_erase_fast.attack.blackbox import read_pairs
from ap_erase_fast.csvfile import read_csv
from ap_erase_fast.errors import UserError
from ap_erase_fast.eval.inputs import read_prompt_csv


def test_reader_header_records_lines_and_hash(tmp_path):
    """BOM and header case are normalised, all-blank rows dropped, each record keeps the line it
    ends on (a quoted cell spanning two lines included), and the hash is of the bytes."""
    import hashlib

    p = tmp_path / "a.csv"
    data = '\ufeffPrompt, Seed\n"two\nlines",1\n,\n\nthird,3\n'.encode()
    p.write_bytes(data)
    f = read_csv(str(p), "prompt file")
    assert f.header == ["prompt", "seed"]
    assert f.records == [(3, ["two\nlines", "1"]), (6, ["third", "3"])]
    assert f.column("seed") == 1 and f.column("concept") is None
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "e.csv"
    empty.write_text("")
    assert read_csv(str(empty), "prompt file").header is None


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), (b"\xff\xfe\x00bad", "cannot read")])
def test_reader_errors_name_the_file_and_what_it_is(tmp_path, content, needle):
    p = tmp_path / "f.csv"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match="concept-pairs file") as err:
        read_csv(str(p), "concept-pairs file")
    assert needle in str(err.value) and str(p) in str(err.value)
    with pytest.raises(UserError):
        read_csv(str(p), "concept-pairs file")


def test_concept_pairs_file(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("without,with\nthe street,a garbage truck on the street\n\n,a truck\n")
    assert read_pairs(str(p)) == [("a garbage truck on the street", "the street"), ("a truck", "")]
    p.write_text("with,without\nx,y\n,z\n")
    with pytest.raises(UserError, match=r"row 2 \(line 3\): the 'with' prompt is missing"):
        read_pairs(str(p))
    p.write_text("a,b\nx,y\n")
    with pytest.raises(UserError, match="needs the columns 'with' and 'without'"):
        read_pairs(str(p))


def test_eval_prompt_file_reports_the_line_in_the_file(tmp_path):
    """The line of a bad seed is the file's own line (blank lines and a two-line cell counted)."""
    p = tmp_path / "p.csv"
    p.write_text('prompt,seed\n"a\ncat",1\n\ndog,x\n')
    with pytest.raises(UserError, match="line 5: seed 'x' is not an integer"):
        read_prompt_csv(str(p), ["cat"])
    p.write_text("prompt,seed,prompt\na cat,7,ignored\n")
    rows, info = read_prompt_csv(str(p), ["cat"])
    assert [(r.prompt, r.seed) for r in rows] == [("a cat", 7)] and info["rows"] == 1
