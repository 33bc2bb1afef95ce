from __future__ import annotations

import hashlib
import json
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


def lucene_term(docs: dict[str, list[str]], term: str, cfg: BM25Config) -> dict[str, float]:
    """Lucene's BM25 of one word written out (Lucene 8+ drops the constant k1 + 1 factor):
    idf = ln(1 + (N - df + .5) / (df + .5)) times tf / (tf + k1 (1 - b + b len / avglen))."""
    n = len(docs)
    avg = sum(len(w) for w in docs.values()) / n
    df = sum(term in w for w in docs.values())
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    out = {}
    for d, words in docs.items():
        tf = words.count(term)
        out[d] = idf * tf / (tf + cfg.k1 * (1 - cfg.b + cfg.b * len(words) / avg)) if tf else 0.0
    return out


def lucene_bm25(corpus: dict[str, Document], query: str, cfg: BM25Config) -> dict[str, float]:
    docs = {d: tokenize([doc.full_text], cfg)[0] for d, doc in corpus.items()}
    out = dict.fromkeys(docs, 0.0)
    for term in set(tokenize([query], cfg)[0]):
        for d, s in lucene_term(docs, term, cfg).items():
            out[d] += s
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


# The package's source first, then whatever the parent's path held (where its dependencies live
# when they are not installed site-wide).
SRC_PATH = os.pathsep.join(
    p for p in (str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")) if p
)

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
        env={**os.environ, "PYTHONPATH": SRC_PATH},
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


FEEDBACK = BM25Config(feedback_docs=2, feedback_terms=4, feedback_weight=0.3)


def rm3_written_out(corpus: dict[str, Document], query: str, cfg: BM25Config) -> dict[str, float]:
    """RM3's expanded query scored by hand: the plain query's top documents (positive scores,
    ties by corpus order) lend their likeliest words (ties in alphabetical order)."""
    docs = {d: tokenize([doc.full_text], cfg)[0] for d, doc in corpus.items()}
    words = tokenize([query], cfg)[0]
    plain = dict.fromkeys(docs, 0.0)
    for w in words:  # every occurrence counts, as bm25s counts it
        for d, s in lucene_term(docs, w, cfg).items():
            plain[d] += s
    order = sorted(docs, key=lambda d: (-plain[d], list(docs).index(d)))
    feedback = [d for d in order[: cfg.feedback_docs] if plain[d] > 0]
    p: dict[str, float] = {}
    for d in feedback:
        for w in set(docs[d]):
            p[w] = p.get(w, 0.0) + docs[d].count(w) / len(docs[d]) / len(feedback)
    kept = sorted(p.items(), key=lambda x: (-x[1], x[0]))[: cfg.feedback_terms]
    z = sum(x for _, x in kept)
    w = cfg.feedback_weight
    out = {d: (1 - w) * plain[d] / len(words) for d in docs}
    for term, x in kept:
        for d, s in lucene_term(docs, term, cfg).items():
            out[d] += w * x / z * s
    return out


@pytest.mark.parametrize(
    "cfg", [FEEDBACK, BM25Config(feedback_docs=1, feedback_terms=20, feedback_weight=1.0)]
)
def test_feedback_scores_equal_rm3_written_out(cfg):
    index = BM25Index.build(CORPUS, cfg)
    for query in ("heart patients cholesterol", "wings", "heart heart statin", "catalogues"):
        expected = rm3_written_out(CORPUS, query, cfg)
        got = dict(zip(index.ids, index.scores(query).tolist(), strict=True))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), query
    query = "heart cholesterol"
    assert not np.allclose(index.scores(query), BM25Index.build(CORPUS).scores(query))


def test_feedback_never_draws_on_the_excluded_document():
    corpus = {
        "own": Document("heart heart zebra"),
        "zebra": Document("zebra stripes"),
        "other": Document("heart lungs"),
        "far": Document("wings at supersonic speeds"),
    }
    cfg = BM25Config(feedback_docs=1, feedback_terms=5, feedback_weight=0.5)
    index = BM25Index.build(corpus, cfg)
    (hits,) = index.search(["heart"], 10)
    assert hits[0][0] == "own" and "zebra" in dict(hits)  # "own" lends its word "zebra"
    (hits,) = index.search(["heart"], 10, exclude_ids=["own"])
    assert set(dict(hits)) == {"other"}  # feedback from "other" only: no zebra
    hits, stats = index.search_with_stats(["heart"], 10, exclude_ids=["own"])
    assert hits == [[("other", pytest.approx(dict(hits[0])["other"]))]]
    assert np.isfinite(stats).all()


def test_feedback_settings_do_not_change_the_index_key(tmp_path):
    index_only = {"k1": 1.5, "b": 0.75, "method": "lucene", "stemmer": "english", "stopwords": "en"}
    old_key = hashlib.sha256(json.dumps(index_only, sort_keys=True).encode()).hexdigest()[:12]
    assert BM25Config().fingerprint == FEEDBACK.fingerprint == old_key  # caches, Milvus names
    plain = BM25Index.cached(CORPUS, cache_dir=tmp_path)
    expanded = BM25Index.cached(CORPUS, FEEDBACK, cache_dir=tmp_path)
    assert len(list((tmp_path / "bm25").iterdir())) == 1
    assert expanded.config == FEEDBACK and plain.config == BM25Config()
    assert np.allclose(expanded.scores("heart"), BM25Index.build(CORPUS, FEEDBACK).scores("heart"))
    assert BM25Config(feedback_terms=5, feedback_weight=0.5).feedback is False  # docs = 0: off


def test_an_index_of_the_previous_format_is_rebuilt(tmp_path):
    BM25Index.cached(CORPUS, cache_dir=tmp_path)
    (folder,) = (tmp_path / "bm25").iterdir()
    manifest = folder / "routerretriever-bm25.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    for name in ("doc_indptr.npy", "doc_terms.npy", "doc_counts.npy"):
        (folder / name).unlink()
    with pytest.raises(ValueError, match="format 1 unknown"):
        BM25Index.load(folder)
    index = BM25Index.cached(CORPUS, FEEDBACK, cache_dir=tmp_path)
    assert np.allclose(index.scores("heart"), BM25Index.build(CORPUS, FEEDBACK).scores("heart"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("feedback_docs", -1),
        ("feedback_docs", "3"),
        ("feedback_docs", True),
        ("feedback_docs", 2.5),
        ("feedback_terms", 10_000),
        ("feedback_weight", 1.5),
        ("feedback_weight", float("nan")),
        ("feedback_weight", "0.1"),
    ],
)
def test_bad_feedback_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"bm25 {field} must be"):
        BM25Config(**{field: value})


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(texts, min_size=1, max_size=6),
    query=texts,
    k=st.integers(1, 10),
    fb=st.tuples(st.integers(0, 8), st.integers(0, 8), st.floats(0, 1)),
    exclude=st.integers(0, 6),
)
def test_any_text_with_feedback_is_searched_without_error(docs, query, k, fb, exclude):
    corpus = {f"d{i}": Document(t) for i, t in enumerate(docs)}
    cfg = BM25Config(feedback_docs=fb[0], feedback_terms=fb[1], feedback_weight=fb[2])
    try:
        index = BM25Index.build(corpus, cfg)
    except ValueError as e:  # a corpus with no words at all
        assert "vocabulary" in str(e).lower() or "empty" in str(e).lower()
        return
    skip = f"d{exclude}"
    hits, stats = index.search_with_stats([query], k, exclude_ids=[skip])
    assert len(hits[0]) <= k and skip not in dict(hits[0])
    assert all(d in corpus and s > 0 and math.isfinite(s) for d, s in hits[0])
    assert np.isfinite(stats).all()
    if not cfg.feedback:
        assert hits == BM25Index.build(corpus).search([query], k, exclude_ids=[skip])


BUILD_SCRIPT = """
import sys
from routerretriever import load_beir
from routerretriever.lexical import BM25Index
BM25Index.cached(load_beir(sys.argv[1]).corpus, cache_dir=sys.argv[2])
"""


def test_feedback_is_the_same_whichever_process_built_the_index(tmp_path):
    """bm25s numbers its words differently in each process (string hashing), so feedback must
    not break ties by those numbers: an index built elsewhere expands queries alike."""
    from tests.conftest import TINY

    subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(TINY), str(tmp_path)],
        check=True,
        env={
            **os.environ,
            "PYTHONHASHSEED": "12345",
            "PYTHONPATH": SRC_PATH,
        },
    )
    ds = load_beir(TINY)
    cfg = BM25Config(feedback_docs=3, feedback_terms=5)
    there = BM25Index.cached(ds.corpus, cfg, cache_dir=tmp_path)
    here = BM25Index.build(ds.corpus, cfg)
    assert there._model.vocab_dict != here._model.vocab_dict  # numbered differently ...
    for query in ds.queries.values():  # ... and scored the same
        np.testing.assert_allclose(there.scores(query), here.scores(query), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "routerretriever-bm25.json").write_text('{"version": 2, "config": []}'),
        lambda f: (f / "routerretriever-bm25.json").write_text(
            '{"version": 2, "config": {"k1": 1.5, "from_a_newer_version": 1}}'
        ),
        lambda f: (f / "routerretriever-bm25.json").write_text("[2]"),
        lambda f: (f / "ids.json").write_text('{"d1": 1}'),
        lambda f: (f / "doc_counts.npy").write_bytes((f / "doc_counts.npy").read_bytes()[:20]),
        lambda f: (f / "data.csc.index.npy").write_bytes(b"\x93NUMPY garbage"),
    ],
)
def test_a_damaged_cached_index_is_rebuilt_not_trusted(tmp_path, damage):
    BM25Index.cached(CORPUS, FEEDBACK, cache_dir=tmp_path)
    (folder,) = (tmp_path / "bm25").iterdir()
    damage(folder)
    with pytest.raises((ValueError, OSError)):
        BM25Index.load(folder)
    index = BM25Index.cached(CORPUS, FEEDBACK, cache_dir=tmp_path)  # rebuilt, with a warning
    fresh = BM25Index.build(CORPUS, FEEDBACK)
    for query in ("heart cholesterol", "wings"):
        np.testing.assert_allclose(index.scores(query), fresh.scores(query), rtol=1e-6)


def test_bm25s_debug_lines_follow_the_application_level(tmp_path):
    """bm25s sets its logger to DEBUG on import; an application logging at WARNING must not
    get its per-call debug lines (the demo printed them on every index build)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    root, keep = logging.getLogger(), Keep()
    old = root.level
    root.addHandler(keep)
    root.setLevel(logging.WARNING)
    try:
        index = BM25Index.build(CORPUS)
        index.save(tmp_path / "bm25")
        BM25Index.load(tmp_path / "bm25").search(["heart"], k=2)
    finally:
        root.removeHandler(keep)
        root.setLevel(old)
    assert [r.getMessage() for r in keep.records if r.name.startswith("bm25s")] == []
