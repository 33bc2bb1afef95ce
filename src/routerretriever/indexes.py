"""The indexes a server searches, built for a corpus: the dense index of base-model document
embeddings (FAISS in process, or a Milvus collection reused across restarts) and the lexical
index beside it (Milvus's own BM25 full-text search, or a cached ``bm25s`` index); and the
search of both, fused (:func:`hybrid_search`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routerretriever.data import Corpus
from routerretriever.encoder import Encoder
from routerretriever.fusion import Hits, Normalisation, fuse_lists
from routerretriever.index import FaissIndex, MilvusIndex, VectorIndex, milvus_analyzer
from routerretriever.lexical import BM25Config, BM25Index, LexicalIndex
from routerretriever.runtime import Backend
from routerretriever.store import corpus_fingerprint, embed_corpus

logger = logging.getLogger(__name__)


def corpus_index(
    encoder: Encoder,
    corpus: Corpus,
    *,
    backend: str = "faiss",
    milvus_uri: str | None = None,
    cache_dir: str | Path | None = None,
    embedder: Callable[[Corpus], np.ndarray] | None = None,
    batch_size: int = 32,
    bm25: BM25Config | None = None,
    runtime: Backend = "auto",
) -> VectorIndex:
    """The shared index of ``corpus``'s base-model embeddings: FAISS in process, or Milvus.

    A Milvus collection is named after the base model and the corpus fingerprints, so a restart
    against a Milvus that already holds this corpus reuses it instead of inserting it again; a
    collection left incomplete (e.g. by a killed start) is rebuilt. With ``bm25`` a Milvus
    collection also holds the texts and Milvus's own BM25 full-text index (see
    :func:`lexical_index`); FAISS ignores it. ``runtime`` embeds the documents
    (:mod:`routerretriever.runtime`).
    """

    def embeddings() -> tuple[list[str], np.ndarray]:
        emb = embed_corpus(
            encoder,
            corpus,
            cache_dir=cache_dir,
            batch_size=batch_size,
            embedder=embedder,
            backend=runtime,
        )
        return emb.ids, emb.embeddings

    if backend == "faiss":
        return FaissIndex.from_embeddings(*embeddings())
    if backend != "milvus" or not milvus_uri:
        raise ValueError(f"index backend must be 'faiss' or 'milvus' with a URI, got {backend!r}")
    if bm25 is not None and bm25.feedback:
        raise ValueError(MILVUS_FEEDBACK)
    name = f"rr_{encoder.fingerprint}_{corpus_fingerprint(corpus)}"
    text: dict[str, Any] = {}
    if bm25 is not None:
        name += f"_bm25_{bm25.fingerprint}"
        text = {
            "text": True,
            "k1": bm25.k1,
            "b": bm25.b,
            "analyzer": milvus_analyzer(bm25.stemmer, bm25.stopwords),
        }
    index = MilvusIndex(milvus_uri, encoder.dim, collection=name, **text)
    if len(index) == len(corpus):
        logger.info("re-using Milvus collection %s (%d documents)", name, len(corpus))
        return index
    index = MilvusIndex(milvus_uri, encoder.dim, collection=name, overwrite=True, **text)
    ids, emb = embeddings()
    index.add(ids, emb, [corpus[i].full_text for i in ids] if bm25 is not None else None)
    return index


MILVUS_FEEDBACK = (
    "BM25 feedback (bm25 feedback_docs > 0) needs the bm25s index: Milvus's full-text search "
    "takes no weighted words. Use the faiss backend, or feedback_docs = 0"
)


def lexical_index(
    index: VectorIndex,
    corpus: Corpus,
    bm25: BM25Config | None = None,
    cache_dir: str | Path | None = None,
) -> LexicalIndex:
    """The lexical side beside ``index``: a Milvus collection's own BM25 full-text search when
    it has one (built by :func:`corpus_index` with ``bm25``), else a :class:`BM25Index` of
    ``corpus`` (cached on disk)."""
    if isinstance(index, MilvusIndex) and index.text:
        if bm25 is not None and bm25.feedback:
            raise ValueError(MILVUS_FEEDBACK)
        return index.lexical()
    return BM25Index.cached(corpus, bm25 or BM25Config(), cache_dir)


def hybrid_search(
    index: VectorIndex,
    lexical: LexicalIndex,
    emb: np.ndarray,
    texts: Sequence[str],
    k: int,
    alpha: float | Sequence[float],
    how: Normalisation = "minmax",
    depth: int = 100,
    exclude_ids: Sequence[str | None] | None = None,
) -> list[Hits]:
    """Each side's top ``max(k, depth)`` for the query vectors ``emb`` and the query ``texts``,
    fused by :func:`fuse_lists` at dense weight ``alpha`` (one, or one per query), with the
    corpus-wide moments when ``how`` is ``"zscore"``."""
    kk = max(k, depth)
    dense = index.search(emb, kk, exclude_ids=exclude_ids)
    if how == "zscore":
        lex, lex_stats = lexical.search_with_stats(texts, kk, exclude_ids)
        return fuse_lists(dense, lex, alpha, k, how, index.score_stats(emb), lex_stats)
    return fuse_lists(dense, lexical.search(texts, kk, exclude_ids), alpha, k, how)
