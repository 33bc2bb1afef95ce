from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerretriever.fusion import (
    NORMALISATIONS,
    ScoreMoments,
    fuse_lists,
    fuse_scores,
    mix_queries,
    normalise,
    reciprocal_rank,
)
from routerretriever.index import FaissIndex
from routerretriever.router import expected_scores, neighbour_weights


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_dense_mixture_equals_score_fusion_of_member_searches():
    rng = np.random.default_rng(0)
    docs = unit(rng.normal(size=(57, 16)))
    ids = [f"d{i}" for i in range(57)]
    index = FaissIndex.from_embeddings(ids, docs)
    members = unit(rng.normal(size=(3, 5, 16)))  # (m, n, d)
    weights = rng.dirichlet(np.ones(3), size=5)  # (n, m)
    mixed = index.search(mix_queries(members, weights), 17)
    full = [index.search(members[k], 57) for k in range(3)]  # each member's own full ranking
    for i in range(5):
        fused = {d: 0.0 for d in ids}
        for k in range(3):
            for d, s in full[k][i]:
                fused[d] += weights[i, k] * s
        expected = sorted(fused.items(), key=lambda x: -x[1])[:17]
        assert [d for d, _ in mixed[i]] == [d for d, _ in expected]
        np.testing.assert_allclose([s for _, s in mixed[i]], [s for _, s in expected], atol=1e-5)
    assert not np.allclose(members[0], members[1])  # the members really differ


def test_mix_queries_checks_shapes():
    with pytest.raises(ValueError, match="weights must have shape"):
        mix_queries(np.zeros((2, 3, 4)), np.zeros((2, 3)))


def test_fuse_scores_by_hand():
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]  # min-max: a 1, b 0.5, c 0
    lexical = [("c", 12.0), ("d", 8.0), ("a", 4.0)]  # min-max: c 1, d 0.5, a 0
    fused = dict(fuse_scores(dense, lexical, 0.6, 10))
    assert fused == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.4, "d": 0.2})
    assert fuse_scores(dense, lexical, 1.0, 2) == dense[:2]
    assert [d for d, _ in fuse_scores(dense, lexical, 0.0, 3)] == ["c", "d", "a"]
    assert dict(fuse_scores(dense, [], 0.5, 3)) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.0})
    with pytest.raises(ValueError, match="alpha must be in"):
        fuse_scores(dense, lexical, 1.5, 3)


def test_max_normalised_fusion_by_hand():
    dense = [("a", 0.8), ("b", 0.6), ("c", 0.4)]  # / 0.8: a 1, b 0.75, c 0.5 (a missing doc 0.5)
    lexical = [("c", 12.0), ("d", 6.0), ("b", 3.0)]  # / 12: c 1, d 0.5, b 0.25 (missing 0.25)
    fused = dict(fuse_scores(dense, lexical, 0.6, 10, "max"))
    assert fused == pytest.approx({"a": 0.6 + 0.1, "b": 0.45 + 0.1, "c": 0.3 + 0.4, "d": 0.3 + 0.2})
    assert [d for d, _ in fuse_scores(dense, lexical, 0.0, 3, "max")] == ["c", "d", "b"]


def test_a_flat_list_moves_the_fused_ranking_less_when_max_normalised():
    flat = [("a", 0.50), ("b", 0.49), ("c", 0.48)]  # no confident dense match
    lexical = [("c", 10.0), ("b", 2.0), ("a", 1.0)]  # a confident lexical one
    # Min-max stretches the dense list's 0.02 spread to 1 and outvotes BM25 ...
    assert [d for d, _ in fuse_scores(flat, lexical, 0.6, 3)] == ["a", "c", "b"]
    # ... divided by its best, the flat list barely separates them and BM25 decides.
    assert [d for d, _ in fuse_scores(flat, lexical, 0.6, 3, "max")] == ["c", "b", "a"]


def test_normalise_edge_cases():
    assert normalise([], "max") == ({}, 0.0)
    # No positive score: no floor to measure from, so min-max.
    neg = [("a", -0.1), ("b", -0.3)]
    assert normalise(neg, "max") == normalise(neg, "minmax") == ({"a": 1.0, "b": 0.0}, 0.0)
    # Deeper below 0 than its best above: 0 is no floor either.
    deep = [("a", 0.1), ("b", -0.3)]
    assert normalise(deep, "max") == normalise(deep, "minmax")
    assert normalise([("a", 0.4), ("b", -0.2)], "max") == ({"a": 1.0, "b": -0.5}, -0.5)
    # All tied: each hit is as good as the list's best; a missing document gets 0.
    assert normalise([("a", 2.0), ("b", 2.0)], "minmax") == ({"a": 1.0, "b": 1.0}, 0.0)
    assert normalise([("a", 2.0), ("b", 2.0)], "max") == ({"a": 1.0, "b": 1.0}, 1.0)
    with pytest.raises(ValueError, match="unknown normalisation 'z'"):
        normalise(neg, "z")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown normalisation"):
        fuse_scores(neg, neg, 0.5, 3, "rank")  # type: ignore[arg-type]


def test_reciprocal_rank_by_hand_and_against_ranx():
    runs = [[("a", 3.0), ("b", 2.0)], [("b", 9.0), ("c", 1.0)]]
    got = dict(reciprocal_rank(runs, 10))
    assert got == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 62})
    ranx = pytest.importorskip("ranx")
    fused = ranx.fuse(
        [ranx.Run({"q": dict(r)}) for r in runs], method="rrf", params={"k": 60}
    ).to_dict()["q"]
    assert fused == pytest.approx(got)


hits = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.floats(-5, 5, allow_nan=False)),
    max_size=8,
    unique_by=lambda x: x[0],
).map(lambda h: sorted(h, key=lambda x: -x[1]))


@settings(max_examples=200, deadline=None)
@given(
    dense=hits,
    lexical=hits,
    alpha=st.floats(0, 1),
    k=st.integers(1, 10),
    how=st.sampled_from(NORMALISATIONS),
)
def test_fusion_is_a_ranking_of_the_union(dense, lexical, alpha, k, how):
    out = fuse_scores(dense, lexical, alpha, k, how)
    pool = {d for d, _ in dense if alpha > 0} | {d for d, _ in lexical if alpha < 1}
    assert len(out) == min(k, len(pool))  # alpha 0: lexical alone; alpha 1: dense alone
    assert len({d for d, _ in out}) == len(out)
    scores = [s for _, s in out]
    assert scores == sorted(scores, reverse=True)
    if 0 < alpha < 1 and how == "zscore":  # own moments: |z| <= sqrt(n - 1) (Samuelson)
        assert all(abs(s) <= np.sqrt(7) + 1e-9 for s in scores)
    elif 0 < alpha < 1:
        floor = 0.0 if how == "minmax" else -1.0
        assert all(floor - 1e-9 <= s <= 1 + 1e-9 for s in scores)


positive_hits = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.floats(0.01, 50, allow_nan=False)),
    min_size=1,
    max_size=8,
    unique_by=lambda x: x[0],
).map(lambda h: sorted(h, key=lambda x: -x[1]))


@settings(max_examples=200, deadline=None)
@given(
    dense=positive_hits,
    lexical=positive_hits,
    alpha=st.floats(0.05, 0.95),
    scale=st.tuples(st.floats(0.1, 10), st.floats(0.1, 10)),
    shift=st.floats(0.1, 10),
)
def test_each_normalisation_ignores_what_it_should(dense, lexical, alpha, scale, shift):
    """All ignore each list's units (a positive factor); min-max and z-scores also ignore an
    offset, while "max" does not: the distance to the floor is the evidence it keeps."""

    def scaled(h, c, b=0.0):
        return [(d, c * v + b) for d, v in h]

    def same(got, ref):  # every document's fused score (k = 8 keeps all of a-h); the order of
        # two documents within rounding of each other may flip with the units, nothing else
        assert dict(got) == pytest.approx(dict(ref), abs=1e-9)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)

    for how in NORMALISATIONS:
        ref = fuse_scores(dense, lexical, alpha, 8, how)
        same(fuse_scores(scaled(dense, scale[0]), scaled(lexical, scale[1]), alpha, 8, how), ref)
    for how in ("minmax", "zscore"):
        ref = fuse_scores(dense, lexical, alpha, 8, how)
        same(fuse_scores(scaled(dense, 1.0, shift), lexical, alpha, 8, how), ref)


@settings(max_examples=100, deadline=None)
@given(
    dense=positive_hits,
    lexical=positive_hits,
    alpha=st.floats(0.05, 0.95),
    stats=st.tuples(st.floats(-3, 3), st.floats(0.1, 5), st.floats(0, 3), st.floats(0.1, 5)),
    scale=st.floats(0.1, 10),
    shift=st.floats(-10, 10),
)
def test_zscore_with_corpus_moments_is_affine_invariant(dense, lexical, alpha, stats, scale, shift):
    """A list and its corpus-wide moments moved to other units together fuse the same; the
    moments, not the list's own spread, set each hit's score."""
    ds, ls = (stats[0], stats[1]), (stats[2], stats[3])
    ref = fuse_scores(dense, lexical, alpha, 8, "zscore", (ds, ls))
    moved = [(d, scale * v + shift) for d, v in dense]
    got = fuse_scores(
        moved, lexical, alpha, 8, "zscore", ((scale * ds[0] + shift, scale * ds[1]), ls)
    )
    np.testing.assert_allclose([s for _, s in got], [s for _, s in ref], atol=1e-7)
    z, _ = normalise(dense, "zscore", ds)
    assert z == pytest.approx({d: (v - ds[0]) / ds[1] for d, v in dense})


def test_zscore_by_hand_and_its_fallbacks():
    hits = [("a", 3.0), ("b", 1.0)]
    assert normalise(hits, "zscore") == ({"a": 1.0, "b": -1.0}, -1.0)  # own mean 2, deviation 1
    assert normalise(hits, "zscore", (0.0, 2.0)) == ({"a": 1.5, "b": 0.5}, 0.5)
    for unknown in ((np.nan, np.nan), (1.0, 0.0), (1.0, np.inf)):  # unusable: the list's own
        assert normalise(hits, "zscore", unknown) == normalise(hits, "zscore")
    assert normalise([("a", 2.0), ("b", 2.0)], "zscore") == ({"a": 0.0, "b": 0.0}, 0.0)
    # b is far above the corpus on the lexical side but not the dense one: z-scores say so,
    # where min-max puts each list's best at 1 whatever the spread behind it.
    dense, lexical = [("a", 0.9), ("b", 0.8)], [("b", 12.0), ("a", 1.0)]
    moments = ((0.7, 0.1), (1.0, 1.0))
    assert fuse_scores(dense, lexical, 0.5, 2, "zscore", moments)[0][0] == "b"
    assert fuse_scores(dense, lexical, 0.9, 2, "zscore", moments)[0][0] == "b"
    assert fuse_scores(dense, lexical, 0.9, 2, "minmax")[0][0] == "a"
    with pytest.raises(ValueError, match="2 dense lists but 1 lexical"):
        fuse_lists([dense, dense], [lexical], 0.5, 2)
    with pytest.raises(ValueError, match="2 queries but 3 dense weights"):
        fuse_lists([dense, dense], [lexical, lexical], [0.5, 0.5, 0.5], 2)
    one = fuse_lists([dense, dense], [lexical, lexical], np.float32(0.5), 2)
    assert one == fuse_lists([dense, dense], [lexical, lexical], [0.5, 0.5], 2)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batches=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    dim=st.integers(1, 12),
)
def test_score_moments_equal_scoring_every_document(seed, batches, dim):
    rng = np.random.default_rng(seed)
    index = FaissIndex(dim)
    docs = []
    for b, n in enumerate(batches):  # added in batches, as a growing corpus is
        e = rng.normal(size=(n, dim)).astype(np.float32)
        index.add([f"d{b}-{i}" for i in range(n)], e)
        docs.append(e)
    q = rng.normal(size=(3, dim)).astype(np.float32)
    scores = q.astype(np.float64) @ np.concatenate(docs).astype(np.float64).T  # (3, N)
    got = index.score_stats(q)
    np.testing.assert_allclose(got[:, 0], scores.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[:, 1], scores.std(axis=1), rtol=1e-4, atol=1e-5)
    assert np.isnan(ScoreMoments(dim).stats(q)).all()  # no documents: unknown


def test_an_instance_never_predicts_itself():
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(30, 8)))
    scores = rng.random((30, 4))
    own = np.arange(30)
    pred = expected_scores(emb, emb, scores, k=5, tau=0.1, exclude=own)
    idx, w = neighbour_weights(emb, emb, 5, 0.1, exclude=own)
    assert not (idx == own[:, None]).any()
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    changed = scores.copy()
    changed[7] += 100.0  # instance 7's own score moves: its own prediction must not
    again = expected_scores(emb, emb, changed, k=5, tau=0.1, exclude=own)
    np.testing.assert_allclose(again[7], pred[7])
    assert not np.allclose(again, pred)  # ... while it does inform its neighbours
    with pytest.raises(ValueError, match="k must be in"):
        neighbour_weights(emb, emb, 30, 0.1, exclude=own)
