"""Retrieval metrics through pytrec_eval, with BEIR's semantics and the per-query scores kept.

Choices (the same as BEIR's ``EvaluateRetrieval``):
- nDCG uses graded, linear gain, as trec_eval's ``ndcg_cut`` does;
- a hit whose document id equals the query id is dropped (``ignore_identical_ids``);
- a query absent from the run (or with no hits) falls out of the mean, as in pytrec_eval.

What this module does not know: how the run was made. Metric names are strings such as
``"ndcg@10"``, ``"recall@100"``, ``"mrr@10"``, ``"map@100"`` and ``"p@10"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from routerretriever.data import Qrels, Run

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")

# our name -> (pytrec_eval measure family, the key pytrec_eval reports for cut-off k)
_MEASURES = {
    "ndcg": ("ndcg_cut", "ndcg_cut_{k}"),
    "recall": ("recall", "recall_{k}"),
    "map": ("map_cut", "map_cut_{k}"),
    "p": ("P", "P_{k}"),
    "mrr": ("recip_rank", "recip_rank"),  # computed on the run cut at k
}


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; errors list what would have worked."""
    m = re.fullmatch(r"([a-z]+)@(\d+)", name.strip().lower())
    if not m or m.group(1) not in _MEASURES or int(m.group(2)) < 1:
        raise ValueError(
            f"unknown metric {name!r}; use one of {sorted(_MEASURES)} with a cut-off, e.g. 'ndcg@10'"
        )
    return m.group(1), int(m.group(2))


@dataclass
class EvalResult:
    """Mean scores and, per query, every metric (the pilot library and oracles need those)."""

    scores: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return len(self.per_query)


def _top(hits: dict[str, float], k: int) -> dict[str, float]:
    # trec_eval ranks by score, then by document id, both descending.
    ranked = sorted(hits.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    return dict(ranked[:k])


def evaluate(
    qrels: Qrels,
    run: Run,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    ignore_identical_ids: bool = True,
) -> EvalResult:
    """Score a run against qrels; ``run`` is ``{query_id: {doc_id: score}}`` and is not modified.

    Example:
        >>> evaluate({"q": {"d1": 1}}, {"q": {"d1": 0.9, "d2": 0.5}}, ["ndcg@10"]).scores
        {'ndcg@10': 1.0}
    """
    import pytrec_eval

    parsed = [(name, *parse_metric(name)) for name in metrics]
    run = {
        qid: {d: float(s) for d, s in hits.items() if not (ignore_identical_ids and d == qid)}
        for qid, hits in run.items()
        if qid in qrels
    }
    run = {qid: hits for qid, hits in run.items() if hits}
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in run}
    cutoffs: dict[str, set[int]] = {}
    for _, m, k in parsed:
        if m != "mrr":
            cutoffs.setdefault(_MEASURES[m][0], set()).add(k)
    plain = {f"{fam}.{','.join(map(str, sorted(ks)))}" for fam, ks in cutoffs.items()}
    if plain and run:
        out = pytrec_eval.RelevanceEvaluator(qrels, plain).evaluate(run)
        for name, m, k in parsed:
            if m != "mrr":
                key = _MEASURES[m][1].format(k=k)
                for qid in run:
                    per_query[qid][name] = out[qid][key]
    for name, m, k in parsed:
        if m == "mrr" and run:
            cut = {qid: _top(hits, k) for qid, hits in run.items()}
            out = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
            for qid in run:
                per_query[qid][name] = out[qid]["recip_rank"]
    n = len(per_query)
    scores = {
        name: (sum(q[name] for q in per_query.values()) / n if n else 0.0) for name, *_ in parsed
    }
    return EvalResult(scores=scores, per_query=per_query)
