"""What the pool's candidates are scored on: one domain's queries with every member's query
embeddings, the shared index and BM25's hits (:class:`QuerySet`), and what a router may learn
from (:class:`Library`). :mod:`routerretriever.hybrid_eval` scores candidates on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from routerretriever.corpora import CorpusSketch
from routerretriever.encoder import BASE
from routerretriever.evaluation import evaluate
from routerretriever.fusion import Hits, Normalisation, fuse_lists, mix_queries
from routerretriever.index import FaissIndex
from routerretriever.pilots import DomainInstances

if TYPE_CHECKING:
    from routerretriever.experiment import Experiment

DEPTH = 100  # each list's depth before fusion


@dataclass
class QuerySet:
    """One domain's queries (test queries or training/dev instances) and what any candidate needs:
    every member's query embeddings, the shared index, and the BM25 hits."""

    domain: str
    qids: list[str]
    qrels: dict[str, dict[str, int]]
    emb: dict[str, np.ndarray]  # member -> (n, d)
    index: FaissIndex
    lexical: list[Hits]
    labelled: bool
    lexical_stats: np.ndarray | None = None  # (n, 2): BM25's corpus-wide moments per query
    corpus: CorpusSketch | None = None  # the searched corpus, for policies scoped to corpora
    _dense: dict[str, list[Hits]] = field(default_factory=dict)

    @property
    def base(self) -> np.ndarray:
        return self.emb[BASE]  # (n, d): the routing embedding

    def dense_member(self, member: str) -> list[Hits]:
        if member not in self._dense:
            self._dense[member] = self.index.search(self.emb[member], DEPTH, self.qids)
        return self._dense[member]

    def subset(self, idx: np.ndarray) -> QuerySet:
        """These queries at positions ``idx`` only (cached searches carried over)."""
        out = QuerySet(
            self.domain,
            [self.qids[i] for i in idx],
            self.qrels,
            {m: e[idx] for m, e in self.emb.items()},
            self.index,
            [self.lexical[i] for i in idx],
            self.labelled,
            None if self.lexical_stats is None else self.lexical_stats[idx],
            self.corpus,
        )
        out._dense = {m: [h[i] for i in idx] for m, h in self._dense.items()}
        return out

    def ndcg(self, run: Sequence[Hits]) -> np.ndarray:
        """Per-query nDCG@10 ``(n,)`` of one ranked list per query (0 for no hits)."""
        per = evaluate(
            self.qrels, {q: dict(h[:10]) for q, h in zip(self.qids, run, strict=True)}, ["ndcg@10"]
        ).per_query
        return np.array([per.get(q, {}).get("ndcg@10", 0.0) for q in self.qids])

    def score(
        self,
        members: Sequence[str],
        weights: np.ndarray,
        alpha: np.ndarray,
        how: Normalisation = "minmax",
    ) -> np.ndarray:
        """nDCG@10 per query of the mixture ``weights`` ``(n, m)`` of ``members`` fused with BM25
        at dense weight ``alpha`` ``(n,)``, each list normalised ``how``."""
        one = np.flatnonzero(weights.max(axis=1) >= 1.0 - 1e-9)
        dense: list[Hits] = [[] for _ in self.qids]
        q = mix_queries(np.stack([self.emb[m] for m in members]), weights)  # (n, d)
        if len(one) == len(self.qids):  # pure members: reuse their cached searches
            for i in range(len(self.qids)):
                dense[i] = self.dense_member(members[int(weights[i].argmax())])[i]
        else:
            dense = self.index.search(q, DEPTH, self.qids)
        stats = self.index.score_stats(q) if how == "zscore" else None
        return self.ndcg(fuse_lists(dense, self.lexical, alpha, 10, how, stats, self.lexical_stats))


@dataclass
class Library:
    """What a router may learn from: the training instances of the pool's domains, and their
    held-out (dev) instances for gates that must not be fitted on an expert's own training data."""

    sets: list[QuerySet]
    instances: list[DomainInstances]
    experts: list[str]
    dev: list[QuerySet] = field(default_factory=list)

    @property
    def members(self) -> list[str]:
        return [BASE, *self.experts]

    @cached_property
    def emb(self) -> np.ndarray:
        return np.concatenate([s.base for s in self.sets])  # (N, d)

    @cached_property
    def member_scores(self) -> np.ndarray:
        """``(N, m)``: each member's nDCG@10 on each instance (dense alone)."""
        return np.concatenate(
            [np.stack([s.ndcg(s.dense_member(m)) for m in self.members], 1) for s in self.sets]
        )


def query_sets(exp: Experiment, part: str, domains: Sequence[str], members: Sequence[str]) -> dict:
    """:class:`QuerySet` of each domain's test queries or ``"train"``/``"dev"``/``"choice"``
    instances (see :meth:`routerretriever.experiment.Experiment.instances`)."""
    out = {}
    specs = {s.name: s for s in exp.cfg.domains}
    for d in domains:
        dom = exp.domains[d]
        if part == "test":
            queries, qrels = dom.test_queries, dom.test_qrels
        else:
            queries, qrels = exp.instance_queries[(part, d)]
        qids = list(queries)
        lexical, stats = exp.lexical[d].search_with_stats([queries[q] for q in qids], DEPTH, qids)
        out[d] = QuerySet(
            d,
            qids,
            qrels,
            exp.member_embeddings(part, d, members),
            dom.index,
            lexical,
            labelled=part == "test" or specs[d].train != "corpus",
            lexical_stats=stats,
            corpus=exp.sketches[d],
        )
    return out
