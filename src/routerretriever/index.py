"""The shared corpus index: exact inner-product search over base-model document embeddings.

One index serves the base model and every expert, since documents never go through an expert.
The interface (``add``, ``search``, ``score_stats``, ``__len__``) is kept small so other backends
can follow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from routerretriever.fusion import ScoreMoments

logger = logging.getLogger(__name__)

Hits = list[tuple[str, float]]


class VectorIndex(Protocol):
    """What the retriever needs of an index backend."""

    def add(self, ids: Sequence[str], embeddings: np.ndarray) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]: ...

    def score_stats(self, queries: np.ndarray) -> np.ndarray | None:
        """``(n, 2)``: each query's score mean and deviation over the whole corpus, for z-score
        fusion (:mod:`routerretriever.fusion`); ``None`` where the backend does not know them."""
        ...

    def __len__(self) -> int: ...


def _check_search(
    queries: np.ndarray, k: int, exclude_ids: Sequence[str | None] | None, dim: int
) -> None:
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (n, {dim}), got {queries.shape}")
    if exclude_ids is not None and len(exclude_ids) != len(queries):
        raise ValueError("exclude_ids must have one entry per query")


class FaissIndex:
    """FAISS ``IndexFlatIP``: exact top-k by inner product (cosine when vectors are normalised)."""

    def __init__(self, dim: int) -> None:
        import faiss

        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self._index = faiss.IndexFlatIP(dim)
        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self._moments = ScoreMoments(dim)

    @classmethod
    def from_embeddings(cls, ids: Sequence[str], embeddings: np.ndarray) -> FaissIndex:
        index = cls(embeddings.shape[1])
        index.add(ids, embeddings)
        return index

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Append documents; ``embeddings`` is ``(len(ids), dim)``."""
        if embeddings.ndim != 2 or embeddings.shape != (len(ids), self.dim):
            raise ValueError(
                f"embeddings must have shape ({len(ids)}, {self.dim}), got {embeddings.shape}"
            )
        dup = next((i for i in ids if i in self._id_set), None)
        if dup is not None or len(set(ids)) != len(ids):
            raise ValueError(f"duplicate document id {dup or 'within the batch'!r} in the index")
        self._index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        self._ids.extend(ids)
        self._id_set.update(ids)
        self._moments.add(embeddings)

    def score_stats(self, queries: np.ndarray) -> np.ndarray:
        """``(n, 2)``: the mean and standard deviation of each query row's inner product with
        every indexed document (exact, from the documents' moments; NaN when empty)."""
        return self._moments.stats(queries)

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]:
        """Top-``k`` ``(doc_id, score)`` per query row of ``queries`` ``(n, dim)``, best first.

        ``exclude_ids[i]``, when given, is dropped from query ``i``'s hits: BEIR's convention
        that a document with the query's own id is not a hit (ArguAna's queries are documents).
        """
        _check_search(queries, k, exclude_ids, self.dim)
        if not self._ids or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        extra = int(exclude_ids is not None and any(q in self._id_set for q in exclude_ids))
        kk = min(k + extra, len(self._ids))
        scores, idx = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), kk)
        results: list[Hits] = []
        for row in range(len(queries)):
            skip = exclude_ids[row] if exclude_ids is not None else None
            hits = [
                (self._ids[j], float(s))
                for j, s in zip(idx[row], scores[row], strict=True)
                if j >= 0 and self._ids[j] != skip
            ]
            results.append(hits[:k])
        return results


MAX_TEXT_BYTES = 65_535  # Milvus's longest VARCHAR: longer documents are cut for BM25 only


def milvus_analyzer(stemmer: str | None = "english", stopwords: str | None = "en") -> dict:
    """Milvus analyzer settings matching :func:`routerretriever.lexical.tokenize`: standard
    tokenizer, lower case, bm25s's English stopwords (written out: Milvus Lite 3.2 ignores the
    ``_english_`` shorthand), Snowball stemmer (which Milvus Lite 3.2 accepts but does not apply,
    so there Milvus's ranking is that of unstemmed BM25; a Milvus server stems)."""
    filters: list[Any] = ["lowercase"]
    if stopwords is not None:
        if stopwords not in ("en", "english"):
            raise ValueError(
                f"Milvus full-text search knows English stopwords only, not {stopwords!r}"
            )
        from bm25s.stopwords import STOPWORDS_EN

        filters.append({"type": "stop", "stop_words": sorted(STOPWORDS_EN)})
    if stemmer is not None:
        filters.append({"type": "stemmer", "language": stemmer})
    return {"tokenizer": "standard", "filter": filters}


def _fit_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary (lone surrogates,
    which UTF-8 cannot carry, replaced)."""
    raw = text.encode("utf-8", "replace")
    return raw[:limit].decode("utf-8", "ignore") if len(raw) > limit else raw.decode("utf-8")


class _UnimplementedFilter(logging.Filter):
    """Drops the tracebacks Milvus Lite's in-process gRPC server logs for the calls newer
    ``pymilvus`` clients try first and Lite does not implement (the client then falls back)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "not implemented" in str(exc))


_GRPC_FILTER = _UnimplementedFilter()


class MilvusIndex:
    """Milvus through ``pymilvus``: a FLAT (exact) inner-product collection.

    ``uri`` is a local file for the embedded Milvus Lite (``"./index.db"``; needs the
    ``milvus-lite`` package) or a server address (``"http://host:19530"``) for a cluster. The
    collection holds document ids (``VARCHAR``) and vectors; ``overwrite`` drops an existing one.

    With ``text=True`` it also holds each document's text and Milvus's own BM25 full-text index
    (a BM25 function into a sparse field, ``k1``/``b`` as given), searched by
    :meth:`search_text`, so the lexical side lives, scales and replicates with the dense side.
    Milvus Lite supports this (checked with milvus-lite 3.2.2: BM25 function, sparse
    inverted index, standard tokenizer with lowercase/stop/stemmer filters; its BM25 scores are
    returned negated, which :meth:`search_text` undoes).
    """

    _INSERT_ROWS = 2000  # rows per insert call (bounded request size)

    def __init__(
        self,
        uri: str,
        dim: int,
        *,
        collection: str = "routerretriever",
        overwrite: bool = False,
        token: str = "",
        text: bool = False,
        k1: float = 1.5,
        b: float = 0.75,
        analyzer: dict | None = None,
    ) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim, self.collection, self.uri, self.text = dim, collection, uri, text
        grpc_log = logging.getLogger("grpc._server")
        if _GRPC_FILTER not in grpc_log.filters:
            grpc_log.addFilter(_GRPC_FILTER)
        self._client = MilvusClient(uri, token=token)
        if overwrite and self._client.has_collection(collection):
            self._client.drop_collection(collection)
        # the score moments of documents added through this object: known for a new collection
        self._moments: ScoreMoments | None = None
        if not self._client.has_collection(collection):
            self._moments = ScoreMoments(dim)
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=1024)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            params = self._client.prepare_index_params()
            params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            if text:
                schema.add_field(
                    "text",
                    DataType.VARCHAR,
                    max_length=MAX_TEXT_BYTES,
                    enable_analyzer=True,
                    analyzer_params=analyzer or milvus_analyzer(),
                )
                schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
                schema.add_function(
                    Function(
                        name="bm25",
                        function_type=FunctionType.BM25,
                        input_field_names=["text"],
                        output_field_names=["sparse"],
                    )
                )
                params.add_index(
                    field_name="sparse",
                    index_type="SPARSE_INVERTED_INDEX",
                    metric_type="BM25",
                    params={"bm25_k1": k1, "bm25_b": b},
                )
            self._client.create_collection(collection, schema=schema, index_params=params)
        else:
            fields = self._client.describe_collection(collection)["fields"]
            if text and not any(f["name"] == "sparse" for f in fields):
                raise ValueError(
                    f"Milvus collection {collection!r} at {uri} has no full-text (BM25) field; "
                    "pass overwrite=True to rebuild it with text=True"
                )
            found = next((f for f in fields if f["name"] == "vector"), None)
            have = None if found is None else found.get("params", {}).get("dim")
            if have is None or int(have) != dim:
                raise ValueError(
                    f"Milvus collection {collection!r} at {uri} has vector dim {have}, not {dim}; "
                    "pass overwrite=True to replace it"
                )
        self._client.load_collection(collection)

    @classmethod
    def from_embeddings(
        cls, uri: str, ids: Sequence[str], embeddings: np.ndarray, **kwargs: object
    ) -> MilvusIndex:
        index = cls(uri, embeddings.shape[1], overwrite=True, **kwargs)  # type: ignore[arg-type]
        index.add(ids, embeddings)
        return index

    def __len__(self) -> int:
        res = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def add(
        self, ids: Sequence[str], embeddings: np.ndarray, texts: Sequence[str] | None = None
    ) -> None:
        """Insert documents; ``embeddings`` is ``(len(ids), dim)``; existing ids are refused.
        A full-text collection needs each document's ``texts`` too."""
        if embeddings.ndim != 2 or embeddings.shape != (len(ids), self.dim):
            raise ValueError(
                f"embeddings must have shape ({len(ids)}, {self.dim}), got {embeddings.shape}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate document id within the batch")
        if self.text and (texts is None or len(texts) != len(ids)):
            raise ValueError("a full-text collection needs one text per document id")
        for start in range(0, len(ids), self._INSERT_ROWS):
            chunk = list(ids[start : start + self._INSERT_ROWS])
            taken = self._client.get(self.collection, ids=chunk, output_fields=["id"])
            if taken:
                raise ValueError(f"duplicate document id {taken[0]['id']!r} in the index")
            rows = embeddings[start : start + self._INSERT_ROWS].astype(np.float32)
            records: list[dict[str, Any]] = [
                {"id": i, "vector": v.tolist()} for i, v in zip(chunk, rows, strict=True)
            ]
            if texts is not None and self.text:
                for r, t in zip(records, texts[start : start + self._INSERT_ROWS], strict=True):
                    r["text"] = _fit_bytes(t, MAX_TEXT_BYTES)
            self._client.insert(self.collection, records)
            if self._moments is not None:  # chunk by chunk: what is in, even before a failure
                self._moments.add(rows)
        self._client.flush(self.collection)

    def score_stats(self, queries: np.ndarray) -> np.ndarray | None:
        """As :meth:`FaissIndex.score_stats` for a collection this object created; ``None`` for
        one it opened with documents already in it (z-score fusion then uses each list's own)."""
        return None if self._moments is None else self._moments.stats(queries)

    def lexical(self) -> MilvusText:
        """This collection's BM25 full-text search as a lexical index (see ``LexicalIndex``)."""
        return MilvusText(self)

    def search_text(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]:
        """Milvus's BM25 full-text search: top-``k`` ``(doc_id, score)`` per query text, best
        first, positive scores only (as :meth:`routerretriever.lexical.BM25Index.search`)."""
        if not self.text:
            raise ValueError(f"Milvus collection {self.collection!r} has no full-text index")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if exclude_ids is not None and len(exclude_ids) != len(queries):
            raise ValueError("exclude_ids must have one entry per query")
        if not queries:
            return []
        extra = int(exclude_ids is not None and any(q is not None for q in exclude_ids))
        found = self._client.search(
            self.collection,
            data=[_fit_bytes(q, MAX_TEXT_BYTES) for q in queries],
            limit=k + extra,
            anns_field="sparse",
            output_fields=["id"],
            search_params={"metric_type": "BM25"},
        )
        results: list[Hits] = []
        for row, hits in enumerate(found):
            skip = exclude_ids[row] if exclude_ids is not None else None
            pairs = [(str(h["id"]), abs(float(h["distance"]))) for h in hits if h["id"] != skip]
            pairs = sorted((p for p in pairs if p[1] > 0), key=lambda p: -p[1])
            results.append(pairs[:k])
        return results

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]:
        """As :meth:`FaissIndex.search`: top-``k`` ``(doc_id, score)`` per query, best first."""
        _check_search(queries, k, exclude_ids, self.dim)
        if len(queries) == 0:
            return []
        extra = int(exclude_ids is not None and any(q is not None for q in exclude_ids))
        found = self._client.search(
            self.collection,
            data=queries.astype(np.float32).tolist(),
            limit=k + extra,
            anns_field="vector",
            output_fields=["id"],
            search_params={"metric_type": "IP"},
        )
        results: list[Hits] = []
        for row, hits in enumerate(found):
            skip = exclude_ids[row] if exclude_ids is not None else None
            pairs = [(str(h["id"]), float(h["distance"])) for h in hits if h["id"] != skip]
            results.append(pairs[:k])
        return results


class MilvusText:
    """A :class:`MilvusIndex`'s full-text side, searched like a ``BM25Index``."""

    def __init__(self, index: MilvusIndex) -> None:
        if not index.text:
            raise ValueError(f"Milvus collection {index.collection!r} has no full-text index")
        self.index = index

    def search(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]:
        return self.index.search_text(queries, k, exclude_ids)

    def search_with_stats(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> tuple[list[Hits], None]:
        """:meth:`search`; Milvus returns no corpus-wide score moments (``None``)."""
        return self.search(queries, k, exclude_ids), None
