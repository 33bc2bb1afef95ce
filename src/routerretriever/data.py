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
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routerretriever.errors import DataError

logger = logging.getLogger(__name__)

MAX_ID_CHARS = 1024  # longer ids are refused: no collection needs them, and they cost memory
MAX_GRADE = 1000  # relevance grades beyond this are refused (pytrec_eval allocates by grade)
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: no '٣', no '1_0'
_NUMBER = re.compile(r"[+-]?[0-9]*\.?[0-9]+([eE][+-]?[0-9]+)?")

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
                except RecursionError:
                    raise DataError("not valid JSON: nested too deeply", path, lineno) from None
                except ValueError as e:  # e.g. an integer of more digits than Python reads
                    raise DataError(f"not valid JSON ({str(e)[:80]})", path, lineno) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"expected a JSON object, got {type(obj).__name__}", path, lineno
                    )
                yield lineno, obj
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
            where = f" (after line {lineno})" if "lineno" in locals() else ""
            raise DataError(
                f"cannot be read as UTF-8 JSON lines{where}: {str(e)[:120]}", path
            ) from None


def _get_id(obj: Mapping[str, Any], path: Path, lineno: int, seen: dict[str, int]) -> str:
    if "_id" not in obj:
        raise DataError('missing "_id" field', path, lineno)
    raw = obj["_id"]
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        raise DataError(f'"_id" must be a string, got {type(raw).__name__}', path, lineno)
    doc_id = str(raw)
    if not doc_id or len(doc_id) > MAX_ID_CHARS:
        raise DataError(f'"_id" must be 1 to {MAX_ID_CHARS} characters long', path, lineno)
    if not _is_text(doc_id):
        raise DataError('"_id" holds a lone surrogate (not valid Unicode text)', path, lineno)
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
    if not _is_text(value):
        raise DataError(f'"{key}" holds a lone surrogate (not valid Unicode text)', path, lineno)
    return value


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    first row is already a judgment (a number in the score column) is read without skipping it.
    Ids are taken as written (as in the corpus and queries); scores are ASCII integers from
    ``-MAX_GRADE`` to ``MAX_GRADE``.
    """
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        splits = available_splits(folder)
        if not splits:
            missing = [
                n
                for n in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv")
                if not (Path(folder) / n).is_file() and not (Path(folder) / f"{n}.gz").is_file()
            ]
            raise DataError(
                f"not a BEIR folder: no {', no '.join(missing)} (a BEIR folder holds "
                "corpus.jsonl, queries.jsonl and qrels/<split>.tsv)",
                folder,
            )
        raise DataError(f"unknown split {split!r}; available splits: {splits}", folder)
    qrels: Qrels = {}
    lineno = 0
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 3:
                    raise DataError(
                        f"expected 3 tab-separated fields (query-id, corpus-id, score), "
                        f"got {len(row)}",
                        path,
                        lineno,
                    )
                query_id, doc_id, raw_score = row[0], row[1], row[2].strip(" ")
                if lineno == 1 and not _NUMBER.fullmatch(raw_score):
                    continue  # the header row
                if not _INTEGER.fullmatch(raw_score):
                    raise DataError(
                        f"score must be an integer, got {raw_score[:40]!r}", path, lineno
                    )
                score = int(raw_score)
                if abs(score) > MAX_GRADE:
                    raise DataError(
                        f"score {raw_score[:40]} is out of range: relevance grades must lie "
                        f"within -{MAX_GRADE}..{MAX_GRADE}",
                        path,
                        lineno,
                    )
                for name, value in (("query-id", query_id), ("corpus-id", doc_id)):
                    if not value or len(value) > MAX_ID_CHARS:
                        raise DataError(
                            f"{name} must be 1 to {MAX_ID_CHARS} characters long", path, lineno
                        )
                qrels.setdefault(query_id, {})[doc_id] = score
    except UnicodeDecodeError as e:
        raise DataError(
            f"not UTF-8 text (byte {e.object[e.start]:#04x} after line {lineno})", path
        ) from None
    except csv.Error as e:
        raise DataError(f"not a tab-separated file ({str(e)[:80]})", path, lineno + 1) from None
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
