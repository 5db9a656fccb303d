"""The vocabulary loader and the built-in default list."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from ap_erase_fast.errors import UserError
from ap_erase_fast.models.vocab import builtin_vocabulary_path, load_vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_builtin_list_properties():
    words = load_vocabulary(None)
    assert len(words) == 3000
    assert len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]{3,}", w) for w in words)
    for common in ("day", "love", "music", "church", "water", "dog", "car", "picture"):
        assert common in words
    for excluded in ("the", "and", "with", "ing", "ation", "amp", "http"):
        assert excluded not in words
    # the file itself: a two-line comment header, then one word per line, LF endings
    raw = open(builtin_vocabulary_path(), "rb").read()
    assert b"\r" not in raw and raw.endswith(b"\n")
    lines = raw.decode().splitlines()
    assert lines[0].startswith("# ") and lines[1].startswith("# ") and lines[2:] == words


def test_builtin_list_is_stable():
    words = load_vocabulary()
    assert words[:5] == ["day", "ill", "king", "new", "now"]
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
    assert digest == _PINNED, "vocab_en.txt changed: update the pin only together with tools/make_vocab.py"


@pytest.mark.skipif(importlib.util.find_spec("english_words") is None,
                    reason="regenerating needs the english-words package (pip install english-words==2.0.2)")
def test_generator_reproduces_the_file():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_vocab.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_txt_file(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# my list\n\ncat\n  dog  \n# comment\ncat\nhot air balloon\n", encoding="utf-8")
    assert load_vocabulary(str(f)) == ["cat", "dog", "hot air balloon"]


def test_csv_file(tmp_path):
    f = tmp_path / "words.csv"
    f.write_text("id,Word,freq\n1,apple,3\n2,pear,2\n3,,1\n4,apple,1\n", encoding="utf-8")
    assert load_vocabulary(str(f)) == ["apple", "pear"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,term\n1,apple\n", encoding="utf-8")
    with pytest.raises(UserError, match="no 'word' column"):
        load_vocabulary(str(bad))


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n   \n", encoding="utf-8")
    with pytest.raises(UserError, match="has no words") as info:
        load_vocabulary(str(empty))
    assert "\n" not in str(info.value)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("word\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no words"):
        load_vocabulary(str(header_only))
    with pytest.raises(UserError, match="does not exist"):
        load_vocabulary(str(tmp_path / "missing.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(UserError):
        load_vocabulary(str(binary))


_PINNED = "089ff804ea4db8fdf1f7031991bbcf462c6797061de7b2c85fc8b613a61cf344"
