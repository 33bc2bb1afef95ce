"""MTEB, the real package, over our retrievers on a local BEIR-format task (no hub)."""

from __future__ import annotations

import pytest

from routerretriever import load_beir
from tests.conftest import TINY, tiny_model_path

mteb = pytest.importorskip("mteb")


def test_mteb_scores_a_routed_retriever_as_our_evaluation_does(trained, tmp_path):
    from routerretriever import Encoder, evaluate_retriever
    from routerretriever.experts import load_expert
    from routerretriever.instances import Domain, build_pilot_library
    from routerretriever.mteb_model import MTEBSearch, local_task
    from routerretriever.retriever import DenseRetriever, RouterRetriever

    _, store, _ = trained
    enc = Encoder.load(tiny_model_path())
    for name in ("alpha", "beta"):
        load_expert(enc, store / name)
    pilots = build_pilot_library(enc, [Domain("tiny", TINY, "corpus")], cache_dir=tmp_path)
    for retriever in (
        DenseRetriever(enc, cache_dir=tmp_path),
        RouterRetriever(enc, pilots, alpha=0.5, cache_dir=tmp_path),
    ):
        result = mteb.evaluate(MTEBSearch(retriever), [local_task(TINY)], cache=None)
        got = result.task_results[0].scores["test"][0]["ndcg_at_10"]
        ours = evaluate_retriever(retriever, load_beir(TINY), ["ndcg@10"]).scores["ndcg@10"]
        assert got == pytest.approx(ours, abs=1e-5)  # MTEB rounds to five places
