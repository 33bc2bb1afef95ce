"""Routing a query to one expert by its similarity to the pilot embeddings.

RouterRetriever (Lee et al., AAAI 2025) routes by the mean similarity between the query's
base-model embedding and each expert's pilots, and picks the argmax. That plain mean gives a
pilot made of 3 noisy instances the same say as one made of 800, so each domain's expert loses
many of its own domain's queries; ``"weighted"`` weights each pilot by its group size, which makes
an expert's score the mean similarity to *all* instances it won. ``"nearest"`` takes the best
single pilot. Pure numpy: testable without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from routerretriever.pilots import PilotLibrary

Rule = Literal["mean", "weighted", "nearest"]
RULES: tuple[str, ...] = ("mean", "weighted", "nearest")


@dataclass(frozen=True)
class RouteDecision:
    """The chosen expert and every expert's routing score, to explain the choice."""

    expert: str
    scores: dict[str, float]


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
            pilots.experts[b], {e: float(v) for e, v in zip(pilots.experts, row, strict=True)}
        )
        for b, row in zip(best, scores, strict=True)
    ]
