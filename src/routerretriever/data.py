"""BEIR-format data: ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]`` and ``qrels/<split>.tsv``.

Reads the same things BEIR's ``GenericDataLoader`` reads, with the same semantics (queries are
kept only when the split judges them; qrels keep every row, zero scores included), but a user's
mistake gets a :class:`~routerretriever.errors.DataError` naming the file and line instead of a
bare ``KeyError``. What BEIR tolerates (judged documents missing from the corpus) is logged once
with a count.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routerretriever.errors import DataError

logger = logging.getLogger(__name__)

Queries = dict[str, str]
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Document:
    """One corpus entry. ``title`` may be empty."""

    text: str
    title: str = ""

    @property
    def full_text(self) -> str:
        """Title and text joined as BEIR and sentence-transformers join them for encoding."""
        return (self.title + " " + self.text).strip()


Corpus = dict[str, Document]


@dataclass
class BeirDataset:
    """A BEIR folder loaded for one split: the corpus, the judged queries and their qrels."""

    name: str
    path: Path
    split: str
    corpus: Corpus
    queries: Queries
    qrels: Qrels


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"no {stem} or {stem}.gz in this folder", folder)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's with-block


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line, with errors naming the line."""
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"not valid JSON ({e.msg} at column {e.colno})", path, lineno
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"expected a JSON object, got {type(obj).__name__}", path, lineno
                    )
                yield lineno, obj
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
            raise DataError(f"cannot be read as UTF-8 JSON lines: {e}", path) from None


def _get_id(obj: Mapping[str, Any], path: Path, lineno: int, seen: dict[str, int]) -> str:
    if "_id" not in obj:
        raise DataError('missing "_id" field', path, lineno)
    raw = obj["_id"]
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        raise DataError(f'"_id" must be a string, got {type(raw).__name__}', path, lineno)
    doc_id = str(raw)
    if doc_id in seen:
        raise DataError(
            f"duplicate _id {doc_id!r} (first seen on line {seen[doc_id]})", path, lineno
        )
    seen[doc_id] = lineno
    return doc_id


def _get_str(obj: Mapping[str, Any], key: str, path: Path, lineno: int, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f'missing "{key}" field', path, lineno)
        return ""
    if not isinstance(value, str):
        raise DataError(f'"{key}" must be a string, got {type(value).__name__}', path, lineno)
    return value


def load_corpus(folder: str | Path) -> Corpus:
    """Load ``corpus.jsonl[.gz]`` from a BEIR folder: ``{doc_id: Document}`` in file order."""
    path = _find(Path(folder), "corpus.jsonl")
    corpus: Corpus = {}
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(path):
        doc_id = _get_id(obj, path, lineno, seen)
        corpus[doc_id] = Document(
            text=_get_str(obj, "text", path, lineno, required=True),
            title=_get_str(obj, "title", path, lineno, required=False),
        )
    if not corpus:
        raise DataError("the corpus is empty", path)
    return corpus


def load_queries(folder: str | Path) -> Queries:
    """Load ``queries.jsonl[.gz]`` from a BEIR folder: ``{query_id: text}`` in file order."""
    path = _find(Path(folder), "queries.jsonl")
    queries: Queries = {}
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(path):
        query_id = _get_id(obj, path, lineno, seen)
        queries[query_id] = _get_str(obj, "text", path, lineno, required=True)
    return queries


def available_splits(folder: str | Path) -> list[str]:
    """The qrels splits a BEIR folder has (``qrels/<split>.tsv``), sorted."""
    qrels_dir = Path(folder) / "qrels"
    if not qrels_dir.is_dir():
        return []
    return sorted(p.name[: -len(".tsv")] for p in qrels_dir.glob("*.tsv"))


def load_qrels(folder: str | Path, split: str = "test") -> Qrels:
    """Load ``qrels/<split>.tsv``: ``{query_id: {doc_id: score}}``.

    The file is tab-separated ``query-id  corpus-id  score`` with a header row; a file whose
    first row is already a judgment (integer score) is read without skipping it.
    """
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        splits = available_splits(folder)
        raise DataError(f"unknown split {split!r}; available splits: {splits or 'none'}", folder)
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 3:
                raise DataError(
                    f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(row)}",
                    path,
                    lineno,
                )
            query_id, doc_id, raw_score = (cell.strip() for cell in row)
            try:
                score = int(raw_score)
            except ValueError:
                if lineno == 1:  # the header row
                    continue
                raise DataError(
                    f"score must be an integer, got {raw_score!r}", path, lineno
                ) from None
            qrels.setdefault(query_id, {})[doc_id] = score
    if not qrels:
        raise DataError("no judgments in this qrels file", path)
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR folder for one split, keeping only the queries that split judges.

    Judgments of documents absent from the corpus are kept (BEIR does too; they count as relevant
    documents that cannot be found) and logged once with a count. Judgments of queries absent from
    ``queries.jsonl`` cannot be evaluated: they are dropped and logged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder (expected a BEIR dataset folder)", folder)
    qrels = load_qrels(folder, split)
    corpus = load_corpus(folder)
    all_queries = load_queries(folder)

    missing_queries = [qid for qid in qrels if qid not in all_queries]
    if missing_queries:
        logger.warning(
            "%s: %d judged query id(s) of split %r are not in queries.jsonl (e.g. %r); "
            "their judgments are dropped",
            folder,
            len(missing_queries),
            split,
            missing_queries[0],
        )
        for qid in missing_queries:
            del qrels[qid]
        if not qrels:
            raise DataError(
                f"none of the judged queries of split {split!r} is in queries.jsonl", folder
            )
    missing_docs = sum(1 for rels in qrels.values() for doc_id in rels if doc_id not in corpus)
    if missing_docs:
        logger.warning(
            "%s: %d judgment(s) of split %r point at documents absent from the corpus; kept, as BEIR does",
            folder,
            missing_docs,
            split,
        )
    queries = {qid: all_queries[qid] for qid in qrels}
    return BeirDataset(
        name=folder.name, path=folder, split=split, corpus=corpus, queries=queries, qrels=qrels
    )
