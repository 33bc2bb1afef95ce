from __future__ import annotations

import numpy as np
import pytest

from routerretriever.pilots import (
    DomainInstances,
    PilotLibrary,
    best_experts,
    build_pilots,
)
from routerretriever.router import expert_scores, route


def inst(domain, emb, **scores):
    return DomainInstances(
        domain,
        [f"{domain}{i}" for i in range(len(emb))],
        np.asarray(emb, dtype=np.float32),
        {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()},
    )


def test_algorithm_1_groups_by_best_expert_and_takes_centroids():
    d = inst("a", [[1, 0], [0, 1], [1, 1]], A=[0.9, 0.1, 0.5], B=[0.2, 0.8, 0.4])
    lib = build_pilots([d], ["A", "B"])
    assert [(p.expert, p.domain, p.size) for p in lib.pilots] == [("A", "a", 2), ("B", "a", 1)]
    np.testing.assert_allclose(lib.embeddings, [[1.0, 0.5], [0.0, 1.0]])


def test_ties_never_depend_on_expert_order_and_all_zero_rows_are_dropped():
    # Row 0: all zero -> dropped. Row 1: tie between A and B -> B, the better expert over the domain.
    d = inst("a", [[1, 0], [0, 1], [1, 1], [2, 2]], A=[0, 0.5, 0.1, 0.0], B=[0, 0.5, 0.9, 0.7])
    assert best_experts(d, ["A", "B"]).tolist() == [-1, 1, 1, 1]
    assert best_experts(d, ["B", "A"]).tolist() == [-1, 0, 0, 0]
    lib = build_pilots([d], ["A", "B"])
    assert lib.dropped == {"a": 1}
    assert [(p.expert, p.size) for p in lib.pilots] == [("B", 3)]


def test_kmeans_option_splits_groups():
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.01, (5, 2)), rng.normal(5, 0.01, (5, 2))])
    d = inst("a", emb, A=np.ones(10))
    lib = build_pilots([d], ["A"], clusters=2)
    assert sorted(p.size for p in lib.pilots) == [5, 5]
    np.testing.assert_allclose(sorted(lib.embeddings[:, 0]), [0, 5], atol=0.05)


def test_save_load_round_trip(tmp_path):
    d = inst("a", [[1, 0], [0, 1]], A=[1, 0], B=[0, 1])
    lib = build_pilots([d], ["A", "B"])
    lib.save(tmp_path)
    back = PilotLibrary.load(tmp_path)
    assert back.pilots == lib.pilots and back.experts == lib.experts
    np.testing.assert_array_equal(back.embeddings, lib.embeddings)


def test_routing_rules():
    # Expert A wins 8 instances of domain a (near x) and 1 noisy instance of domain b (near y);
    # expert B wins 3 instances of domain b, in between.
    d1 = inst("a", [[1, 0]] * 8, A=[1] * 8, B=[0] * 8)
    d2 = inst("b", [[0, 1]] + [[0.6, 0.8]] * 3, A=[1, 0, 0, 0], B=[0, 1, 1, 1])
    lib = build_pilots([d1, d2], ["A", "B"])
    assert sorted((p.expert, p.domain, p.size) for p in lib.pilots) == [
        ("A", "a", 8),
        ("A", "b", 1),
        ("B", "b", 3),
    ]
    q = np.array([[0.8, 0.6]], dtype=np.float32)
    mean, weighted, nearest = (expert_scores(q, lib, r)[0] for r in ("mean", "weighted", "nearest"))
    np.testing.assert_allclose(mean, [(0.8 + 0.6) / 2, 0.96])
    np.testing.assert_allclose(weighted, [(8 * 0.8 + 0.6) / 9, 0.96])
    np.testing.assert_allclose(nearest, [0.8, 0.96])
    decision = route(q, lib, "mean")[0]
    assert decision.expert == "B" and set(decision.scores) == {"A", "B"}
    with pytest.raises(ValueError, match="unknown routing rule 'avg'"):
        expert_scores(q, lib, "avg")  # type: ignore[arg-type]
