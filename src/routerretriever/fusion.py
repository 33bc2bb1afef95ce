"""Fusing the pool's members: dense mixtures in one search, and dense with lexical by score or rank.

Documents are embedded by the base model only, so for any query vectors ``q_k`` and weights
``w_k``: ``<sum_k w_k q_k, d> = sum_k w_k <q_k, d>``. A weighted mixture of dense members is
therefore exact score fusion of their full rankings, done in one index search
(:func:`mix_queries`). Dense and lexical scores live on different scales, so they are fused per
query after normalising each list's own top hits (:func:`fuse_scores`), or by reciprocal rank
(:func:`reciprocal_rank`, Cormack et al. 2009, ``k = 60``). Two normalisations
(:data:`NORMALISATIONS`): ``"minmax"`` maps a list's lowest and highest score to 0 and 1;
``"max"`` divides by the highest, i.e. min-max with the score's theoretical floor of 0 (BM25 is
never negative; a cosine below 0 is no match) instead of the list's own lowest: Bruch et al.
2023's "theoretical min-max", which keeps how far apart a list's hits are, so a flat list (no
confident match) moves the fused ranking less than a peaked one. Either way, a document missing
from a list gets that list's lowest normalised score. Pure numpy: testable without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

Hits = list[tuple[str, float]]
Normalisation = Literal["minmax", "max"]
NORMALISATIONS: tuple[Normalisation, ...] = ("minmax", "max")


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


def normalise(hits: Hits, how: Normalisation = "minmax") -> tuple[dict[str, float], float]:
    """Each hit's normalised score, and the list's lowest (what a missing document gets).

    ``"max"`` falls back to ``"minmax"`` for a list whose best score is not positive, or whose
    lowest lies further below 0 than its best above (0 is then no floor to measure from); so
    its scores stay in [-1, 1]. A list whose scores are all equal gets 1 for every hit (each is
    as good as the list's best) and 0 for a missing document."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; use one of {list(NORMALISATIONS)}")
    if not hits:
        return {}, 0.0
    s = np.array([v for _, v in hits], dtype=np.float64)
    hi = s.max()
    lo = 0.0 if how == "max" and hi > 0 and s.min() >= -hi else s.min()
    if hi - lo <= 0:
        return {d: 1.0 for d, _ in hits}, 0.0
    return {d: float((v - lo) / (hi - lo)) for d, v in hits}, float((s.min() - lo) / (hi - lo))


def fuse_scores(
    dense: Hits, lexical: Hits, alpha: float, k: int, how: Normalisation = "minmax"
) -> Hits:
    """``alpha * dense + (1 - alpha) * lexical`` over lists normalised ``how``; top ``k``.

    ``alpha = 1`` returns the dense ranking and ``alpha = 0`` the lexical one (scores are then
    the normalised ones). Ties break by document id, so the result does not depend on input order.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return list(dense[:k])
    b, b_low = normalise(lexical, how)
    if alpha == 0.0:
        return sorted(b.items(), key=lambda x: (-x[1], x[0]))[:k]
    a, a_low = normalise(dense, how)
    fused = {
        d: alpha * a.get(d, a_low) + (1 - alpha) * b.get(d, b_low) for d in a.keys() | b.keys()
    }
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]


def reciprocal_rank(runs: Sequence[Hits], k: int, c: int = 60) -> Hits:
    """Reciprocal-rank fusion: ``sum over lists of 1 / (c + rank)``, ranks from 1; top ``k``."""
    fused: dict[str, float] = {}
    for hits in runs:
        for rank, (d, _) in enumerate(hits, start=1):
            fused[d] = fused.get(d, 0.0) + 1.0 / (c + rank)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]


def fuse_runs(
    dense: Mapping[str, Hits],
    lexical: Mapping[str, Hits],
    alpha: Mapping[str, float],
    k: int,
    how: Normalisation = "minmax",
) -> dict[str, dict[str, float]]:
    """:func:`fuse_scores` for every query id of ``dense``, each with its own ``alpha``."""
    return {q: dict(fuse_scores(dense[q], lexical.get(q, []), alpha[q], k, how)) for q in dense}
