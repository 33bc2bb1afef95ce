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
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        if exclude_ids is not None and len(exclude_ids) != len(queries):
            raise ValueError("exclude_ids must have one entry per query")
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
