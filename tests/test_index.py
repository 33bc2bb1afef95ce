from __future__ import annotations

import numpy as np
import pytest

from routerretriever import FaissIndex
from routerretriever.index import MilvusIndex


@pytest.fixture(params=["faiss", pytest.param("milvus-lite", marks=pytest.mark.slow)])
def make_index(request, tmp_path):
    """The same tests for each backend: FAISS in process, Milvus Lite in a local file."""
    if request.param == "faiss":
        return FaissIndex
    pytest.importorskip("milvus_lite")
    made = []

    def make(dim):
        made.append(1)
        return MilvusIndex(str(tmp_path / f"m{len(made)}.db"), dim)

    return make


def brute_force(docs: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("n_docs,k", [(17, 5), (100, 17), (3, 10)])
def test_matches_brute_force(make_index, n_docs, k):
    rng = np.random.default_rng(n_docs)
    docs = rng.standard_normal((n_docs, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(n_docs)]
    index = make_index(8)
    for start in range(0, n_docs, 17 // 2):  # awkward chunks
        index.add(ids[start : start + 8], docs[start : start + 8])
    hits = index.search(queries, k)
    expected = brute_force(docs, queries, k)
    for row, row_hits in enumerate(hits):
        assert [h[0] for h in row_hits] == [ids[j] for j in expected[row]]
        np.testing.assert_allclose(
            [h[1] for h in row_hits], (queries[row] @ docs[expected[row]].T), rtol=1e-5
        )
    every = queries.astype(np.float64) @ docs.astype(np.float64).T  # (7, n_docs): all scored
    stats = index.score_stats(queries)  # known without scoring a document, chunks and all
    np.testing.assert_allclose(stats[:, 0], every.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats[:, 1], every.std(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_reopened_milvus_collection_does_not_guess_its_score_moments(tmp_path):
    pytest.importorskip("milvus_lite")
    uri = str(tmp_path / "m.db")
    made = MilvusIndex(uri, 4)
    made.add(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    assert made.score_stats(np.eye(4, dtype=np.float32)).shape == (4, 2)
    again = MilvusIndex(uri, 4)  # documents it never saw: z-score fusion uses each list's own
    assert again.score_stats(np.eye(4, dtype=np.float32)) is None


def test_query_own_id_is_not_a_hit(make_index):
    docs = np.eye(4, dtype=np.float32)
    index = make_index(4)
    index.add(["a", "b", "c", "d"], docs)
    hits = index.search(docs[:2], k=2, exclude_ids=["a", "zzz"])
    assert len(hits[0]) == 2 and "a" not in {h[0] for h in hits[0]}
    assert hits[1][0][0] == "b"


def test_errors(make_index):
    index = make_index(4)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        index.add(["a", "b"], np.zeros((2, 3), dtype=np.float32))
    index.add(["a"], np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        index.add(["a"], np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.zeros((1, 4), dtype=np.float32), 0)
    assert make_index(4).search(np.zeros((2, 4), dtype=np.float32), 3) == [[], []]


@pytest.mark.slow
def test_milvus_lite_start_up_logs_no_grpc_tracebacks(tmp_path, caplog):
    pytest.importorskip("milvus_lite")
    import logging

    caplog.set_level(logging.ERROR)
    index = MilvusIndex.from_embeddings(
        str(tmp_path / "m.db"), ["a", "b"], np.eye(2, 4, dtype=np.float32)
    )
    assert index.search(np.eye(1, 4, dtype=np.float32), 1)[0][0][0] == "a"
    assert not [r for r in caplog.records if "not implemented" in r.getMessage() + str(r.exc_info)]
