"""Replay the atheris corpus (tests/fuzz/corpus) through the harness's target, without atheris.

Every seed and every crash reproducer found by tests/fuzz/fuzz_preamble.py stays a regression
test here; the harness documents how to run the fuzzer itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pytest

from homenet.node import preamble
from tests.fuzz.fuzz_preamble import target

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"
FILES = sorted(p for p in CORPUS.iterdir() if p.is_file())


def test_corpus_has_seeds() -> None:
    assert len(FILES) >= 12
    kinds = {p.read_bytes()[:1] for p in FILES}
    assert {b"R", b"P", b"U", b"*"} <= kinds  # every target has seeds


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_file(path: Path) -> None:
    target(path.read_bytes())


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_file_under_every_target_and_split(path: Path) -> None:
    body = path.read_bytes()[2:]
    for kind in (b"R", b"P", b"U", b"*"):
        for split in range(16):
            target(kind + bytes([split]) + body)


def test_target_checks_something(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target is not a no-op: a parser that raised a foreign error would fail it."""

    def boom(line: bytes) -> NoReturn:
        raise KeyError(line)

    monkeypatch.setattr(preamble, "parse_request_line", boom)
    with pytest.raises(KeyError):
        target(b"R\x00HN/1 CONNECT home1\n")
