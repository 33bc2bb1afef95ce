"""Choosing the pool's default on dev, and how far the choice stands above base + BM25.

The candidates (:mod:`routerretriever.hybrid_eval`) differ by tenths of a point on a few
hundred labelled dev queries, so which family wins can be a matter of a few queries: on the
paper's pool, rerun on another CPU, SciFact's expert came out slightly different and dev chose
a default whose gate declines every expert (docs/results.md). :func:`dev_margin` says how
large the winner's lead is against its standard error, and the report prints it;
:func:`lead_or_base` keeps base + BM25 unless that lead is clear (an experiment's
``min_lead_se``, off by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

MAX_PASSES = 0.5  # expert passes per query (on dev) the default may need


class Scored(Protocol):
    """What choosing needs of a candidate (:class:`routerretriever.hybrid_eval.Candidate`)."""

    name: str
    family: str
    cost: float  # expert passes per query beyond the routing pass, on dev
    dev_scores: dict[str, np.ndarray]  # domain -> nDCG@10 per dev query

    def dev_mean(self, domains: Sequence[str] | None = None) -> float: ...


C = TypeVar("C", bound=Scored)


def choose(
    cands: Sequence[C], labelled: Sequence[str], max_cost: float = MAX_PASSES
) -> tuple[C, dict[str, C]]:
    """The default: per family, the lexical weight and normalisation best on the labelled dev
    domains; then the family best there too, among those costing at most ``max_cost`` expert
    passes per query (every domain's dev instances stand in when no domain has labelled dev
    queries). Returns the default and each family's choice.

    Why not the family best on every domain's dev instances: pseudo-queries favour BM25 (see
    :mod:`routerretriever.hybrid_eval`), so a family whose lexical weight came out lower wins
    there without being better on real queries (the demo's cuts: base + BM25 at 0.3 won "dev
    (all)" over routed families at 0.6 that were better on the labelled dev queries).

    Why :data:`MAX_PASSES` is 0.5: the default must answer at least half as fast as the plain
    base model. A routing pass plus one expert pass per query is two passes, and measured at
    0.49-0.53 of plain speed with BM25 (docs/results.md, a float32 CPU): on the bar's edge. At
    most half a pass per query on average leaves a margin for BM25, fusion and machine noise."""
    on = list(labelled) or None  # None: every dev domain
    best: dict[str, C] = {}
    for c in cands:
        if c.family not in best or c.dev_mean(on) > best[c.family].dev_mean(on):
            best[c.family] = c
    fast = [c for c in best.values() if c.cost <= max_cost + 1e-9]
    return max(fast, key=lambda c: c.dev_mean(on)), best


@dataclass(frozen=True)
class Margin:
    """How far one candidate's dev score stands above another's, on the same dev queries."""

    over: str  # the other candidate's name
    difference: float  # mean over domains of the mean per-query difference (nDCG@10)
    se: float  # its standard error, from the per-query differences

    @property
    def within_noise(self) -> bool:
        """The lead is no larger than one standard error: dev does not tell the two apart."""
        return self.difference <= self.se


def dev_margin(c: Scored, ref: Scored, domains: Sequence[str]) -> Margin:
    """``c``'s lead over ``ref`` on ``domains``' dev queries, scored as :func:`choose` scores
    them (each domain's mean, then their mean), with the standard error of that difference:
    ``sqrt(sum_d var_d / n_d) / D`` over the per-query paired differences of each domain."""
    if not domains:
        raise ValueError("need at least one dev domain")
    diffs = []
    for d in domains:
        a, b = c.dev_scores[d], ref.dev_scores[d]
        if a.shape != b.shape:
            raise ValueError(f"{d}: {c.name!r} and {ref.name!r} were scored on different queries")
        diffs.append(a - b)
    var = sum(float(np.var(x, ddof=1)) / len(x) if len(x) > 1 else 0.0 for x in diffs)
    difference = float(np.mean([x.mean() for x in diffs]))
    return Margin(ref.name, difference, float(np.sqrt(var)) / len(domains))


def lead_or_base(best: C, base: C, domains: Sequence[str], min_se: float = 0.0) -> tuple[C, Margin]:
    """``best`` unless its dev lead over ``base`` (base + BM25) is under ``min_se`` standard
    errors, then ``base``: a significance rule (1.64: one-sided 5%) for a pool whose families
    differ by a few dev queries. Returns the default and ``best``'s margin over ``base``."""
    margin = dev_margin(best, base, domains)
    if min_se > 0 and best is not base and margin.difference < min_se * margin.se:
        return base, margin
    return best, margin
