"""Fusing the pool's members: dense mixtures in one search, and dense with lexical by score or rank.

Documents are embedded by the base model only, so for any query vectors ``q_k`` and weights
``w_k``: ``<sum_k w_k q_k, d> = sum_k w_k <q_k, d>``. A weighted mixture of dense members is
therefore exact score fusion of their full rankings, done in one index search
(:func:`mix_queries`). Dense and lexical scores live on different scales, so they are fused per
query after normalising each list's own top hits (:func:`fuse_scores`), or by reciprocal rank
(:func:`reciprocal_rank`, Cormack et al. 2009, ``k = 60``). Three normalisations
(:data:`NORMALISATIONS`): ``"minmax"`` maps a list's lowest and highest score to 0 and 1;
``"max"`` divides by the highest, i.e. min-max with the score's theoretical floor of 0 (BM25 is
never negative; a cosine below 0 is no match) instead of the list's own lowest: Bruch et al.
2023's "theoretical min-max", which keeps how far apart a list's hits are, so a flat list (no
confident match) moves the fused ranking less than a peaked one. ``"zscore"`` subtracts the
mean of the query's scores over the **whole corpus** and divides by their standard deviation
(:data:`Stats`), so a hit counts by how far it stands out from every document, not from the
list's own tail; the indexes supply those moments (dense: exactly, from the corpus embeddings'
mean and covariance, :class:`ScoreMoments`; BM25: from the scores it computes anyway), and a
list without them falls back to its own mean and deviation. Whatever the normalisation, a
document missing from a list gets that list's lowest normalised score. Pure numpy: testable
without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

Hits = list[tuple[str, float]]
Normalisation = Literal["minmax", "max", "zscore"]
NORMALISATIONS: tuple[Normalisation, ...] = ("minmax", "max", "zscore")
#: ``(mean, standard deviation)`` of one query's scores over every document of the corpus
Stats = tuple[float, float]


class ScoreMoments:
    """The first two moments of a growing set of document embeddings, so that any query's score
    distribution over them is known without scoring them: for a query ``q``, the scores
    ``<q, d>`` have mean ``<q, mu>`` and variance ``q' (S / n - mu mu') q``, with ``S`` the sum of
    ``d d'``. Exact, ``O(dim^2)`` per query, ``dim^2`` floats of memory."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    def add(self, embeddings: np.ndarray) -> None:
        e = np.asarray(embeddings, dtype=np.float64)
        self.count += len(e)
        self._sum += e.sum(axis=0)
        self._outer += e.T @ e

    def stats(self, queries: np.ndarray) -> np.ndarray:
        """``(n, 2)``: each query row's score mean and standard deviation over the documents
        added so far (NaN for none)."""
        q = np.asarray(queries, dtype=np.float64)
        if self.count == 0:
            return np.full((len(q), 2), np.nan)
        mu = self._sum / self.count
        cov = self._outer / self.count - np.outer(mu, mu)
        var = np.einsum("id,de,ie->i", q, cov, q)
        return np.stack([q @ mu, np.sqrt(np.maximum(var, 0.0))], axis=1)


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


def _known(stats: Stats | None) -> bool:
    return stats is not None and bool(np.isfinite(stats).all()) and stats[1] > 0


def normalise(
    hits: Hits, how: Normalisation = "minmax", stats: Stats | None = None
) -> tuple[dict[str, float], float]:
    """Each hit's normalised score, and the list's lowest (what a missing document gets).

    ``"max"`` falls back to ``"minmax"`` for a list whose best score is not positive, or whose
    lowest lies further below 0 than its best above (0 is then no floor to measure from); so
    its scores stay in [-1, 1]. With ``"minmax"`` and ``"max"``, a list whose scores are all
    equal gets 1 for every hit (each is as good as the list's best) and 0 for a missing
    document. ``"zscore"`` uses ``stats`` (the query's scores over the whole corpus) where they
    are finite with a positive deviation, else the list's own; a list with no spread at all then
    gets 0 everywhere (it says nothing). A list's own spread below a billionth of its largest
    score counts as none: it is rounding, and stretching it to the full range would let one
    unit in the last place decide a ranking (and differ after a change of units)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; use one of {list(NORMALISATIONS)}")
    if not hits:
        return {}, 0.0
    s = np.array([v for _, v in hits], dtype=np.float64)
    tiny = 1e-9 * float(np.abs(s).max())  # a spread below this is rounding, not evidence
    if how == "zscore":
        known = stats is not None and _known(stats)
        mean, sd = stats if stats is not None and known else (s.mean(), s.std())
        if not sd > (0.0 if known else tiny):
            return {d: 0.0 for d, _ in hits}, 0.0
        return {d: float((v - mean) / sd) for d, v in hits}, float((s.min() - mean) / sd)
    hi = s.max()
    lo = 0.0 if how == "max" and hi > 0 and s.min() >= -hi else s.min()
    if hi - lo <= tiny:
        return {d: 1.0 for d, _ in hits}, 0.0
    return {d: float((v - lo) / (hi - lo)) for d, v in hits}, float((s.min() - lo) / (hi - lo))


def fuse_scores(
    dense: Hits,
    lexical: Hits,
    alpha: float,
    k: int,
    how: Normalisation = "minmax",
    stats: tuple[Stats | None, Stats | None] = (None, None),
) -> Hits:
    """``alpha * dense + (1 - alpha) * lexical`` over lists normalised ``how``; top ``k``.

    ``stats`` are each list's corpus-wide score moments, used by ``"zscore"`` only.
    ``alpha = 1`` returns the dense ranking and ``alpha = 0`` the lexical one (scores are then
    the normalised ones). Ties break by document id, so the result does not depend on input order.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return list(dense[:k])
    b, b_low = normalise(lexical, how, stats[1])
    if alpha == 0.0:
        return sorted(b.items(), key=lambda x: (-x[1], x[0]))[:k]
    a, a_low = normalise(dense, how, stats[0])
    fused = {
        d: alpha * a.get(d, a_low) + (1 - alpha) * b.get(d, b_low) for d in a.keys() | b.keys()
    }
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]


def fuse_lists(
    dense: Sequence[Hits],
    lexical: Sequence[Hits],
    alpha: float | Sequence[float] | np.ndarray,
    k: int,
    how: Normalisation = "minmax",
    dense_stats: np.ndarray | None = None,
    lexical_stats: np.ndarray | None = None,
) -> list[Hits]:
    """:func:`fuse_scores` query by query: ``alpha`` one weight or one per query; the stats
    ``(n, 2)`` (or ``None``) as the indexes' ``score_stats`` and ``search_with_stats`` give."""
    n = len(dense)
    if len(lexical) != n:
        raise ValueError(f"{n} dense lists but {len(lexical)} lexical ones")
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim == 0:
        a = np.full(n, float(a))
    elif a.shape != (n,):
        raise ValueError(f"{n} queries but {a.size} dense weights")
    alphas = a.tolist()

    def row(st: np.ndarray | None, i: int) -> Stats | None:
        return None if st is None else (float(st[i, 0]), float(st[i, 1]))

    return [
        fuse_scores(
            dense[i], lexical[i], alphas[i], k, how, (row(dense_stats, i), row(lexical_stats, i))
        )
        for i in range(n)
    ]


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
