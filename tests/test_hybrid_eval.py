"""The experiment's candidate systems on synthetic data: no model needed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerretriever.encoder import BASE
from routerretriever.fusion import NORMALISATIONS
from routerretriever.hybrid_eval import (
    Candidate,
    Library,
    QuerySet,
    candidate_grid,
    cross_fitted,
    evaluate_candidates,
    gated_maker,
    neighbour_maker,
    pilot_maker,
    run_policy,
)
from routerretriever.index import FaissIndex
from routerretriever.pilots import DomainInstances
from routerretriever.policy import PilotPolicy
from routerretriever.selection import choose, dev_margin, lead_or_base


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def query_set(rng, domain, n, docs, index, labelled=True):
    """Queries near one random document each; the 'good' expert's vectors are closer."""
    target = rng.integers(len(docs), size=n)
    noise = rng.normal(size=(n, docs.shape[1]))
    emb = {
        BASE: unit(docs[target] + 0.9 * noise),
        "good": unit(docs[target] + 0.3 * noise),
        "bad": unit(rng.normal(size=(n, docs.shape[1]))),
    }
    qids = [f"{domain}-q{i}" for i in range(n)]
    qrels = {q: {f"d{t}": 1} for q, t in zip(qids, target, strict=True)}
    lexical = [[(f"d{t}", 3.0), (f"d{(t + 1) % len(docs)}", 1.0)] for t in target]
    return QuerySet(domain, qids, qrels, emb, index, lexical, labelled)


@pytest.fixture
def world():
    rng = np.random.default_rng(0)
    docs = unit(rng.normal(size=(200, 24)))
    index = FaissIndex.from_embeddings([f"d{i}" for i in range(200)], docs)
    sets = {p: {d: query_set(rng, d, 40, docs, index) for d in ("x", "y")} for p in ("tr", "dev")}
    insts = [
        DomainInstances(
            d,
            qs.qids,
            qs.base,
            {m: qs.ndcg(qs.dense_member(m)) for m in (BASE, "good", "bad")},
        )
        for d, qs in sets["tr"].items()
    ]
    lib = Library(list(sets["tr"].values()), insts, ["good", "bad"])
    return lib, sets["dev"]


def test_pure_member_at_full_dense_weight_scores_as_that_member_alone(world):
    lib, dev = world
    qs = dev["x"]
    base_only = pilot_maker("weighted", 1.0)(lib)
    scores, cost = run_policy(base_only, 1.0, qs)
    np.testing.assert_array_equal(scores, qs.ndcg(qs.dense_member(BASE)))
    assert cost == 0.0
    # Lexical alone (alpha 0) is the BM25 ranking, whatever the dense side says or the
    # normalisation.
    for how in NORMALISATIONS:
        got = run_policy(base_only, 0.0, qs, how)[0]
        np.testing.assert_array_equal(got, qs.ndcg(qs.lexical))


def test_expected_gain_routing_declines_the_harmful_expert(world):
    lib, dev = world
    policy = neighbour_maker(20, 0.05, 1)(lib)
    w = policy.weights(dev["x"].base)[0]
    assert w[:, policy.members.index("bad")].sum() == 0  # never chosen: it scores worst
    assert w[:, policy.members.index("good")].mean() > 0.9


def test_the_default_is_chosen_on_dev_and_fast(world):
    lib, dev = world
    assert {c.how for c in candidate_grid("weighted")} == {"minmax"}  # by default
    cands = candidate_grid("weighted", NORMALISATIONS)
    cands = [c for c in cands if c.family in ("base", "pilot", "knn-20-0.02-1", "knn-20-0.02-all")]
    evaluate_candidates(cands, lib, dev, dev)
    for c in cands:  # the per-query dev scores are kept, and are what the means summarise
        assert c.dev_scores.keys() == c.dev.keys()
        assert all(c.dev_scores[d].mean() == pytest.approx(c.dev[d]) for d in c.dev)
    default, best = choose(cands, ["x"], max_cost=1.0)
    assert default.cost <= 1.0
    assert default.dev_mean(["x"]) == max(c.dev_mean(["x"]) for c in best.values() if c.cost <= 1.0)
    fast, _ = choose(cands, ["x"], max_cost=0.5)
    assert fast.cost <= 0.5
    # Each lexical weight below 1 comes with each normalisation; alpha 1 (dense only) once.
    assert {(c.alpha < 1, c.how) for c in cands} == {
        (True, "minmax"),
        (True, "max"),
        (True, "zscore"),
        (False, "minmax"),
    }
    for fam, c in best.items():  # each family's alpha and normalisation: best on labelled dev
        same = [o for o in cands if o.family == fam]
        assert c.dev_mean(["x"]) == max(o.dev_mean(["x"]) for o in same)
    assert best["knn-20-0.02-all"].cost > 1.0  # the full mixture needs both experts' passes
    # With no labelled domain, every domain's dev instances decide both choices.
    default, best = choose(cands, [], max_cost=1.0)
    assert default.dev_mean() == max(c.dev_mean() for c in best.values() if c.cost <= 1.0)


def test_pseudo_query_dev_instances_do_not_pick_the_family():
    """A family that wins only on the unlabelled (pseudo-query) dev domain, where BM25 is easy,
    is not the default: the family is chosen on the labelled dev queries."""

    def cand(family, alpha, lab, pseudo):
        return Candidate(
            family, family, pilot_maker("weighted"), alpha, {"lab": lab, "pseudo": pseudo}, cost=0.0
        )

    lexical_heavy = cand("base", 0.3, 0.60, 0.90)
    routed = cand("pilot", 0.6, 0.65, 0.70)
    default, _ = choose([lexical_heavy, routed], ["lab"])
    assert default is routed
    default, _ = choose([lexical_heavy, routed], [])  # nothing labelled: all dev decides
    assert default is lexical_heavy


def test_gate_declines_the_expert_routed_to_that_hurts_and_keeps_the_one_that_pays(world):
    lib, dev = world
    # Pilots that send domain y's queries to "bad": Algorithm 1 labels by the scores given.
    y_inst = next(i for i in lib.instances if i.domain == "y")
    n = len(y_inst.ids)
    forced = DomainInstances(
        "y", y_inst.ids, y_inst.embeddings, {"good": np.zeros(n), "bad": np.ones(n)}
    )
    x_inst = next(i for i in lib.instances if i.domain == "x")
    gated_lib = Library(lib.sets, [x_inst, forced], ["good", "bad"], list(dev.values()))
    plain = pilot_maker("weighted")(gated_lib)
    assert plain.weights(dev["y"].base)[0][:, plain.members.index("bad")].mean() > 0.2
    policy = gated_maker("weighted", 1.0)(gated_lib)
    assert policy.decline == ("bad",)
    w = policy.weights(dev["y"].base)[0]
    assert w[:, policy.members.index("bad")].sum() == 0
    routed_bad = plain.weights(dev["y"].base)[0][:, plain.members.index("bad")] == 1
    assert (w[routed_bad, policy.members.index(BASE)] == 1).all()  # the base model instead
    assert run_policy(policy, 1.0, dev["y"])[0].mean() > run_policy(plain, 1.0, dev["y"])[0].mean()


@pytest.mark.parametrize("folds", [2, 5, 10])
def test_a_gate_fitted_on_dev_is_scored_on_dev_only_across_folds(world, folds):
    lib, dev = world
    lib = Library(lib.sets, lib.instances, lib.experts, list(dev.values()))
    seen: list[set[str]] = []

    def spy(inner):
        def make(library):
            seen.append({q for s in library.dev for q in s.qids})
            return inner(library)

        return make

    c = Candidate("gated", "pilot-gated", spy(gated_maker("weighted", 0.5)), 0.5, fits_dev=True)
    fitted = cross_fitted(c, lib, dev, folds)
    assert len(seen) == folds  # one fit per fold, whatever the number of dev sets
    for d, (scores, cost) in fitted.items():
        assert len(scores) == len(dev[d].qids) and 0 <= cost <= 1
        for f in range(folds):  # fold f is scored by the fit that never saw it, and saw the rest
            fold = {q for i, q in enumerate(dev[d].qids) if i % folds == f}
            assert fold.isdisjoint(seen[f]) and set(dev[d].qids) - fold <= seen[f]
    with pytest.raises(ValueError, match="at least 2"):
        cross_fitted(c, lib, dev, 1)


def test_cross_fitting_changes_nothing_for_a_system_fitted_on_no_dev(world):
    lib, dev = world
    lib = Library(lib.sets, lib.instances, lib.experts, list(dev.values()))
    c = Candidate("router", "pilot", pilot_maker("weighted"), 0.5)
    fitted = cross_fitted(c, lib, dev, 5)
    for d, qs in dev.items():
        plain, cost = run_policy(c.make(lib), 0.5, qs)
        np.testing.assert_allclose(fitted[d][0], plain)
        assert fitted[d][1] == pytest.approx(cost)


def scored(name, per_domain):
    c = Candidate(name, name, pilot_maker("weighted"), 0.5)
    c.dev_scores = {d: np.asarray(v, dtype=float) for d, v in per_domain.items()}
    c.dev = {d: float(v.mean()) for d, v in c.dev_scores.items()}
    return c


def test_dev_margin_is_the_paired_lead_and_its_standard_error():
    ref = scored("base", {"a": [0.2, 0.4, 0.6, 0.8], "b": [0.5, 0.5]})
    c = scored("routed", {"a": [0.3, 0.4, 0.9, 0.8], "b": [0.7, 0.5]})
    m = dev_margin(c, ref, ["a", "b"])
    # a: differences 0.1, 0, 0.3, 0 (mean 0.1, variance 0.02); b: 0.2, 0 (mean 0.1, variance 0.02)
    assert m.over == "base"
    assert m.difference == pytest.approx(c.dev_mean(["a", "b"]) - ref.dev_mean(["a", "b"]))
    assert m.difference == pytest.approx(0.1)
    assert m.se == pytest.approx(np.sqrt(0.02 / 4 + 0.02 / 2) / 2)
    assert not m.within_noise  # a lead of 0.1 against a standard error of 0.061
    noisy = scored("noisy", {"a": [0.6, 0.1, 0.9, 0.6], "b": [0.5, 0.5]})  # a: +.4 -.3 +.3 -.2
    assert dev_margin(noisy, ref, ["a"]).difference == pytest.approx(0.05)
    assert dev_margin(noisy, ref, ["a"]).within_noise  # standard error 0.18
    same = dev_margin(ref, ref, ["a", "b"])
    assert (same.difference, same.se, same.within_noise) == (0.0, 0.0, True)
    with pytest.raises(ValueError, match="b: .*different queries"):
        dev_margin(c, scored("short", {"a": [0.1] * 4, "b": [0.1]}), ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        dev_margin(c, ref, [])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=30),
    st.lists(st.floats(0, 1), min_size=1, max_size=30),
    st.floats(-0.5, 0.5),
)
def test_dev_margin_moves_with_a_shift_and_keeps_its_error(a, b, shift):
    """Adding the same amount to every dev score of one system moves its lead by exactly that
    and leaves the standard error alone; the error is never negative."""
    rng = np.random.default_rng(len(a) + 7 * len(b))
    ref = scored("ref", {"a": a, "b": b})
    other = {"a": rng.permutation(a), "b": rng.permutation(b)}
    m = dev_margin(scored("c", other), ref, ["a", "b"])
    moved = dev_margin(scored("c", {d: v + shift for d, v in other.items()}), ref, ["a", "b"])
    assert m.se >= 0 and np.isfinite(m.se)
    assert moved.difference == pytest.approx(m.difference + shift, abs=1e-9)
    assert moved.se == pytest.approx(m.se, abs=1e-9)


def test_a_significance_rule_keeps_base_and_bm25_unless_the_lead_is_clear():
    """min_lead_se (the experiment's opt-in rule): the best on dev is the default only when it
    leads base + BM25 by that many standard errors; 0 keeps the best on dev."""
    base = scored("base", {"a": [0.2, 0.4, 0.6, 0.8], "b": [0.5, 0.5]})
    best = scored("routed", {"a": [0.3, 0.4, 0.9, 0.8], "b": [0.7, 0.5]})  # +0.1, SE 0.061
    assert lead_or_base(best, base, ["a", "b"])[0] is best
    assert lead_or_base(best, base, ["a", "b"], 1.6)[0] is best  # it leads by 1.633 SE
    chosen, margin = lead_or_base(best, base, ["a", "b"], 1.64)
    assert chosen is base and margin.over == "base" and margin.difference == pytest.approx(0.1)
    assert lead_or_base(base, base, ["a", "b"], 1.64)[0] is base


def test_a_gate_per_corpus_keeps_an_expert_only_where_it_paid_and_nowhere_unseen(world):
    from dataclasses import replace

    from routerretriever.corpora import CorpusSketch
    from routerretriever.data import Document

    lib, dev = world
    sk = {d: CorpusSketch.of({f"{d}{i}": Document(d) for i in range(5)}) for d in ("x", "y", "z")}
    dev = {d: replace(qs, corpus=sk[d]) for d, qs in dev.items()}
    # "good" pays wherever it is routed; "bad" is forced onto y's queries and hurts there.
    y_inst = next(i for i in lib.instances if i.domain == "y")
    n = len(y_inst.ids)
    forced = DomainInstances(
        "y", y_inst.ids, y_inst.embeddings, {"good": np.zeros(n), "bad": np.ones(n)}
    )
    x_inst = next(i for i in lib.instances if i.domain == "x")
    glib = Library(lib.sets, [x_inst, forced], ["good", "bad"], list(dev.values()))
    policy = gated_maker("weighted", 1.0, base_alpha=1.0)(glib)  # dense only: clear gains
    assert policy.scope is not None and policy.decline == ("bad",)
    assert policy.scope.experts == {"good": ("x", "y")}  # it paid on both corpora
    # On x "good" answers; on an unseen corpus every query is base + BM25 at base_alpha, exactly.
    w = policy.on_corpus(sk["x"]).weights(dev["x"].base)[0]
    assert w[:, policy.members.index("good")].sum() > 0
    unseen = replace(dev["x"], corpus=sk["z"])
    base_only = pilot_maker("weighted", 1.0)(glib)
    np.testing.assert_array_equal(
        run_policy(policy, 1.0, unseen, base_alpha=0.5)[0],
        run_policy(base_only, 0.5, unseen)[0],
    )
    assert run_policy(policy, 1.0, unseen, base_alpha=0.5)[1] == 0.0  # no expert pass


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
@settings(max_examples=25, deadline=None)
def test_base_only_queries_are_fused_at_base_alpha_and_the_rest_at_alpha(a, b):
    rng = np.random.default_rng(1)
    docs = unit(rng.normal(size=(60, 16)))
    index = FaissIndex.from_embeddings([f"d{i}" for i in range(60)], docs)
    qs = query_set(rng, "x", 30, docs, index)
    insts = [DomainInstances("x", qs.qids, qs.base, {"good": np.ones(30)})]
    lib = Library([qs], insts, ["good"])
    policy = pilot_maker("weighted")(lib)  # every query to "good"
    declined = PilotPolicy(policy.pilots, "weighted", decline=("good",))
    np.testing.assert_array_equal(
        run_policy(policy, a, qs, base_alpha=b)[0], run_policy(policy, a, qs)[0]
    )
    base_only = pilot_maker("weighted", 1.0)(lib)
    np.testing.assert_array_equal(
        run_policy(declined, a, qs, base_alpha=b)[0], run_policy(base_only, b, qs)[0]
    )
