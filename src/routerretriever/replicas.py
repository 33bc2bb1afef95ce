"""The service past one process: N replicas of the engine behind Ray Serve's HTTP proxy.

Each replica is a whole engine (base model, index, experts, pilot library) serving the same app
as ``routerretriever serve``. The store's ``.served.json`` is the one source of truth for the
served set: an expert added or removed through any replica is written there (under a lock on the
store, starting from the latest set), and every replica follows it within ``sync_seconds``. The
crash guarantees are the store's own: a replica killed mid-add leaves the set as it was.

On a cluster: every node needs this package, the base model and the store (a shared file
system), and the index should be a Milvus server all replicas share (``index="milvus"``,
``milvus_uri="http://host:19530"``). Connect with ``address="auto"`` from a cluster node.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from routerretriever.corpora import CorpusScope
    from routerretriever.fusion import Normalisation
    from routerretriever.lexical import BM25Config
    from routerretriever.retriever import RoutingPrecision
    from routerretriever.router import Rule
    from routerretriever.runtime import Backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSpec:
    """Everything a replica needs to build its engine and app (sent to each replica)."""

    store: Path
    corpus: Path
    domains: list[str] = field(default_factory=list)  # NAME=DIR[:SPLIT]
    model: str | None = None
    index: str = "faiss"
    milvus_uri: str | None = None
    cache_dir: Path | None = None
    rule: Rule = "weighted"
    routing_precision: RoutingPrecision = "auto"
    alpha: float = 1.0
    base_mix: float = 0.0
    normalise: Normalisation = "minmax"
    decline: list[str] = field(default_factory=list)
    base_alpha: float | None = None  # a saved router's dense weight for base-only queries
    scope: CorpusScope | None = None  # a saved router's corpora per expert
    runtime: Backend = "auto"  # what embeds the documents
    bm25: BM25Config | None = None  # None: the defaults
    limits: tuple[int, int, int] = (64, 2000, 100)  # queries, characters, k
    batch_window_ms: float = 0.0
    max_batch_queries: int = 256
    api_key: str | None = None
    admin: bool = True
    max_body_bytes: int = 1 << 20
    sync_seconds: float = 1.0


def build_app(spec: ServeSpec) -> Any:
    """One replica's app: its engine serving the store's saved set, kept in sync with it."""
    from routerretriever.batching import Limits
    from routerretriever.data import load_corpus
    from routerretriever.encoder import Encoder
    from routerretriever.indexes import corpus_index
    from routerretriever.instances import Domain
    from routerretriever.lexical import BM25Config
    from routerretriever.service import create_app
    from routerretriever.serving import Engine

    encoder = Encoder.load(spec.model, device="cpu")  # a replica asks Ray for no GPU
    corpus = load_corpus(spec.corpus)
    index = corpus_index(
        encoder,
        corpus,
        backend=spec.index,
        milvus_uri=spec.milvus_uri,
        cache_dir=spec.cache_dir,
        bm25=(spec.bm25 or BM25Config()) if spec.alpha < 1 else None,
        runtime=spec.runtime,
    )
    engine = Engine.open(
        encoder,
        spec.store,
        corpus,
        [Domain.parse(d) for d in spec.domains],
        index=index,
        rule=spec.rule,
        routing_precision=spec.routing_precision,
        cache_dir=spec.cache_dir,
        alpha=spec.alpha,
        base_mix=spec.base_mix,
        normalise=spec.normalise,
        decline=spec.decline,
        base_alpha=spec.base_alpha,
        scope=spec.scope,
        runtime=spec.runtime,
        bm25=spec.bm25,
    )

    def follow() -> None:
        while True:
            time.sleep(spec.sync_seconds)
            try:
                engine.sync()
            except Exception as e:  # keep serving the last good set; say why
                logger.warning("replica %d cannot sync with the store: %s", os.getpid(), e)

    threading.Thread(target=follow, name="store-sync", daemon=True).start()
    return create_app(
        engine,
        limits=Limits(*spec.limits),
        batch_window_ms=spec.batch_window_ms,
        max_batch_queries=spec.max_batch_queries,
        api_key=spec.api_key,
        admin=spec.admin,
        max_body_bytes=spec.max_body_bytes,
    )


def save_served(store: Path, experts: list[str]) -> None:
    """Record ``experts`` (folders in the store) as the served set, before replicas start."""
    from routerretriever.experts import ExpertInfo
    from routerretriever.files import atomic_write
    from routerretriever.serving import SERVED

    served = {ExpertInfo.read(store / p).name: p for p in experts}
    atomic_write(
        store / SERVED, lambda tmp: tmp.write_text(json.dumps({"experts": served}, indent=2))
    )


def run(
    spec: ServeSpec,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    blocking: bool = True,
) -> None:
    """Serve ``replicas`` replicas behind Ray Serve's proxy at ``host:port`` (local Ray, or the
    cluster at ``address``)."""
    import ray
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    # A busy or small machine starts Serve's proxy slower than its 5 s readiness check allows.
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, "60")
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    serve.start(http_options={"host": host, "port": port})

    @serve.deployment(
        name="routerretriever",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": 0},  # the model uses the cores; do not reserve them
        health_check_timeout_s=600,
    )
    @serve.ingress()
    class Replica:
        def __init__(self, spec: ServeSpec) -> None:
            self.spec = spec

        def __serve_build_asgi_app__(self) -> Any:
            return build_app(self.spec)

    serve.run(cast(Any, Replica).bind(spec), blocking=blocking, route_prefix="/")
