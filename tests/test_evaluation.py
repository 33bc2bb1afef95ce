from __future__ import annotations

import numpy as np
import pytest

from routerretriever.evaluation import evaluate, parse_metric


def test_ndcg_graded_linear_gain_by_hand():
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    run = {"q": {"x": 0.9, "b": 0.8, "a": 0.7}}
    dcg = 1 / np.log2(3) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert evaluate(qrels, run, ["ndcg@10"]).scores["ndcg@10"] == pytest.approx(dcg / idcg)


def test_mrr_is_cut_at_k():
    qrels = {"q": {"rel": 1}}
    run = {"q": {f"d{i}": 1.0 - i / 100 for i in range(12)} | {"rel": 0.5}}  # rel ranked 13th
    res = evaluate(qrels, run, ["mrr@10", "mrr@100"])
    assert res.scores["mrr@10"] == 0.0
    assert res.scores["mrr@100"] == pytest.approx(1 / 13)


def test_recall_at_k_and_per_query_scores_kept():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    run = {"q1": {"a": 0.9, "z": 0.8}, "q2": {"c": 0.1}}
    res = evaluate(qrels, run, ["recall@1", "recall@100"])
    assert res.per_query["q1"] == {"recall@1": 0.5, "recall@100": 0.5}
    assert res.per_query["q2"] == {"recall@1": 1.0, "recall@100": 1.0}
    assert res.scores["recall@1"] == pytest.approx(0.75)


def test_identical_ids_dropped_and_run_not_modified():
    qrels = {"q": {"d": 1}}
    run = {"q": {"q": 1.0, "d": 0.5}}
    assert evaluate(qrels, run, ["ndcg@10"]).scores["ndcg@10"] == pytest.approx(1.0)
    assert run == {"q": {"q": 1.0, "d": 0.5}}
    kept = evaluate(qrels, run, ["ndcg@10"], ignore_identical_ids=False)
    assert kept.scores["ndcg@10"] == pytest.approx(1 / np.log2(3))


def test_queries_absent_from_run_fall_out_of_the_mean():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    res = evaluate(qrels, {"q1": {"a": 1.0}}, ["ndcg@10"])
    assert res.num_queries == 1 and res.scores["ndcg@10"] == 1.0


def test_matches_beir_evaluate_retrieval():
    from beir.retrieval.evaluation import EvaluateRetrieval

    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(50)]
    qrels = {
        f"q{i}": {d: int(rng.integers(1, 3)) for d in rng.choice(docs, 4, replace=False)}
        for i in range(20)
    }
    run = {q: {d: float(rng.random()) for d in docs} for q in qrels}
    ndcg, _, recall, _ = EvaluateRetrieval.evaluate(
        qrels, {q: dict(h) for q, h in run.items()}, [10, 100]
    )
    ours = evaluate(qrels, run, ["ndcg@10", "recall@100"]).scores
    assert ours["ndcg@10"] == pytest.approx(ndcg["NDCG@10"], abs=1e-5)
    assert ours["recall@100"] == pytest.approx(recall["Recall@100"], abs=1e-5)


@pytest.mark.parametrize("bad", ["ndcg", "ndcg@0", "foo@10", "ndcg@ten"])
def test_unknown_metric_lists_valid_names(bad):
    with pytest.raises(ValueError, match="unknown metric .* use one of"):
        parse_metric(bad)
