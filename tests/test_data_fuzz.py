"""The BEIR readers against anything a user's files may hold: round trips with any characters,
and for broken files one DataError naming the file (and line), never a traceback."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerretriever.data import DataError, load_corpus, load_qrels, load_queries

FAST = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Text as a user's file may hold it: any code point but lone surrogates (JSON files hold UTF-8).
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ids = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"),
    min_size=1,
    max_size=20,
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@FAST
@given(docs=st.dictionaries(ids, st.tuples(text, text), min_size=1, max_size=8))
def test_corpus_and_queries_round_trip_with_any_characters(tmp_path_factory, docs):
    folder = tmp_path_factory.mktemp("beir")
    write_jsonl(
        folder / "corpus.jsonl", [{"_id": i, "title": t, "text": x} for i, (t, x) in docs.items()]
    )
    write_jsonl(folder / "queries.jsonl", [{"_id": i, "text": x} for i, (_, x) in docs.items()])
    corpus = load_corpus(folder)
    assert {i: (d.title, d.text) for i, d in corpus.items()} == docs
    assert load_queries(folder) == {i: x for i, (_, x) in docs.items()}


qrels_ids = st.text(
    st.characters(
        blacklist_categories=("Cs", "Zl", "Zp"),
        blacklist_characters='\t\n\r"\x0b\x0c\x1c\x1d\x1e\x85',
    ),
    min_size=1,
    max_size=20,
)


@FAST
@given(
    rows=st.lists(
        st.tuples(qrels_ids, qrels_ids, st.integers(-1000, 1000)), min_size=1, max_size=8
    ),
    header=st.booleans(),
)
def test_qrels_round_trip_with_any_ids(tmp_path_factory, rows, header):
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += [f"{q}\t{d}\t{s}" for q, d, s in rows]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    want: dict = {}
    for q, d, s in rows:
        want.setdefault(q, {})[d] = s
    assert load_qrels(folder) == want  # ids exactly as written, every judgment kept


@FAST
@given(data=st.binary(max_size=300), name=st.sampled_from(["corpus", "queries", "qrels"]))
def test_any_bytes_give_a_result_or_a_data_error(tmp_path_factory, data, name):
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir()
    target = folder / ("qrels/test.tsv" if name == "qrels" else f"{name}.jsonl")
    target.write_bytes(data)
    load = {"corpus": load_corpus, "queries": load_queries, "qrels": load_qrels}[name]
    try:
        load(folder)
    except DataError as e:
        assert str(e).startswith(str(target))


def probe(tmp_path: Path, name: str, content: bytes) -> str:
    (tmp_path / "qrels").mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(content)
    load = (
        load_qrels
        if name.startswith("qrels")
        else load_corpus
        if "corpus" in name
        else load_queries
    )
    with pytest.raises(DataError) as e:
        load(tmp_path)
    return str(e.value)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        (
            "corpus.jsonl.gz",
            gzip.compress(b'{"_id": "a", "text": "x"}\n' * 50)[:-20] + b"\x00" * 20,
            "cannot be read",
        ),
        ("corpus.jsonl", b"[" * 100_000 + b"\n", ":1: not valid JSON"),
        (
            "queries.jsonl",
            b'{"_id": "q", "text": "x \\ud800"}\n',
            ':1: "text" holds a lone surrogate',
        ),
        (
            "corpus.jsonl",
            b'{"_id": "d", "text": "\\udfff y"}\n',
            ':1: "text" holds a lone surrogate',
        ),
        ("corpus.jsonl", b'{"_id": ' + b"9" * 5000 + b', "text": "x"}\n', ":1: not valid JSON"),
        (
            "qrels/test.tsv",
            b"q\td\t100000000000000000000000\n",
            ":1: score 100000000000000000000000 is out of range",
        ),
        ("qrels/test.tsv", b"q\td\t3000000000\n", ":1: score 3000000000 is out of range"),
        ("qrels/test.tsv", b"q\td\t" + b"1" * 140_000 + b"\n", "test.tsv:1: "),
        ("qrels/test.tsv", b"q\td\t1\nq\t\xff\t1\n", "not UTF-8 text (byte 0xff"),
        ("qrels/test.tsv", b"q\td\t0.5\n", ":1: score must be an integer, got '0.5'"),
        ("qrels/test.tsv", "q\td\t1\nq\te\t٣\n".encode(), ":2: score must be an integer"),
        (
            "qrels/test.tsv",
            b"query-id\tcorpus-id\tscore\nq\td\t1_0\n",
            ":2: score must be an integer, got '1_0'",
        ),
    ],
)
def test_hostile_files_get_one_line_errors(tmp_path, name, content, needle):
    message = probe(tmp_path, name, content)
    assert needle in message and "\n" not in message
    assert len(message) < 400  # never the file's content in bulk


def test_qrels_ids_are_taken_as_written(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("q1\td\xa0\t1\n q2\td2 \t2\n", encoding="utf-8")
    assert load_qrels(tmp_path) == {"q1": {"d\xa0": 1}, " q2": {"d2 ": 2}}
