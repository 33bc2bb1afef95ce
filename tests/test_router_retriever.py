"""RouterRetriever end to end on the tiny fixture with two tiny real experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerretriever import Encoder, ModelError, load_beir
from routerretriever.encoder import BASE
from routerretriever.experts import load_expert
from routerretriever.index import FaissIndex
from routerretriever.instances import per_query_ndcg
from routerretriever.lexical import BM25Config
from routerretriever.pilots import DomainInstances, add_expert, build_pilots, remove_expert
from routerretriever.policy import PilotPolicy
from routerretriever.pseudo import make_pseudo_queries
from routerretriever.retriever import RouterRetriever
from routerretriever.router import route
from routerretriever.store import embed_corpus
from tests.conftest import TINY, tiny_model_path


@pytest.fixture(scope="module")
def setup(trained, tmp_path_factory):
    _, store, _ = trained
    enc = Encoder.load(tiny_model_path())
    for name in ("alpha", "beta"):
        load_expert(enc, store / name)
    ds = load_beir(TINY)
    emb = embed_corpus(enc, ds.corpus, cache_dir=tmp_path_factory.mktemp("c"))
    index = FaissIndex.from_embeddings(emb.ids, emb.embeddings)
    # Two "domains" of instances over the one tiny corpus: titles and text crops.
    queries, qrels = make_pseudo_queries(ds.corpus, seed=3)
    split = {
        "titles": {q for q in queries if q.endswith("#title")},
        "crops": {q for q in queries if "#crop" in q},
    }
    domains = {
        n: ({q: queries[q] for q in ids}, {q: qrels[q] for q in ids}) for n, ids in split.items()
    }
    return enc, ds, index, domains


_MEMO: dict = {}  # (encoder id, expert or "emb", domain) -> scores or embeddings, per session


def instances(enc, index, domains, names, experts, calls):
    """Each named domain's instances scored by ``experts``; ``calls`` records what is scored
    (the scores themselves are computed once per session: they never change)."""

    def scorer(expert, di):
        calls.append((expert, di.domain))
        key = (id(enc), expert, di.domain)
        if key not in _MEMO:
            q, r = domains[di.domain]
            _MEMO[key] = per_query_ndcg(enc, expert, index, q, r)[0]
        return _MEMO[key]

    out = []
    for name in names:
        q, r = domains[name]
        key = (id(enc), "emb", name)
        if key not in _MEMO:
            _MEMO[key] = enc.encode(list(q.values()))
        di = DomainInstances(name, list(q), _MEMO[key])
        for e in experts:
            di.scores[e] = scorer(e, di)
        out.append(di)
    return out, scorer


def test_adding_an_expert_equals_a_rebuild_and_trains_nothing(setup, trained):
    from tests.conftest import state_digest

    enc, _, index, domains = setup
    digest = state_digest(enc.model)
    calls: list = []
    before_domains, scorer = instances(enc, index, domains, ["titles"], [BASE, "alpha"], calls)
    before = build_pilots(before_domains, [BASE, "alpha"])
    experts = [BASE, "alpha"]
    new_domain = instances(enc, index, domains, ["crops"], [], [])[0][0]
    calls.clear()
    added = add_expert(before_domains, experts, "beta", scorer, new_domain)
    # Only what is new was scored: beta on the old instances, every expert on the new domain.
    assert sorted(calls) == sorted(
        [("beta", "titles"), (BASE, "crops"), ("alpha", "crops"), ("beta", "crops")]
    )
    scratch_domains, _ = instances(
        enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], []
    )
    scratch = build_pilots(scratch_domains, [BASE, "alpha", "beta"])
    assert added.pilots == scratch.pilots and added.experts == scratch.experts
    np.testing.assert_allclose(added.embeddings, scratch.embeddings, atol=1e-6)
    assert state_digest(enc.model) == digest  # nothing was trained

    removed = remove_expert(before_domains, experts, "beta", drop_domain="crops")
    assert removed.pilots == before.pilots
    np.testing.assert_allclose(removed.embeddings, before.embeddings, atol=1e-6)


def test_routed_embeddings_equal_each_query_with_its_own_expert(setup):
    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], [])
    lib = build_pilots(insts, [BASE, "alpha", "beta"])
    rr = RouterRetriever(enc, lib, rule="nearest")
    texts = [*ds.queries.values(), *list(domains["crops"][0].values())[:10]]
    decisions = rr.route(texts)
    chosen = [d.expert for d in decisions]
    assert len(set(chosen)) >= 2, chosen  # the check below must compare different experts
    routed = rr.encode_queries(texts)
    one_by_one = np.stack(
        [
            enc.encode([t], experts=None if e == BASE else e)[0]
            for t, e in zip(texts, chosen, strict=True)
        ]
    )
    np.testing.assert_allclose(routed, one_by_one, atol=1e-5)
    for d in decisions:
        assert d.scores[d.expert] == max(d.scores.values())


def test_base_routed_queries_cost_one_pass(setup):
    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles"], [BASE], [])
    lib = build_pilots(insts, [BASE])
    rr = RouterRetriever(enc, lib, routing_precision="float32")
    counted = []
    original = enc.encode_tokens
    enc.encode_tokens = lambda ids, **kw: counted.append(len(ids)) or original(ids, **kw)
    try:
        rr.encode_queries(list(ds.queries.values()))
    finally:
        del enc.encode_tokens
    assert counted == [len(ds.queries)]


def test_a_policy_that_routes_nothing_costs_one_exact_pass_even_with_a_bfloat16_router(setup):
    """Base mix 1, every expert declined, or a pool of the base model alone: no cheaper routing
    pass followed by an exact one, but one float32 pass that is the base model's embedding."""
    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], [])
    lib = build_pilots(insts, ["alpha", "beta"])
    texts = list(ds.queries.values())
    want = enc.encode(texts, show_progress=False)
    for policy in (
        PilotPolicy(lib, "weighted", base_mix=1.0),
        PilotPolicy(lib, "weighted", decline=("alpha", "beta")),
        neighbour_policy(enc, index, domains, [BASE], top=1),
    ):
        assert policy.base_only
        rr = RouterRetriever(enc, policy=policy, routing_precision="bfloat16")
        counted: list = []
        original = enc.encode_tokens

        def spy(ids, counted=counted, original=original, **kw):
            counted.append(kw.get("dtype"))
            return original(ids, **kw)

        enc.encode_tokens = spy
        try:
            got = rr.encode_queries(texts)
        finally:
            del enc.encode_tokens
        assert counted == [None]  # one pass, in float32
        np.testing.assert_array_equal(got, want)
    # One declined expert of two still routes: the bfloat16 pass decides.
    assert not PilotPolicy(lib, "weighted", decline=("alpha",)).base_only
    assert not PilotPolicy(lib, "weighted", base_mix=0.3).base_only


def test_search_and_beir_evaluator_agree(setup):
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    from routerretriever import evaluate

    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], [])
    rr = RouterRetriever(enc, build_pilots(insts, ["alpha", "beta"]))
    rr.index_corpus(ds.corpus)
    run, decisions = rr.search_with_routes(ds.queries, k=10)
    assert set(decisions) == set(ds.queries)
    ours = evaluate(ds.qrels, run, ["ndcg@10"]).scores["ndcg@10"]
    corpus = {d: {"title": doc.title, "text": doc.text} for d, doc in ds.corpus.items()}
    beir = EvaluateRetrieval(
        DenseRetrievalExactSearch(rr, batch_size=16), k_values=[10], score_function="dot"
    )
    ndcg, *_ = beir.evaluate(ds.qrels, beir.retrieve(corpus, ds.queries), [10])
    assert ours == pytest.approx(ndcg["NDCG@10"], abs=1e-4)


def test_unknown_expert_in_library_is_refused(setup):
    enc, *_ = setup
    lib = build_pilots(
        [DomainInstances("x", ["q"], np.ones((1, 384), np.float32), {"gamma": np.ones(1)})],
        ["gamma"],
    )
    with pytest.raises(ValueError, match=r"names expert\(s\) \['gamma'\] not loaded"):
        RouterRetriever(enc, lib)


def test_save_load_round_trip(setup, tmp_path):
    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], [])
    rr = RouterRetriever(enc, build_pilots(insts, [BASE, "alpha", "beta"]), rule="nearest")
    texts = list(ds.queries.values())
    rr.save(tmp_path / "rr")
    back = RouterRetriever.load(tmp_path / "rr")
    assert back.rule == "nearest" and back.encoder.experts == ["alpha", "beta"]
    assert [d.expert for d in back.route(texts)] == [d.expert for d in rr.route(texts)]
    np.testing.assert_allclose(back.encode_queries(texts), rr.encode_queries(texts), atol=1e-6)


def test_identity_expert_runs_as_the_base_model(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, store, _ = trained
    ident = tmp_path / "ident"
    shutil.copytree(store / "alpha", ident)
    w = load_file(str(ident / "adapter_model.safetensors"))
    save_file(
        {k: v * 0 if ".lora_B." in k else v for k, v in w.items()},
        str(ident / "adapter_model.safetensors"),
    )
    enc = Encoder.load(tiny_model_path())
    load_expert(enc, ident, "ident")
    load_expert(enc, store / "alpha")
    assert enc.is_identity("ident") and not enc.is_identity("alpha")
    texts = ["statins and breast cancer", "wing flutter"]
    np.testing.assert_array_equal(enc.encode(texts, experts="ident"), enc.encode(texts))
    lib = build_pilots(
        [DomainInstances("d", ["q"], enc.encode(texts[:1]), {"ident": np.ones(1)})], ["ident"]
    )
    counted = []
    original = enc.encode_tokens
    enc.encode_tokens = lambda ids, **kw: counted.append(len(ids)) or original(ids, **kw)
    RouterRetriever(enc, lib, routing_precision="float32").encode_queries(texts)
    assert counted == [2]  # the routing pass only


def test_bfloat16_routing_pass_routes_as_float32_and_keeps_float32_embeddings(setup):
    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], [])
    lib = build_pilots(insts, [BASE, "alpha", "beta"])
    texts = [*ds.queries.values(), *list(domains["crops"][0].values())[:10]]
    exact = RouterRetriever(enc, lib, routing_precision="float32")
    fast = RouterRetriever(enc, lib, routing_precision="bfloat16")
    assert exact.routing_dtype is None and fast.routing_dtype is not None
    routes = [d.expert for d in exact.route(texts)]
    assert [d.expert for d in fast.route(texts)] == routes
    assert len(set(routes)) >= 2, routes
    # Scores differ (bf16 pass) but the final embeddings are the float32 expert passes.
    assert [d.scores for d in fast.route(texts)] != [d.scores for d in exact.route(texts)]
    np.testing.assert_allclose(fast.encode_queries(texts), exact.encode_queries(texts), atol=1e-6)
    with pytest.raises(ValueError, match="routing_precision"):
        RouterRetriever(enc, lib, routing_precision="int8")


def test_pilots_in_a_cut_space_route_on_the_first_layers(setup, tmp_path):
    from dataclasses import replace

    from routerretriever.pilots import PilotLibrary

    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha", "beta"], [])
    cut = [
        replace(i, embeddings=enc.encode(list(domains[i.domain][0].values()), layers=2))
        for i in insts
    ]
    lib = build_pilots(cut, [BASE, "alpha", "beta"], layers=2)
    lib.save(tmp_path / "p")
    assert PilotLibrary.load(tmp_path / "p").layers == 2
    rr = RouterRetriever(enc, PilotLibrary.load(tmp_path / "p"), routing_precision="float32")
    texts = [*ds.queries.values(), *list(domains["crops"][0].values())[:10]]
    decisions = rr.route(texts)
    want = route(enc.encode(texts, layers=2), lib, rr.rule)
    assert [d.expert for d in decisions] == [d.expert for d in want]
    # Every query, base-routed ones too, gets a full-depth final embedding.
    chosen = [d.expert for d in decisions]
    full = np.stack(
        [
            enc.encode([t], experts=None if e == BASE else e)[0]
            for t, e in zip(texts, chosen, strict=True)
        ]
    )
    np.testing.assert_allclose(rr.encode_queries(texts), full, atol=1e-5)
    lib.layers = 9
    with pytest.raises(
        ValueError, match=f"routes on 9 layers; the base model has {enc.num_layers}"
    ):
        RouterRetriever(enc, lib)


def neighbour_policy(enc, index, domains, members, top):
    from routerretriever.policy import NeighbourPolicy

    insts, _ = instances(enc, index, domains, ["titles", "crops"], members, [])
    emb = np.concatenate([i.embeddings for i in insts])
    scores = np.concatenate([np.stack([i.scores[m] for m in members], 1) for i in insts])
    return NeighbourPolicy(list(members), emb, scores, k=5, temperature=0.05, top=top)


def test_a_pool_of_only_the_base_model_returns_exactly_the_base_models_results(setup):
    from routerretriever import DenseRetriever
    from routerretriever.fusion import fuse_scores
    from routerretriever.lexical import BM25Index

    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles"], [BASE], [])
    base = DenseRetriever(enc, backend="torch")  # one corpus runtime on both sides
    base.index_corpus(ds.corpus)
    want = base.search(ds.queries, k=10)
    for policy in (
        {"pilots": build_pilots(insts, [BASE])},
        {"policy": neighbour_policy(enc, index, domains, [BASE], top=1)},
    ):
        for precision in ("float32", "bfloat16"):
            rr = RouterRetriever(enc, **policy, routing_precision=precision, backend="torch")
            rr.index_corpus(ds.corpus)
            assert rr.search(ds.queries, k=10) == want
    # With BM25 in the pool: the base model's ranking fused with BM25's, nothing else.
    rr = RouterRetriever(
        enc, build_pilots(insts, [BASE]), alpha=0.5, use_cache=False, backend="torch"
    )
    rr.index_corpus(ds.corpus)
    run, why = rr.search_with_routes(ds.queries, k=10)
    deep = base.search(ds.queries, k=100)
    lexical = BM25Index.build(ds.corpus)
    for q, text in ds.queries.items():
        (lex,) = lexical.search([text], 100, [q])
        assert run[q] == dict(fuse_scores(list(deep[q].items()), lex, 0.5, 10))
        assert why[q].members == {BASE: 1.0} and why[q].lexical_weight == 0.5


def test_a_mixture_equals_score_fusion_of_its_members_own_searches(setup):
    from routerretriever import DenseRetriever

    enc, ds, index, domains = setup
    policy = neighbour_policy(enc, index, domains, [BASE, "alpha", "beta"], top=3)
    rr = RouterRetriever(enc, policy=policy, routing_precision="float32")
    rr.index_corpus(ds.corpus)
    run, why = rr.search_with_routes(ds.queries, k=10)
    n = len(ds.corpus)
    full = {}
    for m in (BASE, "alpha", "beta"):
        r = DenseRetriever(enc, expert=None if m == BASE else m)
        r.index_corpus(ds.corpus)
        full[m] = r.search(ds.queries, k=n)
    mixed_somewhere = False
    for q in ds.queries:
        w = why[q].members
        mixed_somewhere |= len(w) > 1
        assert sum(w.values()) == pytest.approx(1.0)
        fused = {d: sum(w[m] * full[m][q].get(d, 0.0) for m in w) for d in ds.corpus}
        top = sorted(fused.items(), key=lambda x: -x[1])[:10]
        assert list(run[q]) == [d for d, _ in top]
        np.testing.assert_allclose(list(run[q].values()), [s for _, s in top], atol=1e-5)
    assert mixed_somewhere  # the test compares real mixtures, not single members


def test_save_load_round_trip_with_neighbours_and_bm25(setup, tmp_path):
    enc, ds, index, domains = setup
    policy = neighbour_policy(enc, index, domains, [BASE, "alpha", "beta"], top=2)
    bm25 = BM25Config(feedback_docs=3, feedback_terms=5)
    rr = RouterRetriever(
        enc, policy=policy, alpha=0.7, routing_precision="float32", normalise="max", bm25=bm25
    )
    rr.save(tmp_path / "rr")
    back = RouterRetriever.load(tmp_path / "rr", cache_dir=tmp_path / "c", device="cpu")
    assert back.alpha == 0.7 and back.policy.top == 2 and back.encoder.experts == ["alpha", "beta"]
    assert back.encoder.device.type == "cpu"  # where it was asked to load
    assert back.normalise == "max" and back.bm25 == bm25
    rr.index_corpus(ds.corpus)
    back.index_corpus(ds.corpus)
    a, why_a = rr.search_with_routes(ds.queries, k=10)
    b, why_b = back.search_with_routes(ds.queries, k=10)
    assert why_a == why_b
    for q in a:
        assert list(a[q]) == list(b[q])
        # 1e-5: on a GPU, kernels vary with batch shape in the sixth decimal (gpu_check.py)
        np.testing.assert_allclose(list(a[q].values()), list(b[q].values()), atol=1e-5)


def test_a_damaged_neighbour_policy_is_named(setup, tmp_path):
    enc, _, index, domains = setup
    policy = neighbour_policy(enc, index, domains, [BASE, "alpha"], top=1)
    RouterRetriever(enc, policy=policy).save(tmp_path / "rr")
    arrays = tmp_path / "rr" / "neighbours.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:100])  # cut short
    with pytest.raises(ModelError, match="cannot read neighbours.safetensors"):
        RouterRetriever.load(tmp_path / "rr")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def saved_router(setup, tmp_path_factory):
    enc, _, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha"], [])
    from routerretriever.corpora import CorpusScope, CorpusSketch
    from routerretriever.data import Document
    from routerretriever.policy import PilotPolicy

    folder = tmp_path_factory.mktemp("saved") / "rr"
    scope = CorpusScope({"c": CorpusSketch.of({"d": Document("t")})}, {"alpha": ("c",)})
    policy = PilotPolicy(build_pilots(insts, [BASE, "alpha"]), scope=scope)  # every field saved
    RouterRetriever(enc, policy=policy, alpha=0.5, base_alpha=0.4).save(folder)
    return folder


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_router_json_loads_or_names_its_file(saved_router, data):
    """A saved router is a user's file (``evaluate --router``, ``serve --router``): whatever its
    router.json holds, loading gives a router or a ModelError naming the file at fault (the
    manifest, or an expert that does not fit the base model it names), never a crash."""
    manifest = saved_router / "router.json"
    good = manifest.read_text()
    saved = json.loads(good)
    key = data.draw(st.sampled_from([*saved, "bm25", "extra"]), label="key")
    edit = data.draw(st.sampled_from(["replace", "delete", "nest"]), label="edit")
    if edit == "delete":
        saved.pop(key, None)
    elif edit == "nest" and isinstance(saved.get(key), dict) and saved[key]:
        inner = data.draw(st.sampled_from(sorted(saved[key])), label="inner")
        saved[key][inner] = data.draw(json_values, label="value")
    else:
        saved[key] = data.draw(json_values, label="value")
    try:
        manifest.write_text(json.dumps(saved))
        try:
            RouterRetriever.load(saved_router)
        except ModelError as e:
            assert str(saved_router) in str(e) and len(str(e)) < 800
    finally:
        manifest.write_text(good)


def test_a_saved_router_with_a_bad_fusion_setting_names_its_file(setup, tmp_path):
    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], [BASE, "alpha"], [])
    RouterRetriever(enc, build_pilots(insts, [BASE, "alpha"]), alpha=0.5).save(tmp_path / "rr")
    manifest = tmp_path / "rr" / "router.json"
    saved = json.loads(manifest.read_text())
    assert saved["normalise"] == "minmax"
    del saved["normalise"]  # saved before the setting existed: min-max, as then
    saved["bm25"] = {k: v for k, v in saved["bm25"].items() if not k.startswith("feedback")}
    manifest.write_text(json.dumps(saved))
    back = RouterRetriever.load(tmp_path / "rr")
    assert back.normalise == "minmax" and back.bm25 == BM25Config()  # no feedback, as then
    manifest.write_text(json.dumps({**saved, "bm25": {"feedback_weight": 2}}))
    with pytest.raises(ModelError, match=r"router\.json: cannot read .*bm25 feedback_weight"):
        RouterRetriever.load(tmp_path / "rr")
    manifest.write_text(json.dumps({**saved, "normalise": "rank"}))
    with pytest.raises(ModelError, match=r"router\.json: cannot read the saved router .*normalise"):
        RouterRetriever.load(tmp_path / "rr")
    with pytest.raises(ValueError, match="normalise must be one of"):
        RouterRetriever(enc, build_pilots(insts, [BASE, "alpha"]), normalise="z")  # type: ignore[arg-type]


def test_a_router_scoped_to_another_corpus_is_exactly_base_plus_bm25_at_base_alpha(setup, tmp_path):
    from routerretriever.corpora import CorpusScope, CorpusSketch
    from routerretriever.data import Document
    from routerretriever.policy import PilotPolicy

    enc, ds, index, domains = setup
    insts, _ = instances(enc, index, domains, ["titles", "crops"], ["alpha", "beta"], [])
    pilots = build_pilots(insts, ["alpha", "beta"])
    corpora = {"there": CorpusSketch.of({"x": Document("another corpus")})}
    corpora["here"] = CorpusSketch.of(ds.corpus)
    kw = {"routing_precision": "float32", "use_cache": False, "backend": "torch"}
    base = RouterRetriever(enc, policy=PilotPolicy(pilots, base_mix=1.0), alpha=0.4, **kw)
    base.index_corpus(ds.corpus)
    want, _ = base.search_with_routes(ds.queries, k=10)
    kinds = set()
    for where in ("there", "here"):
        scope = CorpusScope(corpora, {"alpha": (where,), "beta": (where,)})
        rr = RouterRetriever(
            enc, policy=PilotPolicy(pilots, scope=scope), alpha=0.8, base_alpha=0.4, **kw
        )
        rr.save(tmp_path / where)
        back = RouterRetriever.load(tmp_path / where, device="cpu", **kw)
        assert back.base_alpha == 0.4 and back.policy.scope == scope
        back.index_corpus(ds.corpus)
        run, why = back.search_with_routes(ds.queries, k=10)
        for q, d in why.items():
            if where == "there":  # kept only on another corpus: base + BM25 at base_alpha
                assert d.members == {BASE: 1.0} and d.lexical_weight == pytest.approx(0.6)
                assert list(run[q]) == list(want[q])
                np.testing.assert_allclose(list(run[q].values()), list(want[q].values()), atol=1e-6)
            else:
                assert BASE not in d.members and d.lexical_weight == pytest.approx(0.2)
            kinds.add(where)
    assert kinds == {"there", "here"}
