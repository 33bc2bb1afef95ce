"""The HTTP service over the real engine: limits, live expert changes, micro-batching, backends,
Ray encoding, and a bounded load and kill test on loopback."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from routerretriever import load_beir
from routerretriever.batching import Limits, MicroBatcher
from routerretriever.instances import Domain
from routerretriever.serving import SERVED, Engine
from tests.conftest import TINY, tiny_model_path

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from routerretriever.service import create_app  # noqa: E402

QUERIES = [
    "statins and breast cancer",
    "wing flutter at supersonic speed",
    "library classification of books",
    "heart attack risk",
    "boundary layer transition",
]
DOMAINS = [Domain("tiny", TINY, "corpus")]


@pytest.fixture(scope="module")
def store_src(trained, tmp_path_factory):
    """A store with the two tiny experts and a pickle-only expert folder."""
    _, store, _ = trained
    dst = tmp_path_factory.mktemp("store-src")
    for name in ("alpha", "beta"):
        shutil.copytree(store / name, dst / name)
    bad = dst / "pickled"
    shutil.copytree(store / "alpha", bad)
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"not really a pickle")
    return dst


@pytest.fixture(scope="module")
def svc_encoder():
    from routerretriever import Encoder

    return Encoder.load(tiny_model_path())


@pytest.fixture
def engine(svc_encoder, store_src, tmp_path_factory, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    cache = tmp_path_factory.getbasetemp() / "service-cache"  # shared: scores computed once
    yield Engine.open(
        svc_encoder,
        store,
        load_beir(TINY).corpus,
        DOMAINS,
        experts=["alpha"],
        cache_dir=cache,
        routing_precision="float32",
    )
    for name in svc_encoder.experts:  # the next test starts from a bare encoder
        svc_encoder.remove_adapter(name)


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, limits=Limits(4, 200, 20))) as c:
        yield c


def expert_hits(engine, query: str, expert: str, k: int) -> list[str]:
    emb = engine.encoder.encode([query], experts=expert)
    return [d for d, _ in engine.index.search(emb, k)[0]]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"queries": QUERIES, "k": 5}, 413, "too many queries: 5 > 4 per request"),
        ({"queries": ["x" * 201], "k": 5}, 413, "queries[0] is too long: 201 > 200 characters"),
        ({"queries": ["ok", "  "], "k": 5}, 400, "queries[1] is empty"),
        ({"queries": [], "k": 5}, 400, "queries must hold at least one query"),
        ({"queries": ["ok"], "k": 0}, 400, "k must be between 1 and 20, got 0"),
        ({"queries": ["ok"], "k": 21}, 400, "k must be between 1 and 20, got 21"),
    ],
)
def test_search_limits(client, body, status, message):
    r = client.post("/search", json=body)
    assert r.status_code == status
    assert r.json()["detail"] == message


def test_malformed_search_body_names_the_field(client):
    r = client.post("/search", json={"queries": "not a list"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "queries"]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("../alpha", 400, "expert path '../alpha' must be relative to the store, without '..'"),
        ("/etc", 400, "expert path '/etc' must be relative to the store, without '..'"),
        ("escape", 400, "expert path 'escape' leaves the store"),
        ("missing", 404, "no expert folder 'missing' in the store"),
        ("pickled", 422, "pickle formats are refused"),
        ("alpha", 409, "expert 'alpha' is already served"),
    ],
)
def test_add_expert_refusals(client, engine, tmp_path, path, status, message):
    (engine.store / "escape").symlink_to(tmp_path)  # a link out of the store
    r = client.post("/experts", json={"path": path})
    assert r.status_code == status
    assert message in r.json()["detail"]
    assert engine.experts == ["alpha"]


def test_openapi_and_health(client):
    spec = client.get("/openapi.json").json()
    assert {
        "/search",
        "/experts",
        "/experts/{name}",
        "/health",
        "/metrics",
        "/v1/embeddings",
        "/v1/models",
    } <= set(spec["paths"])
    assert set(spec["paths"]["/experts"]) == {"get", "post"}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["experts"] == ["alpha"]
    assert health["documents"] == 40


def test_unknown_expert_and_bad_name(client):
    r = client.delete("/experts/gamma")
    assert r.status_code == 404
    assert r.json()["detail"] == "unknown expert 'gamma'; served: ['alpha']"
    r = client.post("/experts", json={"path": "beta", "name": "bad/name"})
    assert r.status_code == 422 and "invalid expert name 'bad/name'" in r.json()["detail"]


def test_live_add_and_remove_change_the_answers(client, engine):
    def search() -> list[dict]:
        r = client.post("/search", json={"queries": QUERIES[:4], "k": 5})
        assert r.status_code == 200
        return r.json()["results"]

    before = search()
    assert {r["expert"] for r in before} == {"alpha"}
    r = client.post("/experts", json={"path": "beta"})
    assert r.status_code == 201 and r.json()["name"] == "beta"
    assert [e["name"] for e in client.get("/experts").json()["experts"]] == ["alpha", "beta"]
    both = search()
    for q, res in zip(QUERIES, both, strict=False):
        assert set(res["routing_scores"]) == {"alpha", "beta"}
        assert res["expert"] == max(res["routing_scores"], key=res["routing_scores"].get)
        assert [h["id"] for h in res["hits"]] == expert_hits(engine, q, res["expert"], 5)
    r = client.delete("/experts/alpha")
    assert r.status_code == 200 and r.json()["experts"] == ["beta"]
    after = search()
    assert {r["expert"] for r in after} == {"beta"}
    for q, res in zip(QUERIES, after, strict=False):
        assert [h["id"] for h in res["hits"]] == expert_hits(engine, q, "beta", 5)
    assert [r["hits"] for r in after] != [r["hits"] for r in before]  # the answers changed
    assert json.loads((engine.store / SERVED).read_text())["experts"] == {"beta": "beta"}
    assert engine.encoder.experts == ["beta"]  # the removed expert is unloaded


def test_live_add_equals_a_fresh_start(engine):
    from routerretriever import Encoder

    engine.add_expert("beta")
    fresh = Engine.open(
        Encoder.load(tiny_model_path()),
        engine.store,
        load_beir(TINY).corpus,
        DOMAINS,
        index=engine.index,
        cache_dir=engine.cache_dir,
        routing_precision="float32",
    )
    assert fresh.experts == ["alpha", "beta"]  # from .served.json
    assert fresh.pilots.pilots == engine.pilots.pilots
    np.testing.assert_allclose(fresh.pilots.embeddings, engine.pilots.embeddings, atol=1e-6)


def test_experts_asked_for_at_start_replace_the_saved_set(engine, caplog):
    from routerretriever import Encoder

    assert json.loads((engine.store / SERVED).read_text())["experts"] == {"alpha": "alpha"}
    again = Engine.open(
        Encoder.load(tiny_model_path()),
        engine.store,
        load_beir(TINY).corpus,
        DOMAINS,
        index=engine.index,
        experts=["beta"],
        cache_dir=engine.cache_dir,
    )
    assert again.experts == ["beta"]
    assert json.loads((engine.store / SERVED).read_text())["experts"] == {"beta": "beta"}
    assert "instead of the last run's ['alpha']" in caplog.text


def test_micro_batching_merges_concurrent_requests(engine):
    calls = []

    def search(texts, k):
        calls.append(len(texts))
        return engine.search(texts, k)

    batcher = MicroBatcher(search, window_s=0.2, max_queries=64)
    try:
        futures = [batcher.submit([q], k) for q, k in zip(QUERIES, [1, 2, 3, 4, 5], strict=True)]
        results = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    assert calls == [len(QUERIES)]  # one batch for the five requests
    for q, k, (res,) in zip(QUERIES, [1, 2, 3, 4, 5], results, strict=True):
        (alone,) = engine.search([q], k)
        assert len(res.hits) == k and res.expert == alone.expert
        assert [d for d, _ in res.hits] == [d for d, _ in alone.hits]
        np.testing.assert_allclose([s for _, s in res.hits], [s for _, s in alone.hits], atol=1e-5)


def test_requests_queued_during_a_batch_form_the_next_one(engine):
    calls, running = [], threading.Event()

    def search(texts, k):
        calls.append(len(texts))
        if len(calls) == 1:
            running.wait(10)  # the first batch is busy while the others arrive
        return engine.search(texts, k)

    batcher = MicroBatcher(search)  # the default: no window, take what is queued
    try:
        first = batcher.submit(QUERIES[:1], 3)
        time.sleep(0.2)
        rest = [batcher.submit([q], 3) for q in QUERIES[1:]]
        running.set()
        assert len(first.result(timeout=30)) == 1
        assert [len(f.result(timeout=30)[0].hits) for f in rest] == [3] * 4
    finally:
        batcher.close()
    assert calls == [1, 4]


def test_a_failing_batch_fails_each_waiting_request():
    def boom(texts, k):
        raise RuntimeError("model crashed")

    batcher = MicroBatcher(boom, window_s=0.05)
    try:
        futures = [batcher.submit(["q"], 1) for _ in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="model crashed"):
                f.result(timeout=10)
    finally:
        batcher.close()


def test_two_model_workers_run_two_batches_at_once(engine):
    both_in = threading.Barrier(2, timeout=20)  # broken unless two batches overlap
    calls = []

    def search(texts, k):
        calls.append(len(texts))
        if len(calls) <= 2:
            both_in.wait()
        return engine.search(texts, k)

    batcher = MicroBatcher(search, workers=2)
    try:
        first = batcher.submit(QUERIES[:1], 3)
        time.sleep(0.2)  # the first worker holds its batch at the barrier meanwhile
        second = batcher.submit(QUERIES[1:2], 3)
        results = [first.result(timeout=60), second.result(timeout=60)]
    finally:
        batcher.close()
    assert not both_in.broken and calls[:2] == [1, 1]
    for q, (res,) in zip(QUERIES[:2], results, strict=True):
        (alone,) = engine.search([q], 3)
        assert [d for d, _ in res.hits] == [d for d, _ in alone.hits]


def test_closing_stops_every_worker_and_workers_must_be_positive():
    batcher = MicroBatcher(lambda texts, k: [], workers=3)
    threads = list(batcher._threads)
    batcher.close()
    assert len(threads) == 3 and not any(t.is_alive() for t in threads)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        MicroBatcher(lambda texts, k: [], workers=0)


def test_a_swap_of_the_experts_waits_for_running_batches_and_goes_before_new_ones():
    from routerretriever.serving import SharedLock

    lock, order = SharedLock(), []
    inside, release = threading.Event(), threading.Event()

    def batch(name: str, hold: bool) -> None:
        with lock.shared():
            order.append(f"{name} in")
            if hold:
                inside.set()
                release.wait(10)
            order.append(f"{name} out")

    def swap() -> None:
        with lock.exclusive():
            order.append("swap")

    running = threading.Thread(target=batch, args=("a", True))
    running.start()
    inside.wait(10)
    with lock.shared():  # shared holders overlap
        order.append("b in")
    swapping = threading.Thread(target=swap)
    swapping.start()
    time.sleep(0.2)  # the swap now waits for batch a
    late = threading.Thread(target=batch, args=("c", False))
    late.start()
    time.sleep(0.2)  # batch c arrived after the swap began to wait: it waits too
    assert order == ["a in", "b in"]
    release.set()
    for t in (running, swapping, late):
        t.join(10)
    assert order == ["a in", "b in", "a out", "swap", "c in", "c out"]


@pytest.mark.parametrize("workers", [1, 2])
def test_one_bad_query_fails_only_its_own_request(engine, workers):
    """A query the model cannot take (a lone surrogate) sharing a batch with other clients'."""
    batcher = MicroBatcher(engine.search, window_s=0.3, max_queries=64, workers=workers)
    try:
        good = [batcher.submit([q], 3) for q in QUERIES[:3]]
        bad = batcher.submit(["x \ud800"], 3)
        good += [batcher.submit([q], 3) for q in QUERIES[3:]]
        for f in good:
            assert len(f.result(timeout=60)[0].hits) == 3
        with pytest.raises(Exception):  # noqa: B017 - whatever the tokenizer raises
            bad.result(timeout=60)
    finally:
        batcher.close()


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        ('{"queries": ["x \\ud800"], "k": 3}', 400, "lone surrogate"),
        ('{"queries": ["ok"], "k": true}', 422, "valid integer"),
        ('{"queries": ["ok"], "k": 1e400}', 422, "valid integer"),
        ('{"queries": ["ok"], "k": NaN}', 422, ""),
        ('{"queries": ["ok"], "k": 2.0}', 422, "valid integer"),
        ('{"queries": [1, 2], "k": 3}', 422, "queries[0] must be a string, got int"),
    ],
)
def test_hostile_search_bodies_get_a_clear_4xx(client, content, status, needle):
    r = client.post("/search", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.text


def test_huge_bodies_are_refused_before_parsing_and_errors_never_echo_input(client):
    big = '{"queries": [' + ",".join(["1"] * 600_000) + '], "k": 3}'  # 1.2 MB
    start = time.perf_counter()
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and time.perf_counter() - start < 5
    assert "request body too large" in r.json()["detail"]
    many = '{"queries": [' + ",".join(["1"] * 50_000) + '], "k": 3}'  # under the cap
    r = client.post("/search", content=many, headers={"content-type": "application/json"})
    assert r.status_code == 413  # counted before any item is looked at
    assert r.json()["detail"] == "too many queries: 50000 > 4 per request"
    bad = '{"queries": "x", "k": [' + ",".join(['"y"'] * 50_000) + "]}"
    r = client.post("/search", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert len(r.content) < 2_000  # a few errors, no echo of the 50,000 inputs
    assert "input" not in r.text

    def chunks():
        for _ in range(40):
            yield b" " * 65_536

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413  # chunked: counted as it streams in


def test_hostile_expert_paths_are_refused_without_server_paths(client, engine, tmp_path):
    import os

    for path in ("a\0b", "x" * 100_000):
        r = client.post("/experts", json={"path": path})
        assert r.status_code == 400 and "at most 1024 characters" in r.json()["detail"]
    # A folder inside the store whose files link to files outside it.
    outside = tmp_path / "outside"
    shutil.copytree(engine.store / "beta", outside)
    (engine.store / "linked").mkdir()
    for f in outside.iterdir():
        os.symlink(f, engine.store / "linked" / f.name)
    r = client.post("/experts", json={"path": "linked"})
    assert r.status_code == 400 and "holds a link that leaves the store" in r.json()["detail"]
    # Truncated weights: 422, and no absolute server path in any answer.
    shutil.copytree(engine.store / "beta", engine.store / "torn")
    w = engine.store / "torn" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    r = client.post("/experts", json={"path": "torn"})
    assert r.status_code == 422 and "cannot be loaded" in r.json()["detail"]
    (engine.store / "torn" / "adapter_model.safetensors").unlink()
    r = client.post("/experts", json={"path": "torn"})
    assert r.status_code == 422
    assert str(engine.store) not in r.text and str(tmp_path) not in r.text
    assert engine.experts == ["alpha"]
    assert client.post("/search", json={"queries": ["ok"], "k": 2}).status_code == 200


def test_api_key_guards_every_endpoint_but_health(engine):
    import hmac

    with TestClient(create_app(engine, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert c.post("/search", json={"queries": ["ok"]}, headers=headers).status_code == 401
            assert c.get("/experts", headers=headers).status_code == 401
            assert c.delete("/experts/alpha", headers=headers).status_code == 401
        assert c.get("/health").status_code == 200
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/search", json={"queries": ["ok"]}, headers=ok).status_code == 200
        assert c.get("/experts", headers=ok).json()["experts"][0]["name"] == "alpha"
    with TestClient(create_app(engine, admin=False)) as c:
        assert c.post("/search", json={"queries": ["ok"]}).status_code == 200
        r = c.post("/experts", json={"path": "beta"})
        assert r.status_code == 403 and "--api-key" in r.json()["detail"]
        assert c.delete("/experts/alpha").status_code == 403
    assert engine.experts == ["alpha"]
    # The comparison is hmac.compare_digest, which takes the same time wherever the strings
    # first differ; the app must use it (a plain == leaks the matching prefix's length).
    import inspect

    from routerretriever import service

    assert "hmac.compare_digest" in inspect.getsource(service.create_app)
    assert hmac.compare_digest(b"Bearer s3cret", b"Bearer s3cret")


def test_a_damaged_score_cache_is_recomputed(svc_encoder, store_src, tmp_path):
    store, cache = tmp_path / "store", tmp_path / "cache"
    shutil.copytree(store_src, store)
    corpus = load_beir(TINY).corpus
    first = Engine.open(svc_encoder, store, corpus, DOMAINS, experts=["alpha"], cache_dir=cache)
    want = first.search(QUERIES, 3)
    for name in svc_encoder.experts:
        svc_encoder.remove_adapter(name)
    for f in (cache / "scores").glob("*.npz"):
        f.write_bytes(f.read_bytes()[:50])
    again = Engine.open(svc_encoder, store, corpus, DOMAINS, cache_dir=cache)
    try:
        assert [r.hits for r in again.search(QUERIES, 3)] == [r.hits for r in want]
    finally:
        for name in svc_encoder.experts:
            svc_encoder.remove_adapter(name)


@pytest.mark.slow
def test_search_answers_equal_with_faiss_and_milvus_lite(engine, tmp_path):
    pytest.importorskip("milvus_lite")
    from routerretriever.index import MilvusIndex
    from routerretriever.store import embed_corpus

    emb = embed_corpus(engine.encoder, load_beir(TINY).corpus, cache_dir=engine.cache_dir)
    engine.add_expert("beta")
    with_faiss = engine.search(QUERIES, 10)
    engine.index = MilvusIndex.from_embeddings(str(tmp_path / "m.db"), emb.ids, emb.embeddings)
    with_milvus = engine.search(QUERIES, 10)
    assert len(engine.index) == len(emb.ids)
    for f, m in zip(with_faiss, with_milvus, strict=True):
        assert m.expert == f.expert and [d for d, _ in m.hits] == [d for d, _ in f.hits]
        np.testing.assert_allclose([s for _, s in m.hits], [s for _, s in f.hits], atol=1e-5)
    with pytest.raises(ValueError, match=f"has vector dim {engine.encoder.dim}, not 8"):
        MilvusIndex(str(tmp_path / "m.db"), 8)


@pytest.mark.slow
def test_a_milvus_collection_of_the_same_corpus_is_reused(encoder, tmp_path):
    pytest.importorskip("milvus_lite")
    from routerretriever.indexes import corpus_index

    corpus = load_beir(TINY).corpus
    calls = []

    def embedder(c):
        calls.append(len(c))
        return encoder.encode([d.full_text for d in c.values()])

    uri = str(tmp_path / "m.db")
    q = encoder.encode(QUERIES)
    first = corpus_index(
        encoder,
        corpus,
        backend="milvus",
        milvus_uri=uri,
        cache_dir=tmp_path / "a",
        embedder=embedder,
    )
    again = corpus_index(
        encoder,
        corpus,
        backend="milvus",
        milvus_uri=uri,
        cache_dir=tmp_path / "b",
        embedder=embedder,
    )
    assert calls == [len(corpus)]  # the second start embedded and inserted nothing
    assert again.search(q, 5) == first.search(q, 5)
    smaller = dict(list(corpus.items())[:10])  # another corpus: its own collection
    other = corpus_index(
        encoder, smaller, backend="milvus", milvus_uri=uri, cache_dir=tmp_path / "c"
    )
    assert len(other) == 10 and len(again) == len(corpus)
    with pytest.raises(ValueError, match="'faiss' or 'milvus' with a URI"):
        corpus_index(encoder, corpus, backend="milvus")


@pytest.mark.slow
def test_ray_and_single_process_embeddings_agree(encoder, tmp_path):
    pytest.importorskip("ray")
    import ray

    from routerretriever.distributed import encode_corpus_ray, ray_embedder
    from routerretriever.store import embed_corpus

    corpus = load_beir(TINY).corpus
    with pytest.raises(RuntimeError, match=r"call ray.init\(\) first"):  # never started for you
        encode_corpus_ray(encoder, corpus, actors=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ids, emb = encode_corpus_ray(encoder, corpus, actors=2, rows_per_task=8)
        # Through the corpus cache: Ray fills it, the single-process path then reads it.
        first = embed_corpus(
            encoder, corpus, cache_dir=tmp_path, embedder=ray_embedder(encoder, actors=1)
        )
    finally:
        ray.shutdown()
    assert ids == list(corpus)
    want = encoder.encode([corpus[d].full_text for d in ids])
    np.testing.assert_allclose(emb, want, atol=1e-5)
    again = embed_corpus(encoder, corpus, cache_dir=tmp_path)
    assert not first.cached and again.cached
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    np.testing.assert_allclose(first.embeddings, want, atol=1e-5)


# -- a real server on loopback -------------------------------------------------------------------


def start_server(store: Path, cache: Path, extra_env: dict | None = None, *args: str, log=None):
    from benchmarks.service_load import start_server as start

    serve = ["--store", str(store), "--corpus", str(TINY), "--domain", f"tiny={TINY}:corpus"]
    serve += ["--cache-dir", str(cache), "--routing-precision", "float32"]
    serve += ["--model", str(tiny_model_path()), *args]
    return start(serve, extra_env, timeout=120, log=log)


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_load_with_live_expert_changes_on_loopback_has_no_errors(store_src, tmp_path, workers):
    import httpx

    from benchmarks.service_load import run_load

    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    log = (tmp_path / "server.log").open("w+")
    proc, url = start_server(
        store, tmp_path / "cache", None, "--expert", "alpha", "--model-workers", workers, log=log
    )
    stats: dict = {}
    try:
        load = threading.Thread(
            target=lambda: stats.update(run_load(url, QUERIES, clients=8, seconds=4.0, k=5))
        )
        load.start()
        time.sleep(0.5)  # the experts change while 8 clients search
        assert httpx.post(url + "/experts", json={"path": "beta"}, timeout=60).status_code == 201
        assert httpx.delete(url + "/experts/alpha", timeout=60).status_code == 200
        load.join()
        after = httpx.post(url + "/search", json={"queries": QUERIES[:2], "k": 3}).json()
    finally:
        stop(proc)
    assert stats["errors"] == 0, stats
    assert stats["requests"] >= 8 and stats["p99_ms"] >= stats["p50_ms"] > 0
    assert {r["expert"] for r in after["results"]} == {"beta"}
    # serve logs one line per request by default (method, path, status), and no traceback.
    log.seek(0)
    text = log.read()
    assert '"POST /search HTTP/1.1" 200' in text and '"DELETE /experts/alpha HTTP/1.1" 200' in text
    assert "Traceback" not in text


def start_slow_add_server(store: Path, cache: Path):
    import httpx

    from benchmarks.service_load import _free_port

    port = _free_port()
    script = Path(__file__).with_name("slow_add_server.py")
    args = [str(store), str(TINY), str(cache), str(port), str(tiny_model_path())]
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the slow-add server did not start")


@pytest.mark.slow
def test_killed_while_adding_an_expert_restarts_consistent(store_src, tmp_path):
    import httpx

    store, cache = tmp_path / "store", tmp_path / "cache"
    shutil.copytree(store_src, store)
    proc, url = start_slow_add_server(store, cache)  # an add waits a minute before it commits
    scores = list((cache / "scores").glob("*.npz"))

    def add_beta() -> None:
        try:
            httpx.post(url + "/experts", json={"path": "beta"}, timeout=120)
        except httpx.HTTPError:  # the server is killed before it answers
            pass

    adding = threading.Thread(target=add_beta, daemon=True)
    adding.start()
    deadline = time.time() + 60  # wait until beta has been scored: the add is under way
    while len(list((cache / "scores").glob("*.npz"))) == len(scores) and time.time() < deadline:
        time.sleep(0.2)
    assert len(list((cache / "scores").glob("*.npz"))) > len(scores)
    assert httpx.get(url + "/experts").json()["experts"][0]["name"] == "alpha"
    proc.kill()  # SIGKILL in the middle of the add
    proc.wait()

    assert json.loads((store / SERVED).read_text()) == {"experts": {"alpha": "alpha"}}
    proc, url = start_server(store, cache)
    try:
        assert [e["name"] for e in httpx.get(url + "/experts").json()["experts"]] == ["alpha"]
        r = httpx.post(url + "/search", json={"queries": QUERIES[:2], "k": 3})
        assert r.status_code == 200 and {x["expert"] for x in r.json()["results"]} == {"alpha"}
        r = httpx.post(url + "/experts", json={"path": "beta"}, timeout=120)  # now it completes
        assert r.status_code == 201
        assert json.loads((store / SERVED).read_text())["experts"] == {
            "alpha": "alpha",
            "beta": "beta",
        }
    finally:
        stop(proc)
    assert not [p for p in store.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def fuzz_schema(engine):
    import schemathesis

    return schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(engine, limits=Limits(4, 200, 20))
    )


schema = pytest.importorskip("schemathesis").pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@pytest.mark.filterwarnings("ignore")
def test_generated_requests_never_get_a_server_error(case):
    """Schema-driven fuzzing of every endpoint: any request answers 2xx or 4xx, never 5xx."""
    from schemathesis.checks import not_a_server_error

    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text[:200])
    case.validate_response(response, checks=[not_a_server_error])


def test_prometheus_scrape_counts_requests_routes_batches_and_changes(client, engine):
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(2):
        assert client.post("/search", json={"queries": QUERIES[:3], "k": 2}).status_code == 200
    assert client.post("/search", json={"queries": [], "k": 2}).status_code == 400
    assert client.post("/experts", json={"path": "beta"}).status_code == 201
    assert client.post("/experts", json={"path": "beta"}).status_code == 409
    assert client.delete("/experts/beta").status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    ok = {"endpoint": "/search", "method": "POST"}
    assert value("routerretriever_requests_total", **ok, status="200") == 2
    assert value("routerretriever_requests_total", **ok, status="400") == 1
    assert value("routerretriever_request_seconds_count", **ok) == 3
    assert value("routerretriever_queries_routed_total", expert="alpha") == 6
    assert value("routerretriever_batch_queries_count") == 2
    assert value("routerretriever_batch_queries_sum") == 6
    assert value("routerretriever_batch_seconds_count") == 2
    assert (
        0
        < value("routerretriever_batch_seconds_sum")
        < value("routerretriever_request_seconds_sum", **ok)
    )  # the model's time is part of the requests' time
    assert value("routerretriever_queue_depth") == 0
    assert value("routerretriever_expert_changes_total", action="add", outcome="ok") == 1
    assert value("routerretriever_expert_changes_total", action="add", outcome="409") == 1
    assert value("routerretriever_expert_changes_total", action="remove", outcome="ok") == 1
    assert value("routerretriever_expert_change_seconds_count", action="add") == 2
    endpoints = {
        dict(k[1]).get("endpoint") for k in samples if k[0] == "routerretriever_requests_total"
    }
    assert endpoints <= {"/search", "/experts", "/experts/{name}", "/metrics", "other"}


@pytest.fixture
def live_url(engine):
    """The app over ``engine`` served by uvicorn on a free loopback port, in a thread."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_official_openai_client_gets_routed_base_and_expert_embeddings(engine, live_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["auto", "base", "alpha"]
    texts = QUERIES[:3]
    routed = client.embeddings.create(model="auto", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in routed.data])
    want, decisions = engine._router.route_and_encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert routed.usage.prompt_tokens == sum(len(t) for t in engine.encoder.tokenize(texts))
    extra = routed.model_extra["routing"]
    assert [r["expert"] for r in extra] == [d.expert for d in decisions]
    as_floats = client.embeddings.create(model="auto", input=texts, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in as_floats.data], want, atol=1e-6)
    base = client.embeddings.create(model="base", input=texts[0])
    np.testing.assert_allclose(
        base.data[0].embedding, engine.encoder.encode(texts[:1])[0], atol=1e-6
    )
    expert = client.embeddings.create(model="alpha", input=texts[:1])
    np.testing.assert_allclose(
        expert.data[0].embedding, engine.encoder.encode(texts[:1], experts="alpha")[0], atol=1e-6
    )
    assert not np.allclose(expert.data[0].embedding, base.data[0].embedding)
    # Documents always get the base model, whatever model is named: the index holds those.
    doc = client.embeddings.create(
        model="alpha", input=texts[:1], extra_body={"input_type": "document"}
    )
    # (embedded by the engine's corpus runtime: bfloat16 where native, ~1e-5 from float32)
    np.testing.assert_allclose(doc.data[0].embedding, base.data[0].embedding, atol=1e-4)
    gap = np.abs(np.subtract(expert.data[0].embedding, base.data[0].embedding)).max()
    assert gap > 1e-3  # so the tolerance above still tells the expert from the base
    with pytest.raises(openai.NotFoundError, match="unknown model 'gamma'"):
        client.embeddings.create(model="gamma", input="x")
    with pytest.raises(openai.BadRequestError, match=f"dimensions must be {engine.encoder.dim}"):
        client.embeddings.create(model="auto", input="x", dimensions=12)


def test_documents_are_embedded_by_the_runtime_the_index_was_built_with(
    svc_encoder, store_src, tmp_path
):
    from routerretriever.runtime import BFLOAT16

    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    corpus = load_beir(TINY).corpus
    texts = [d.full_text for d in list(corpus.values())[:3]]
    got = {}
    for runtime in ("torch", "bfloat16"):
        engine = Engine.open(svc_encoder, store, corpus, cache_dir=tmp_path / "c", runtime=runtime)
        got[runtime] = engine.embed(texts, input_type="document")[0]
    np.testing.assert_allclose(got["torch"], svc_encoder.encode(texts), atol=1e-6)
    np.testing.assert_allclose(got["bfloat16"], BFLOAT16.encode(svc_encoder, texts), atol=1e-6)
    assert not np.allclose(got["torch"], got["bfloat16"], atol=1e-7)
    files = [p.name for p in (tmp_path / "c" / "corpus").iterdir()]
    assert len(files) == 2 and sum(f.endswith("-bfloat16.npz") for f in files) == 1
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnx, bfloat16"):
        Engine(svc_encoder, store, engine.index, runtime="fp8")  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_thousand_half_open_connections_do_not_stall_a_good_client(store_src, tmp_path):
    """1,000 clients that send half a request head and stop: a well-behaved client is still
    answered within 2 s, and the stalled connections are closed by the header timeout."""
    import resource
    import socket

    import httpx

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    proc, url = start_server(store, tmp_path / "cache", None, "--header-timeout", "3")
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    try:
        for _ in range(1000):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-")  # and never more
            sockets.append(s)
        start = time.perf_counter()
        r = httpx.post(url + "/search", json={"queries": ["wing flutter"], "k": 3}, timeout=2)
        elapsed = time.perf_counter() - start
        assert r.status_code == 200 and elapsed < 2.0, elapsed
        time.sleep(4)  # past the header timeout: the server has closed them
        closed = 0
        for s in sockets:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(sockets)
    finally:
        for s in sockets:
            s.close()
        stop(proc)


@pytest.mark.slow
def test_two_ray_serve_replicas_follow_one_served_set(store_src, tmp_path):
    """`serve --replicas 2`: both replicas answer, and an expert added or removed through one
    reaches the other (the store's served set is the one source of truth)."""
    pytest.importorskip("ray.serve")
    import httpx

    from benchmarks.service_load import start_server as start

    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    serve = ["--store", str(store), "--corpus", str(TINY), "--domain", f"tiny={TINY}:corpus"]
    serve += ["--cache-dir", str(tmp_path / "cache"), "--expert", "alpha", "--replicas", "2"]
    serve += ["--model", str(tiny_model_path())]
    log = (tmp_path / "server.log").open("w+")
    proc, url = start(serve, None, timeout=600, log=log)

    def replicas_seen(want: list[str], tries: int = 200) -> dict[int, list[str]]:
        seen: dict[int, list[str]] = {}
        for _ in range(tries):
            h = httpx.get(url + "/health", timeout=30).json()
            seen[h["process"]] = h["experts"]
            if len(seen) == 2 and all(v == want for v in seen.values()):
                break
            time.sleep(0.1)
        return seen

    try:
        before = replicas_seen(["alpha"])
        assert len(before) == 2 and all(v == ["alpha"] for v in before.values()), before
        r = httpx.post(url + "/experts", json={"path": "beta"}, timeout=300)
        assert r.status_code == 201, r.text
        after = replicas_seen(["alpha", "beta"])
        assert set(after) == set(before) and all(v == ["alpha", "beta"] for v in after.values())
        r = httpx.post(url + "/search", json={"queries": QUERIES, "k": 3}, timeout=60)
        assert r.status_code == 200 and {x["expert"] for x in r.json()["results"]} <= {
            "alpha",
            "beta",
        }
        assert httpx.delete(url + "/experts/alpha", timeout=300).status_code == 200
        gone = replicas_seen(["beta"])
        assert all(v == ["beta"] for v in gone.values()), gone
        assert json.loads((store / SERVED).read_text())["experts"] == {"beta": "beta"}
    finally:
        stop(proc)
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
    # Ray stays quiet: no actor log lines forwarded to the terminal, no tracebacks.
    log.seek(0)
    lines = log.read().splitlines()
    assert not [x for x in lines if x.startswith(("(Serve", "(Proxy", "(raylet"))], lines[:20]
    assert not [x for x in lines if "Traceback" in x], lines[:40]


# -- the lexical member in the service --------------------------------------------------------


@pytest.mark.parametrize("how", ["minmax", "max", "zscore"])
def test_fused_search_mixes_base_into_the_routed_expert_and_fuses_bm25(
    svc_encoder, store_src, tmp_path, how
):
    from routerretriever.fusion import fuse_scores
    from routerretriever.lexical import BM25Index

    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    corpus = load_beir(TINY).corpus
    engine = Engine.open(
        svc_encoder,
        store,
        corpus,
        DOMAINS,
        experts=["alpha", "beta"],
        cache_dir=tmp_path / "cache",
        routing_precision="float32",
        alpha=0.6,
        base_mix=0.3,
        normalise=how,
    )
    try:
        got = engine.search(QUERIES, 10)
        bm25 = BM25Index.build(corpus)
        for q, r in zip(QUERIES, got, strict=True):
            assert r.lexical_weight == pytest.approx(0.4)
            assert r.members == {r.expert: pytest.approx(0.7), "__base__": pytest.approx(0.3)}
            mixed = 0.7 * svc_encoder.encode([q], experts=r.expert) + 0.3 * svc_encoder.encode([q])
            dense = engine.index.search(mixed, 100)[0]
            docs = engine.index._index.reconstruct_n(0, len(engine.index))  # every document
            cos, lex = (mixed @ docs.T)[0].astype(np.float64), bm25.scores(q)
            moments = ((cos.mean(), cos.std()), (lex.mean(), lex.std()))  # scored one by one
            want = fuse_scores(dense, bm25.search([q], 100)[0], 0.6, 10, how, moments)
            assert [d for d, _ in r.hits] == [d for d, _ in want]
            tol = 1e-4 if how == "zscore" else 1e-5  # z: float32 cosines over a small deviation
            np.testing.assert_allclose([s for _, s in r.hits], [s for _, s in want], atol=tol)
    finally:
        for name in svc_encoder.experts:
            svc_encoder.remove_adapter(name)
    with pytest.raises(ValueError, match="give a lexical index"):
        Engine(svc_encoder, store, engine.index, alpha=0.5)
    with pytest.raises(ValueError, match="normalise must be one of"):
        Engine(svc_encoder, store, engine.index, normalise="z")  # type: ignore[arg-type]


def test_a_declined_expert_routes_its_queries_to_the_base_model(svc_encoder, store_src, tmp_path):
    """``decline`` (serve --decline) is the experiment's gate in the service: a query routed to a
    declined expert gets the base model's ranking, the others are untouched."""
    from routerretriever.encoder import BASE

    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    corpus = load_beir(TINY).corpus
    common = dict(
        experts=["alpha", "beta"], cache_dir=tmp_path / "cache", routing_precision="float32"
    )
    plain = Engine.open(svc_encoder, store, corpus, DOMAINS, **common)
    before = plain.search(QUERIES, 5)
    for name in svc_encoder.experts:  # one encoder: the next engine loads them again
        svc_encoder.remove_adapter(name)
    gated = Engine.open(
        svc_encoder, store, corpus, DOMAINS, index=plain.index, decline=["alpha", "gamma"], **common
    )
    try:
        after = gated.search(QUERIES, 5)
        routed = [r.expert for r in before]
        assert {"alpha", "beta"} <= set(routed)  # both cases below happen
        for q, b, a in zip(QUERIES, before, after, strict=True):
            if b.expert == "alpha":
                assert a.members == {BASE: 1.0}
                want = plain.index.search(svc_encoder.encode([q]), 5)[0]
                assert [d for d, _ in a.hits] == [d for d, _ in want]
            else:  # the same ranking (scores to float32 noise: the batches differ)
                assert a.members == b.members and [d for d, _ in a.hits] == [d for d, _ in b.hits]
                np.testing.assert_allclose(
                    [x for _, x in a.hits], [x for _, x in b.hits], atol=1e-5
                )
        shown = {e["name"]: e["declined"] for e in gated.describe()}
        assert shown == {"alpha": True, "beta": False}  # gamma waits until it is served
    finally:
        for name in svc_encoder.experts:
            svc_encoder.remove_adapter(name)
    with pytest.raises(ValueError, match="invalid expert name '../x'"):
        Engine(svc_encoder, store, plain.index, decline=["../x"])


@pytest.mark.slow
def test_milvus_full_text_search_serves_the_lexical_side(encoder, tmp_path):
    pytest.importorskip("milvus_lite")
    from routerretriever.index import MilvusIndex
    from routerretriever.indexes import corpus_index, lexical_index
    from routerretriever.lexical import BM25Config, BM25Index

    corpus = load_beir(TINY).corpus
    uri = str(tmp_path / "m.db")
    # Unstemmed, so that Milvus Lite (which ignores the stemmer filter) and a server agree.
    config = BM25Config(stemmer=None)
    index = corpus_index(
        encoder, corpus, backend="milvus", milvus_uri=uri, cache_dir=tmp_path, bm25=config
    )
    assert isinstance(index, MilvusIndex) and index.text
    milvus = lexical_index(index, corpus, config)
    local = BM25Index.build(corpus, config)
    for q in [*QUERIES, "the cancer at risk"]:
        m, b = milvus.search([q], 10)[0], local.search([q], 10)[0]
        assert [d for d, _ in m] == [d for d, _ in b]  # bm25s's Lucene BM25 ranks the same
        # and scores alike up to Lucene 8's dropped constant (k1 + 1), which min-max fusion
        # ignores (within 2%: Milvus keeps document lengths approximately).
        np.testing.assert_allclose([s for _, s in m], [2.5 * s for _, s in b], rtol=2e-2)
    assert milvus.search(["zzqx unknownword"], 5) == [[]]  # lexically silent, as bm25s
    # A dense-only collection of this corpus is not mistaken for one with text.
    with pytest.raises(ValueError, match="no full-text"):
        MilvusIndex(uri, encoder.dim, collection=index.collection + "_x").lexical()
    # Feedback needs weighted words, which Milvus's full-text search does not take: refused
    # before any collection is made, and by the existing collection too.
    feedback = BM25Config(stemmer=None, feedback_docs=3)
    with pytest.raises(ValueError, match="feedback .* needs the bm25s index"):
        corpus_index(encoder, corpus, backend="milvus", milvus_uri=uri + "x", bm25=feedback)
    assert not Path(uri + "x").exists()
    with pytest.raises(ValueError, match="feedback .* needs the bm25s index"):
        lexical_index(index, corpus, feedback)


def test_the_server_parses_http_with_httptools_and_keeps_the_header_guard():
    """httptools (C) parses requests where installed: pure-Python h11's parsing held the GIL
    long enough to slow the model thread under load (docs/results.md, "The server against the
    same engine offline")."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from routerretriever.service import guarded_http_protocol

    proto = guarded_http_protocol(3.0)
    assert issubclass(proto, HttpToolsProtocol)
    assert "_head_overdue" in vars(proto)  # the half-open connection guard is still there


@pytest.mark.parametrize("here", [True, False])
def test_a_saved_scope_declines_on_the_served_corpus_what_it_keeps_only_elsewhere(
    svc_encoder, store_src, tmp_path, here
):
    from routerretriever.corpora import CorpusScope, CorpusSketch
    from routerretriever.data import Document
    from routerretriever.encoder import BASE

    corpus = load_beir(TINY).corpus
    sketch = CorpusSketch.of(corpus if here else {"x": Document("another corpus")})
    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    engine = Engine.open(
        svc_encoder,
        store,
        corpus,
        DOMAINS,
        experts=["alpha"],
        cache_dir=tmp_path / "c",
        routing_precision="float32",
        alpha=0.8,
        base_alpha=0.4,
        scope=CorpusScope({"c": sketch}, {"alpha": ("c",)}),
    )
    try:
        with TestClient(create_app(engine, limits=Limits(4, 200, 20))) as c:
            (info,) = c.get("/experts").json()["experts"]
            assert info["declined"] is not here
            r = c.post("/search", json={"queries": ["protein folding", "solar wind"], "k": 3})
            assert r.status_code == 200
            for res in r.json()["results"]:
                if here:
                    assert res["expert"] == "alpha" and res["lexical_weight"] == pytest.approx(0.2)
                else:  # base + BM25 at the saved router's base_alpha
                    assert res["members"] == {BASE: 1.0}
                    assert res["lexical_weight"] == pytest.approx(0.6)
    finally:
        for name in svc_encoder.experts:
            svc_encoder.remove_adapter(name)
