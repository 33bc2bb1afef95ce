from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from routerretriever import DataError, Document, load_beir, load_corpus, load_qrels, load_queries


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_loads_tiny_fixture(tiny: Path):
    ds = load_beir(tiny)
    assert len(ds.corpus) == 40
    assert set(ds.queries) == set(ds.qrels)
    assert all(isinstance(s, int) for rels in ds.qrels.values() for s in rels.values())


def test_title_and_text_joined_like_beir():
    assert Document(text="body", title="Title").full_text == "Title body"
    assert Document(text=" body ", title="").full_text == "body"


def test_only_judged_queries_kept(tiny: Path):
    with open(tiny / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "unjudged", "text": "x"}) + "\n")
    assert "unjudged" in load_queries(tiny)
    assert "unjudged" not in load_beir(tiny).queries


def test_gzipped_files(tiny: Path):
    raw = (tiny / "corpus.jsonl").read_bytes()
    (tiny / "corpus.jsonl").unlink()
    with gzip.open(tiny / "corpus.jsonl.gz", "wb") as f:
        f.write(raw)
    assert len(load_corpus(tiny)) == 40


def test_line_not_json_names_file_and_line(tiny: Path):
    lines = (tiny / "corpus.jsonl").read_text().splitlines()
    lines[2] = '{"_id": "x", "text": '
    write_lines(tiny / "corpus.jsonl", lines)
    with pytest.raises(DataError, match=r"corpus\.jsonl:3: not valid JSON") as e:
        load_corpus(tiny)
    assert e.value.line == 3


def test_missing_id(tiny: Path):
    write_lines(tiny / "queries.jsonl", ['{"_id": "1", "text": "a"}', '{"text": "no id"}'])
    with pytest.raises(DataError, match=r'queries\.jsonl:2: missing "_id"'):
        load_queries(tiny)


def test_duplicate_ids(tiny: Path):
    lines = (tiny / "corpus.jsonl").read_text().splitlines()
    write_lines(tiny / "corpus.jsonl", lines + [lines[0]])
    with pytest.raises(
        DataError, match=r"corpus\.jsonl:41: duplicate _id .* \(first seen on line 1\)"
    ):
        load_corpus(tiny)


def test_missing_text_field(tiny: Path):
    write_lines(tiny / "corpus.jsonl", ['{"_id": "1", "title": "t"}'])
    with pytest.raises(DataError, match=r'corpus\.jsonl:1: missing "text"'):
        load_corpus(tiny)


def test_qrels_wrong_field_count(tiny: Path):
    write_lines(tiny / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2"])
    with pytest.raises(DataError, match=r"test\.tsv:3: expected 3 tab-separated fields .* got 2"):
        load_qrels(tiny, "test")


def test_qrels_non_integer_score(tiny: Path):
    write_lines(tiny / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t0.5"])
    with pytest.raises(DataError, match=r"test\.tsv:2: score must be an integer, got '0.5'"):
        load_qrels(tiny, "test")


def test_qrels_without_header_keeps_first_row(tiny: Path):
    write_lines(tiny / "qrels" / "test.tsv", ["q1\td1\t1", "q1\td2\t2"])
    assert load_qrels(tiny, "test") == {"q1": {"d1": 1, "d2": 2}}


def test_unknown_split_lists_available(tiny: Path):
    with pytest.raises(DataError, match=r"unknown split 'train'; available splits: \['test'\]"):
        load_beir(tiny, "train")


def test_missing_corpus_file(tiny: Path):
    (tiny / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="no corpus.jsonl or corpus.jsonl.gz"):
        load_beir(tiny)


def test_judged_docs_absent_from_corpus_warn_once_with_count(tiny: Path, caplog):
    with open(tiny / "qrels" / "test.tsv", "a") as f:
        qid = next(iter(load_qrels(tiny, "test")))
        f.write(f"{qid}\tghost-1\t1\n{qid}\tghost-2\t1\n")
    with caplog.at_level(logging.WARNING, logger="routerretriever"):
        ds = load_beir(tiny)
    warnings = [
        r.getMessage() for r in caplog.records if "absent from the corpus" in r.getMessage()
    ]
    assert len(warnings) == 1 and ": 2 judgment(s)" in warnings[0]
    assert ds.qrels[qid]["ghost-1"] == 1  # kept, as BEIR keeps it


def test_judged_queries_absent_from_queries_file_dropped(tiny: Path, caplog):
    with open(tiny / "qrels" / "test.tsv", "a") as f:
        f.write("no-such-query\td\t1\n")
    with caplog.at_level(logging.WARNING, logger="routerretriever"):
        ds = load_beir(tiny)
    assert "no-such-query" not in ds.qrels
    assert any("not in queries.jsonl" in r.getMessage() for r in caplog.records)


def test_not_a_folder(tmp_path: Path):
    with pytest.raises(DataError, match="not a folder"):
        load_beir(tmp_path / "nope")
