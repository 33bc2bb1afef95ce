"""Fusing the pool's members: dense mixtures in one search, and dense with lexical by score or rank.

Documents are embedded by the base model only, so for any query vectors ``q_k`` and weights
``w_k``: ``<sum_k w_k q_k, d> = sum_k w_k <q_k, d>``. A weighted mixture of dense members is
therefore exact score fusion of their full rankings, done in one index search
(:func:`mix_queries`). Dense and lexical scores live on different scales, so they are fused per
query after min-max normalisation of each list's own top hits (:func:`fuse_scores`: a document
missing from a list gets that list's minimum, 0), or by reciprocal rank (:func:`reciprocal_rank`,
Cormack et al. 2009, ``k = 60``). Pure numpy: testable without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Hits = list[tuple[str, float]]


def mix_queries(member_emb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum of each query's member embeddings.

    Args:
        member_emb: ``(m, n, d)``, member ``k``'s embedding of query ``i`` at ``[k, i]``.
        weights: ``(n, m)``, query ``i``'s weight on member ``k``.
    Returns:
        ``(n, d)`` float32 query vectors; their inner product with a document is the weighted
        sum of the members' scores.
    """
    if member_emb.ndim != 3 or weights.shape != member_emb.shape[:2][::-1]:
        raise ValueError(
            f"weights must have shape (n, m) = {member_emb.shape[:2][::-1]}, got {weights.shape}"
        )
    return np.einsum("kid,ik->id", member_emb, weights).astype(np.float32)  # (n, d)


def _minmax(hits: Hits) -> dict[str, float]:
    if not hits:
        return {}
    s = np.array([v for _, v in hits], dtype=np.float64)
    lo, hi = s.min(), s.max()
    if hi - lo <= 0:  # one hit, or all tied: each is as good as the list's best
        return {d: 1.0 for d, _ in hits}
    return {d: float((v - lo) / (hi - lo)) for d, v in hits}


def fuse_scores(dense: Hits, lexical: Hits, alpha: float, k: int) -> Hits:
    """``alpha * dense + (1 - alpha) * lexical`` over min-max-normalised lists; top ``k``.

    ``alpha = 1`` returns the dense ranking and ``alpha = 0`` the lexical one (scores are then
    the normalised ones). Ties break by document id, so the result does not depend on input order.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return list(dense[:k])
    if alpha == 0.0:
        return sorted(_minmax(lexical).items(), key=lambda x: (-x[1], x[0]))[:k]
    a, b = _minmax(dense), _minmax(lexical)
    fused = {d: alpha * a.get(d, 0.0) + (1 - alpha) * b.get(d, 0.0) for d in a.keys() | b.keys()}
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]


def reciprocal_rank(runs: Sequence[Hits], k: int, c: int = 60) -> Hits:
    """Reciprocal-rank fusion: ``sum over lists of 1 / (c + rank)``, ranks from 1; top ``k``."""
    fused: dict[str, float] = {}
    for hits in runs:
        for rank, (d, _) in enumerate(hits, start=1):
            fused[d] = fused.get(d, 0.0) + 1.0 / (c + rank)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]


def fuse_runs(
    dense: Mapping[str, Hits], lexical: Mapping[str, Hits], alpha: Mapping[str, float], k: int
) -> dict[str, dict[str, float]]:
    """:func:`fuse_scores` for every query id of ``dense``, each with its own ``alpha``."""
    return {q: dict(fuse_scores(dense[q], lexical.get(q, []), alpha[q], k)) for q in dense}
