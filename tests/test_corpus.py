"""Corpus reading: every source kind, skip accounting, caps, and errors that name the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_fixtures import UNICODE_DOCS, read_documents, stdlib_documents, write_corpus

from stages.core.config import CorpusConfig, load_config
from stages.core.errors import ConfigError, DataError
from stages.storage.corpus import fingerprint, list_files, stdlib_root


def corpus(source: Path | str, **fields) -> CorpusConfig:
    return CorpusConfig(source=str(source), **fields)


def test_stdlib_source_is_capped_deterministic_and_skips_tests():
    cfg = corpus("python-stdlib", max_bytes=300_000)
    (first, stats), (second, _) = read_documents(cfg), read_documents(cfg)
    assert first == second
    assert stats.capped and stats.bytes == 300_000
    assert sum(len(d.encode()) for d in first) == stats.bytes
    root = stdlib_root()
    files = list_files(cfg)
    assert files and all(p.suffix == ".py" for p in files)
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(p.relative_to(root).parts[:-1]) for p in files)
    assert [p.relative_to(root).as_posix() for p in files] == sorted(p.relative_to(root).as_posix() for p in files)


def test_directory_filters_extensions_and_counts_skips(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root / "a", ["first doc\n", "second doc\n"])
    (root / "b").mkdir()
    (root / "b" / "code.py").write_text("print('hi')\n", encoding="utf-8")
    (root / "b" / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    (root / "b" / "blob.txt").write_bytes(b"abc\x00def")
    (root / "b" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "b" / "empty.md").write_text("", encoding="utf-8")
    (root / "b" / "blank.md").write_text("  \n\n", encoding="utf-8")

    documents, stats = read_documents(corpus(root))
    assert documents == ["first doc\n", "second doc\n", "print('hi')\n"]
    assert (stats.skipped_binary, stats.skipped_non_utf8, stats.skipped_empty) == (1, 1, 2)
    assert stats.files == 3 and stats.documents == 3 and stats.scanned == 7
    assert stats.bytes == sum(len(d.encode()) for d in documents)


def test_glob_and_single_file_sources(tmp_path):
    write_corpus(tmp_path, ["one\n", "two\n", "three\n"])
    (tmp_path / "notes.md").write_text("# md\n", encoding="utf-8")
    assert read_documents(corpus(tmp_path / "doc_*.txt"))[0] == ["one\n", "two\n", "three\n"]
    assert read_documents(corpus(tmp_path / "*", extensions=[".md"]))[0] == ["# md\n"]
    # A file named directly is read whatever its suffix.
    (tmp_path / "data.log").write_text("log line\n", encoding="utf-8")
    assert read_documents(corpus(tmp_path / "data.log"))[0] == ["log line\n"]


def test_jsonl_records_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": UNICODE_DOCS[0]}, {"text": ""}, {"text": "second", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    documents, stats = read_documents(corpus(path))
    assert documents == [UNICODE_DOCS[0], "second"]
    assert stats.skipped_empty == 1

    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2: no field 'text'.*corpus\.text_field"):
        read_documents(corpus(path))

    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2: not a valid JSON line"):
        read_documents(corpus(path))
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:1: field 'text' holds int"):
        read_documents(corpus(path))


def test_jsonl_in_a_directory_uses_text_field(tmp_path):
    (tmp_path / "part.jsonl").write_text(json.dumps({"body": "from jsonl"}) + "\n", encoding="utf-8")
    (tmp_path / "readme.txt").write_text("from txt\n", encoding="utf-8")
    assert read_documents(corpus(tmp_path, text_field="body"))[0] == ["from jsonl", "from txt\n"]


def test_parquet_column_and_missing_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", UNICODE_DOCS[1]], "n": [1, 2, 3, 4]}), path)
    documents, stats = read_documents(corpus(path))
    assert documents == ["alpha", UNICODE_DOCS[1]]
    assert stats.skipped_empty == 2
    with pytest.raises(DataError, match=r"docs\.parquet: no column 'content' \(columns: \['text', 'n'\]\)"):
        read_documents(corpus(path, text_field="content"))


def test_empty_corpus_says_what_was_scanned_and_skipped(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable documents in 2 file\(s\).*1 binary, 0 not UTF-8, 1 empty"):
        read_documents(corpus(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"matched no files with extensions"):
        read_documents(corpus(tmp_path / "other"))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"no such file or directory"):
        read_documents(corpus(tmp_path / "nope"))


def test_truncation_and_byte_cap_respect_utf8_boundaries(tmp_path):
    write_corpus(tmp_path, ["é" * 100, "漢" * 100, "plain"])
    documents, stats = read_documents(corpus(tmp_path, max_doc_bytes=51))
    assert documents[0] == "é" * 25 and documents[1] == "漢" * 17
    assert stats.truncated == 2
    capped, stats = read_documents(corpus(tmp_path, max_bytes=250))
    assert stats.capped and stats.bytes <= 250
    assert capped == ["é" * 100, "漢" * 16]


def test_windows_line_ends_become_newlines(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\r\n")
    assert read_documents(corpus(tmp_path))[0] == ["a\nb\n"]


def test_config_rejects_bad_extensions():
    with pytest.raises(ConfigError, match=r"corpus\.extensions.*start with a dot"):
        load_config(None, ["corpus.extensions=[txt]"])
    with pytest.raises(ConfigError, match=r"corpus\.source"):
        load_config(None, ["corpus.source=' '"])


def test_fingerprint_follows_file_changes(tmp_path):
    write_corpus(tmp_path, stdlib_documents(2, chars=200))
    cfg = corpus(tmp_path)
    before = fingerprint(cfg)
    assert fingerprint(cfg) == before
    (tmp_path / "doc_0001.txt").write_text("changed and longer than before " * 20, encoding="utf-8")
    assert fingerprint(cfg) != before
