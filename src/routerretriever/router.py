"""Routing a query to one expert by its similarity to the pilot embeddings.

RouterRetriever (Lee et al., AAAI 2025) routes by the mean similarity between the query's
base-model embedding and each expert's pilots, and picks the argmax. That plain mean gives a
pilot made of 3 noisy instances the same say as one made of 800, so each domain's expert loses
many of its own domain's queries; ``"weighted"`` weights each pilot by its group size, which makes
an expert's score the mean similarity to *all* instances it won. ``"nearest"`` takes the best
single pilot. Pure numpy: testable without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from routerretriever.pilots import PilotLibrary

Rule = Literal["mean", "weighted", "nearest"]
RULES: tuple[Rule, ...] = ("mean", "weighted", "nearest")


@dataclass(frozen=True)
class RouteDecision:
    """Why a query was searched as it was: the member with the most weight (``expert``), every
    member's routing score, the weights of the dense members used (``members``; one member with
    weight 1 for hard routing), and the weight of BM25 in the fused ranking (0: dense only)."""

    expert: str
    scores: dict[str, float]
    members: dict[str, float] = field(default_factory=dict)
    lexical_weight: float = 0.0


def expert_scores(query_emb: np.ndarray, pilots: PilotLibrary, rule: Rule = "mean") -> np.ndarray:
    """Routing score of every expert for every query: ``(n, T)``, columns in ``pilots.experts``.

    An expert with no pilot scores ``-inf`` (it never won an instance, so it is never chosen).
    """
    if rule not in RULES:
        raise ValueError(f"unknown routing rule {rule!r}; use one of {list(RULES)}")
    sim = query_emb @ pilots.embeddings.T  # (n, P)
    out = np.full((len(query_emb), len(pilots.experts)), -np.inf, dtype=np.float64)  # (n, T)
    for j, expert in enumerate(pilots.experts):
        cols = [i for i, p in enumerate(pilots.pilots) if p.expert == expert]
        if not cols:
            continue
        s = sim[:, cols]  # (n, p_e)
        if rule == "mean":
            out[:, j] = s.mean(axis=1)
        elif rule == "nearest":
            out[:, j] = s.max(axis=1)
        else:
            w = np.array([pilots.pilots[i].size for i in cols], dtype=np.float64)  # (p_e,)
            out[:, j] = s @ (w / w.sum())
    return out


def route(query_emb: np.ndarray, pilots: PilotLibrary, rule: Rule = "mean") -> list[RouteDecision]:
    """Pick one expert per query (argmax of :func:`expert_scores`; ties go to the first listed)."""
    scores = expert_scores(query_emb, pilots, rule)  # (n, T)
    best = scores.argmax(axis=1)  # (n,)
    return [
        RouteDecision(
            pilots.experts[b],
            {e: float(v) for e, v in zip(pilots.experts, row, strict=True)},
            {pilots.experts[b]: 1.0},
        )
        for b, row in zip(best, scores, strict=True)
    ]


def neighbour_weights(
    query_emb: np.ndarray,
    inst_emb: np.ndarray,
    k: int,
    tau: float,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training instances nearest each query and their softmax(similarity / tau) weights.

    ``exclude[i]``, when given, is the row of ``inst_emb`` that query ``i`` itself is (``-1``:
    none): it is never its own neighbour, so an instance's score never predicts itself.
    Returns ``(idx, w)``, both ``(n, k)``; each row of ``w`` sums to 1.
    """
    if not 1 <= k <= len(inst_emb) - (exclude is not None):
        raise ValueError(f"k must be in [1, {len(inst_emb) - (exclude is not None)}], got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    sim = query_emb.astype(np.float64) @ inst_emb.T.astype(np.float64)  # (n, N)
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        sim[rows, exclude[rows]] = -np.inf
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (n, k)
    s = np.take_along_axis(sim, idx, axis=1) / tau  # (n, k)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    return idx, w / w.sum(axis=1, keepdims=True)


def expected_scores(
    query_emb: np.ndarray,
    inst_emb: np.ndarray,
    inst_scores: np.ndarray,
    k: int = 80,
    tau: float = 0.05,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Each candidate's expected score for each query: the similarity-weighted mean of its scores
    on the query's ``k`` nearest training instances.

    ``inst_scores`` is ``(N, C)``: candidate ``c``'s nDCG@10 on instance ``j`` (a candidate is a
    pool member, or a member with a lexical weight). Returns ``(n, C)``. See
    :func:`neighbour_weights` for ``exclude``.
    """
    idx, w = neighbour_weights(query_emb, inst_emb, k, tau, exclude)  # (n, k), (n, k)
    return np.einsum("nk,nkc->nc", w, inst_scores[idx])  # (n, C)
