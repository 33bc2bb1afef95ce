"""The shared corpus index: exact inner-product search over base-model document embeddings.

One index serves the base model and every expert, since documents never go through an expert.
The interface (``add``, ``search``, ``__len__``) is kept small so other backends can follow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

Hits = list[tuple[str, float]]


class VectorIndex(Protocol):
    """What the retriever needs of an index backend."""

    def add(self, ids: Sequence[str], embeddings: np.ndarray) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]: ...

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


class MilvusIndex:
    """Milvus through ``pymilvus``: a FLAT (exact) inner-product collection.

    ``uri`` is a local file for the embedded Milvus Lite (``"./index.db"``; needs the
    ``milvus-lite`` package) or a server address (``"http://host:19530"``) for a cluster. The
    collection holds document ids (``VARCHAR``) and vectors; ``overwrite`` drops an existing one.
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
    ) -> None:
        from pymilvus import DataType, MilvusClient

        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim, self.collection, self.uri = dim, collection, uri
        self._client = MilvusClient(uri, token=token)
        if overwrite and self._client.has_collection(collection):
            self._client.drop_collection(collection)
        if not self._client.has_collection(collection):
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=1024)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            params = self._client.prepare_index_params()
            params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            self._client.create_collection(collection, schema=schema, index_params=params)
        else:
            fields = self._client.describe_collection(collection)["fields"]
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

    def add(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Insert documents; ``embeddings`` is ``(len(ids), dim)``; existing ids are refused."""
        if embeddings.ndim != 2 or embeddings.shape != (len(ids), self.dim):
            raise ValueError(
                f"embeddings must have shape ({len(ids)}, {self.dim}), got {embeddings.shape}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate document id within the batch")
        for start in range(0, len(ids), self._INSERT_ROWS):
            chunk = list(ids[start : start + self._INSERT_ROWS])
            taken = self._client.get(self.collection, ids=chunk, output_fields=["id"])
            if taken:
                raise ValueError(f"duplicate document id {taken[0]['id']!r} in the index")
            rows = embeddings[start : start + self._INSERT_ROWS].astype(np.float32)
            self._client.insert(
                self.collection,
                [{"id": i, "vector": v.tolist()} for i, v in zip(chunk, rows, strict=True)],
            )
        self._client.flush(self.collection)

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
