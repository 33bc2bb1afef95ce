from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_pilots_json_loads_or_names_its_folder(data):
    """A pilot library is a user's folder (``router build``, a saved router): whatever its
    pilots.json holds, it loads or gives a ModelError naming the folder."""
    import json
    import tempfile
    from pathlib import Path

    from routerretriever.errors import ModelError

    lib = build_pilots([inst("a", [[1, 0], [0, 1]], A=[1, 0], B=[0, 1])], ["A", "B"])
    with tempfile.TemporaryDirectory() as d:
        lib.save(d)
        manifest = json.loads((Path(d) / "pilots.json").read_text())
        key = data.draw(st.sampled_from([*manifest, "extra"]))
        if key == "pilots" and data.draw(st.booleans()):  # one field of one pilot
            field = data.draw(st.sampled_from(["expert", "domain", "size", "cluster", "x"]))
            manifest["pilots"][0][field] = data.draw(json_values)
        elif data.draw(st.booleans()):
            manifest.pop(key, None)
        else:
            manifest[key] = data.draw(json_values)
        (Path(d) / "pilots.json").write_text(json.dumps(manifest))
        try:
            back = PilotLibrary.load(d)
        except ModelError as e:
            assert str(e).startswith(d) and len(str(e)) < 800
            return
        assert len(back) == len(back.embeddings) and set(p.expert for p in back.pilots) <= set(
            back.experts
        )


def test_damaged_pilot_embeddings_are_named(tmp_path):
    from safetensors.numpy import save_file

    from routerretriever.errors import ModelError

    lib = build_pilots([inst("a", [[1, 0], [0, 1]], A=[1, 0], B=[0, 1])], ["A", "B"])
    lib.save(tmp_path)
    emb = tmp_path / "pilots.safetensors"
    good = emb.read_bytes()
    emb.write_bytes(good[: len(good) // 2])  # cut short, as by a full disk
    with pytest.raises(ModelError, match="cannot read pilots.safetensors"):
        PilotLibrary.load(tmp_path)
    for bad in (np.ones((3, 2)), np.ones(2), np.array([[np.nan, 0], [0, 1]])):
        save_file({"embeddings": bad.astype(np.float32)}, str(emb))
        with pytest.raises(ModelError, match="2 pilots in pilots.json but embeddings of shape"):
            PilotLibrary.load(tmp_path)
    save_file({"other": np.ones((2, 2), dtype=np.float32)}, str(emb))
    with pytest.raises(ModelError, match="cannot read pilots.safetensors"):
        PilotLibrary.load(tmp_path)


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


# -- declining experts that do not pay -----------------------------------------------------------


def test_declined_experts_keeps_only_a_significant_positive_gain():
    from routerretriever.policy import declined_experts

    rng = np.random.default_rng(0)
    routed = ["a"] * 60 + ["b"] * 60 + ["c"] * 60 + ["d"] * 5 + ["e"] * 30
    gains = np.concatenate(
        [
            0.1 + 0.05 * rng.normal(size=60),  # a: pays, consistently
            0.01 + 0.3 * rng.normal(size=60),  # b: noise around zero
            -0.1 + 0.05 * rng.normal(size=60),  # c: hurts
            np.full(5, 0.5),  # d: too few instances to tell
            np.full(30, 0.2),  # e: a constant gain is a gain
        ]
    )
    assert declined_experts(routed, gains, ["a", "b", "c", "d", "e", "f"]) == ("b", "c", "d", "f")
    with pytest.raises(ValueError, match="differ in length"):
        declined_experts(routed[:-1], gains, ["a"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("xyz"), st.floats(-1, 1, allow_nan=False)),
        max_size=80,
    )
)
def test_declined_experts_never_keeps_an_expert_that_does_not_gain_on_average(rows):
    from routerretriever.policy import declined_experts

    routed = [r for r, _ in rows]
    gains = np.array([g for _, g in rows])
    out = declined_experts(routed, gains, ["x", "y", "z"])
    assert set(out) <= {"x", "y", "z"}
    for e in "xyz":
        g = gains[np.asarray(routed) == e] if rows else np.array([])
        if len(g) < 10 or g.mean() <= 0:
            assert e in out


def test_a_declined_expert_sends_its_queries_to_the_base_model_and_survives_save(tmp_path):
    from routerretriever.policy import BASE, PilotPolicy, load_policy

    d = inst("a", [[1, 0], [0, 1], [1, 1]], A=[0.9, 0.1, 0.5], B=[0.2, 0.8, 0.4])
    lib = build_pilots([d], ["A", "B"])
    emb = np.repeat(lib.embeddings[:1], 3, axis=0)  # routed to the first pilot's expert
    first = lib.pilots[0].expert
    plain = PilotPolicy(lib, "weighted")
    assert plain.weights(emb)[0][:, plain.members.index(first)].tolist() == [1.0] * 3
    gated = PilotPolicy(lib, "weighted", decline=(first,))
    w = gated.weights(emb)[0]
    assert w[:, gated.members.index(BASE)].tolist() == [1.0] * 3 and w.sum() == 3
    spec = gated.save(tmp_path)
    assert load_policy(tmp_path, spec).decline == (first,)
    with pytest.raises(ValueError, match="without pilots"):
        PilotPolicy(lib, "weighted", decline=("nobody",))
