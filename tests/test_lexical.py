from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerretriever import Document, load_beir
from routerretriever.lexical import BM25Config, BM25Index, tokenize

CORPUS = {
    "d1": Document("Statins lower cholesterol in patients with heart disease.", "Statins"),
    "d2": Document("Wind tunnel tests of swept wings at supersonic speeds."),
    "d3": Document("Cholesterol, diet and heart: a cohort of patients followed for years."),
    "d4": Document("Library catalogues and the retrieval of documents by subject."),
    "d5": Document("Heart heart heart: repeated words in a short text."),
}


def lucene_bm25(corpus: dict[str, Document], query: str, cfg: BM25Config) -> dict[str, float]:
    """Lucene's BM25 written out (Lucene 8+ drops the constant k1 + 1 factor):
    idf = ln(1 + (N - df + .5) / (df + .5)) times tf / (tf + k1 (1 - b + b len / avglen))."""
    docs = {d: tokenize([doc.full_text], cfg)[0] for d, doc in corpus.items()}
    n = len(docs)
    avg = sum(len(w) for w in docs.values()) / n
    out = {}
    for d, words in docs.items():
        s = 0.0
        for term in set(tokenize([query], cfg)[0]):
            df = sum(term in w for w in docs.values())
            if df == 0:
                continue
            tf = words.count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + cfg.k1 * (1 - cfg.b + cfg.b * len(words) / avg))
        out[d] = s
    return out


@pytest.mark.parametrize("cfg", [BM25Config(), BM25Config(k1=0.9, b=0.4, stemmer=None)])
def test_scores_equal_lucene_formula(cfg):
    index = BM25Index.build(CORPUS, cfg)
    for query in ("heart patients cholesterol", "wings", "retrieval of documents", "statin"):
        expected = lucene_bm25(CORPUS, query, cfg)
        got = dict(zip(index.ids, index.scores(query).tolist(), strict=True))
        for d in CORPUS:
            assert got[d] == pytest.approx(expected[d], rel=1e-5, abs=1e-6), (query, d)


def test_search_ranks_excludes_own_id_and_drops_zero_scores():
    index = BM25Index.build(CORPUS)
    (hits,) = index.search(["heart cholesterol"], k=10)
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert {d for d, _ in hits} == {"d1", "d3", "d5"}  # only documents sharing a word
    (hits,) = index.search(["heart cholesterol"], k=10, exclude_ids=["d3"])
    assert "d3" not in dict(hits)
    assert index.search(["zyzzyva quux"], k=3) == [[]]  # unknown words: no hits
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(["x"], k=0)


def test_search_with_stats_gives_the_moments_of_every_score():
    index = BM25Index.build(CORPUS)
    queries = ["heart cholesterol", "wings", "zyzzyva"]
    hits, stats = index.search_with_stats(queries, k=2, exclude_ids=["d3", None, None])
    assert hits == index.search(queries, k=2, exclude_ids=["d3", None, None])
    for q, (mean, sd) in zip(queries, stats, strict=True):
        every = index.scores(q)  # the whole corpus, the excluded document included
        assert (mean, sd) == pytest.approx((every.mean(), every.std()), abs=1e-6)
    assert tuple(stats[2]) == (0.0, 0.0)  # unknown words: every score 0


def test_bm25_scifact_reference_score():
    """On SciFact, BM25 with English stemming and stopwords scores as bm25s's Lucene variant."""
    from routerretriever.evaluation import evaluate
    from tests.conftest import shared_dataset

    ds = load_beir(shared_dataset("beir/scifact"))
    index = BM25Index.build(ds.corpus)
    qids = list(ds.queries)
    hits = index.search([ds.queries[q] for q in qids], 10, qids)
    score = evaluate(
        ds.qrels, {q: dict(h) for q, h in zip(qids, hits, strict=True)}, ["ndcg@10"]
    ).scores
    assert score["ndcg@10"] == pytest.approx(0.686, abs=0.002)


def test_cached_index_is_reused_and_a_bad_one_rebuilt(tmp_path):
    first = BM25Index.cached(CORPUS, cache_dir=tmp_path)
    (folder,) = (tmp_path / "bm25").iterdir()
    stamp = (folder / "ids.json").stat().st_mtime_ns
    again = BM25Index.cached(CORPUS, cache_dir=tmp_path)
    assert (folder / "ids.json").stat().st_mtime_ns == stamp  # read, not rebuilt
    assert again.search(["heart"], 5) == first.search(["heart"], 5)
    (folder / "ids.json").write_text("[1, 2")  # damaged: rebuilt, not trusted
    assert BM25Index.cached(CORPUS, cache_dir=tmp_path).search(["heart"], 5) == first.search(
        ["heart"], 5
    )
    other = BM25Index.cached(CORPUS, BM25Config(k1=1.2), cache_dir=tmp_path)
    assert len(list((tmp_path / "bm25").iterdir())) == 2  # settings are part of the key
    assert other.config.k1 == 1.2


KILL_SCRIPT = """
import sys, time, bm25s
from routerretriever import Document
from routerretriever.lexical import BM25Index
real = bm25s.BM25.save
def slow(self, path, **kw):
    real(self, path, **kw)
    print("written", flush=True)
    time.sleep(60)
bm25s.BM25.save = slow
BM25Index.cached({"a": Document("heart disease"), "b": Document("wings")}, cache_dir=sys.argv[1])
"""


def test_bm25_store_survives_kill_mid_write(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert proc.stdout.readline().strip() == "written"  # the arrays are on disk, not committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = tmp_path / "bm25"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    index = BM25Index.cached(
        {"a": Document("heart disease"), "b": Document("wings")}, cache_dir=tmp_path
    )
    assert index.search(["heart"], 2) == [[("a", pytest.approx(index.scores("heart")[0]))]]
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1


texts = st.text(alphabet=st.characters(blacklist_categories=()), max_size=60)


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(texts, min_size=1, max_size=6), query=texts, k=st.integers(1, 10))
def test_any_text_is_indexed_and_searched_without_error(docs, query, k):
    corpus = {f"d{i}": Document(t) for i, t in enumerate(docs)}
    try:
        index = BM25Index.build(corpus)
    except ValueError as e:  # a corpus with no words at all
        assert "vocabulary" in str(e).lower() or "empty" in str(e).lower()
        return
    (hits,) = index.search([query], k)
    assert len(hits) <= k
    assert all(d in corpus and s > 0 for d, s in hits)
    (again,), stats = index.search_with_stats([query], k)
    assert again == hits and stats.shape == (1, 2) and np.isfinite(stats).all()
