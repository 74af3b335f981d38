"""Uploads are parsed in a child process with a time and a memory limit: the same
documents as `load` reads, and a file that overruns either costs one InvalidRequest for
that file, after which the next file is read by a fresh child."""

from pathlib import Path

import pytest

from lorag.errors import InvalidRequest
from lorag.retrieval.ingest import load
from lorag.retrieval.sandbox import Parser

GUIDES = Path(__file__).resolve().parent.parent / "data" / "corpus" / "guides"


def test_the_child_reads_what_load_reads_and_says_what_it_cannot(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with Parser() as parser:
        for name in ("lighthouse.pdf", "glossary.html", "volcanoes.md"):
            assert parser.load(GUIDES / name, name) == load(GUIDES / name, name)
        with pytest.raises(InvalidRequest, match="latin.txt is not UTF-8 text"):
            parser.load(latin, "latin.txt")


def test_a_file_over_the_memory_limit_fails_alone(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * (4 << 20))  # 20 MB of text: far over 1 MiB once read
    with Parser(memory_bytes=1 << 20) as parser:
        with pytest.raises(InvalidRequest, match=r"big.txt could not be read within 1 MiB"):
            parser.load(big, "big.txt")
        assert parser.load(GUIDES / "bakery.txt", "bakery.txt")  # the same child goes on


def test_a_file_over_the_time_limit_fails_alone_and_a_fresh_child_reads_the_next():
    with Parser(timeout_s=0.001) as parser:
        with pytest.raises(InvalidRequest, match="took longer than 0.001 s to read"):
            parser.load(GUIDES / "lighthouse.pdf", "lighthouse.pdf")
        parser.timeout_s = 30
        assert parser.load(GUIDES / "lighthouse.pdf", "lighthouse.pdf") == \
            load(GUIDES / "lighthouse.pdf", "lighthouse.pdf")
