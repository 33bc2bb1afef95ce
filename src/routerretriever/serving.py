"""What the HTTP service serves: a thread-safe search engine with live expert add/remove, and a
micro-batcher that merges concurrent requests into one routed batch.

The engine holds the shared corpus index, the base encoder with the served experts, and the pilot
library built from each configured domain's instances (Algorithm 1). Adding an expert scores only
what it changes (the new expert on every domain's instances; per-(expert, domain) scores are
cached on disk) and regroups; removing one regroups with no scoring. Neither trains anything.

The served experts are recorded in ``STORE/.served.json``, written atomically only once a new
library is complete: a server killed in the middle of an add restarts with the expert either
fully served or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from routerretriever.data import Corpus
from routerretriever.encoder import BASE, Encoder
from routerretriever.errors import ModelError, RouterRetrieverError
from routerretriever.experts import ExpertInfo, check_folder, check_name
from routerretriever.files import atomic_write, default_cache_dir
from routerretriever.fusion import fuse_scores
from routerretriever.index import FaissIndex, Hits, VectorIndex
from routerretriever.lexical import BM25Config, BM25Index, LexicalIndex
from routerretriever.pilots import DomainInstances, PilotLibrary, build_pilots
from routerretriever.policy import PilotPolicy
from routerretriever.retriever import (
    FUSION_DEPTH,
    RouterRetriever,
    RoutingPrecision,
    per_query_ndcg,
)
from routerretriever.router import RouteDecision, Rule
from routerretriever.store import embed_corpus

logger = logging.getLogger(__name__)

SERVED = ".served.json"  # the served experts, in the store folder
MAX_PATH_CHARS = 1024  # an expert path longer than this is refused before touching the disk
#: Testing hook: seconds an add waits after scoring, before it commits (to kill it there).
_ADD_DELAY_ENV = "ROUTERRETRIEVER_TEST_ADD_DELAY"


class RequestError(RouterRetrieverError):
    """A request the engine refuses; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Per-request limits; requests beyond them are refused with a clear message."""

    max_queries: int = 64
    max_query_chars: int = 2000
    max_k: int = 100

    def check(self, queries: Sequence[str], k: int) -> None:
        if not queries:
            raise RequestError("queries must hold at least one query")
        if len(queries) > self.max_queries:
            raise RequestError(
                f"too many queries: {len(queries)} > {self.max_queries} per request", 413
            )
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise RequestError(f"queries[{i}] must be a string, got {type(q).__name__}", 422)
            if not q.strip():
                raise RequestError(f"queries[{i}] is empty")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    f"queries[{i}] is not valid text: it holds a lone surrogate"
                ) from None
            if len(q) > self.max_query_chars:
                raise RequestError(
                    f"queries[{i}] is too long: {len(q)} > {self.max_query_chars} characters", 413
                )
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k must be between 1 and {self.max_k}, got {k}")


@dataclass(frozen=True)
class DomainSource:
    """Where a domain's pilot instances come from: a BEIR folder's labelled ``split``, or
    pseudo-queries of its corpus (``split="corpus"``), judged against that folder's corpus."""

    name: str
    path: Path
    split: str = "train"

    @classmethod
    def parse(cls, spec: str) -> DomainSource:
        """``NAME=DIR`` or ``NAME=DIR:SPLIT`` (SPLIT a qrels split name, or ``corpus``)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"domain {spec!r}: expected NAME=DIR or NAME=DIR:SPLIT")
        path, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "train")
        return cls(name, Path(path), split or "train")


@dataclass
class SearchResult:
    """One query's hits, best first, and why it went where it went."""

    hits: Hits
    expert: str
    scores: dict[str, float] = field(default_factory=dict)
    members: dict[str, float] = field(default_factory=dict)
    lexical_weight: float = 0.0


@dataclass
class _Domain:
    source: DomainSource
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    fingerprint: str
    index: FaissIndex


def _digest_files(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()[:16]


def corpus_index(
    encoder: Encoder,
    corpus: Corpus,
    *,
    backend: str = "faiss",
    milvus_uri: str | None = None,
    cache_dir: str | Path | None = None,
    embedder: Callable[[Corpus], np.ndarray] | None = None,
    batch_size: int = 32,
    bm25: BM25Config | None = None,
) -> VectorIndex:
    """The shared index of ``corpus``'s base-model embeddings: FAISS in process, or Milvus.

    A Milvus collection is named after the base model and the corpus fingerprints, so a restart
    against a Milvus that already holds this corpus reuses it instead of inserting it again; a
    collection left incomplete (e.g. by a killed start) is rebuilt. With ``bm25`` a Milvus
    collection also holds the texts and Milvus's own BM25 full-text index (see
    :func:`lexical_index`); FAISS ignores it.
    """
    from routerretriever.index import MilvusIndex, milvus_analyzer
    from routerretriever.store import corpus_fingerprint

    def embeddings() -> tuple[list[str], np.ndarray]:
        emb = embed_corpus(
            encoder, corpus, cache_dir=cache_dir, batch_size=batch_size, embedder=embedder
        )
        return emb.ids, emb.embeddings

    if backend == "faiss":
        return FaissIndex.from_embeddings(*embeddings())
    if backend != "milvus" or not milvus_uri:
        raise ValueError(f"index backend must be 'faiss' or 'milvus' with a URI, got {backend!r}")
    name = f"rr_{encoder.fingerprint}_{corpus_fingerprint(corpus)}"
    text: dict[str, Any] = {}
    if bm25 is not None:
        name += f"_bm25_{bm25.fingerprint}"
        text = {
            "text": True,
            "k1": bm25.k1,
            "b": bm25.b,
            "analyzer": milvus_analyzer(bm25.stemmer, bm25.stopwords),
        }
    index = MilvusIndex(milvus_uri, encoder.dim, collection=name, **text)
    if len(index) == len(corpus):
        logger.info("re-using Milvus collection %s (%d documents)", name, len(corpus))
        return index
    index = MilvusIndex(milvus_uri, encoder.dim, collection=name, overwrite=True, **text)
    ids, emb = embeddings()
    index.add(ids, emb, [corpus[i].full_text for i in ids] if bm25 is not None else None)
    return index


def lexical_index(
    index: VectorIndex,
    corpus: Corpus,
    bm25: BM25Config | None = None,
    cache_dir: str | Path | None = None,
) -> LexicalIndex:
    """The lexical side beside ``index``: a Milvus collection's own BM25 full-text search when
    it has one (built by :func:`corpus_index` with ``bm25``), else a :class:`BM25Index` of
    ``corpus`` (cached on disk)."""
    from routerretriever.index import MilvusIndex

    if isinstance(index, MilvusIndex) and index.text:
        return index.lexical()
    return BM25Index.cached(corpus, bm25 or BM25Config(), cache_dir)


class Engine:
    """The shared index, the base encoder and the served experts, searchable from many threads.

    Example::

        engine = Engine.open(Encoder.load(), "store/", corpus,
                             domains=[DomainSource("scifact", Path("beir/scifact"))])
        engine.search(["statins and cancer"], k=5)[0].expert
        engine.add_expert("nfcorpus")          # a folder inside the store: live, no training
    """

    def __init__(
        self,
        encoder: Encoder,
        store: str | Path,
        index: VectorIndex,
        domains: Sequence[DomainSource] = (),
        *,
        rule: Rule = "weighted",
        routing_precision: RoutingPrecision = "auto",
        cache_dir: str | Path | None = None,
        max_instances: int = 300,
        seed: int = 0,
        batch_size: int = 32,
        alpha: float = 1.0,
        base_mix: float = 0.0,
        lexical: LexicalIndex | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the dense side's weight) must be in [0, 1], got {alpha}")
        if not 0.0 <= base_mix <= 1.0:
            raise ValueError(f"base_mix must be in [0, 1], got {base_mix}")
        if alpha < 1.0 and lexical is None:
            raise ValueError("alpha < 1 fuses BM25: give a lexical index (see lexical_index)")
        self.alpha, self.base_mix, self.lexical = float(alpha), float(base_mix), lexical
        self.encoder = encoder
        self.store = Path(store).resolve()
        if not self.store.is_dir():
            raise ModelError(f"expert store {self.store} does not exist")
        self.index = index
        self.sources = list(domains)
        self.rule: Rule = rule
        self.routing_precision: RoutingPrecision = routing_precision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_instances = max_instances
        self.seed = seed
        self.batch_size = batch_size
        self.served: dict[str, str] = {}  # name -> folder relative to the store
        self.infos: dict[str, ExpertInfo] = {}
        self._domains: dict[str, _Domain] = {}
        self._scores: dict[tuple[str, str], np.ndarray] = {}  # (model, domain) -> (n,)
        self._instance_emb: dict[str, np.ndarray] = {}
        self._router: RouterRetriever | None = None
        self.pilots: PilotLibrary | None = None
        self._model_lock = threading.Lock()  # held while a batch or a swap uses the experts
        self._admin_lock = threading.Lock()  # one add/remove at a time

    @classmethod
    def open(
        cls,
        encoder: Encoder,
        store: str | Path,
        corpus: Corpus,
        domains: Sequence[DomainSource] = (),
        *,
        index: VectorIndex | None = None,
        experts: Sequence[str] | None = None,
        bm25: BM25Config | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Index ``corpus`` (unless ``index`` is given) and serve ``experts`` (folders relative to
        the store) when given, which then replace the saved set; else the experts of the last run
        (``STORE/.served.json``); else none. With ``alpha < 1`` the dense ranking is fused with
        BM25 (``bm25`` settings; see :func:`lexical_index`)."""
        if index is None:
            index = corpus_index(
                encoder,
                corpus,
                cache_dir=kwargs.get("cache_dir"),
                batch_size=kwargs.get("batch_size", 32),
            )
        if kwargs.get("alpha", 1.0) < 1.0 and kwargs.get("lexical") is None:
            kwargs["lexical"] = lexical_index(index, corpus, bm25, kwargs.get("cache_dir"))
        engine = cls(encoder, store, index, domains, **kwargs)
        state = engine.store / SERVED
        saved: dict[str, str] | None = None
        if state.is_file():
            try:
                saved = dict(json.loads(state.read_text())["experts"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ModelError(f"{state.name}: unreadable served-experts file ({e})") from None
        if experts:  # asked for explicitly: that set wins, and becomes the saved set
            served = {}
            for p in experts:
                folder = engine.resolve(p)
                served[ExpertInfo.read(folder).name] = str(folder.relative_to(engine.store))
            if saved is not None and saved != served:
                logger.warning(
                    "serving the experts asked for, %s, instead of the last run's %s",
                    sorted(served),
                    sorted(saved),
                )
        else:
            served = saved or {}
        for source in engine.sources:  # bad domain data fails now, not at the first add
            engine._domain(source)
        with engine._admin_lock:
            for name, rel in served.items():
                engine._load(rel, name)
            engine._commit(dict(served))
        return engine

    # -- reading -------------------------------------------------------------------------------

    @property
    def experts(self) -> list[str]:
        return sorted(self.served)

    def describe(self) -> list[dict[str, Any]]:
        """Each served expert: name, folder, training source, pilots and their instances."""
        lib = self.pilots
        out = []
        for name in self.experts:
            info = self.infos[name]
            pilots = [p for p in lib.pilots if p.expert == name] if lib else []
            out.append(
                {
                    "name": name,
                    "path": self.served[name],
                    "source": info.source,
                    "dev_ndcg@10": info.dev.get("ndcg@10"),
                    "pilots": len(pilots),
                    "instances": sum(p.size for p in pilots),
                }
            )
        return out

    def search(self, queries: Sequence[str], k: int = 10) -> list[SearchResult]:
        """Route, embed and search a batch of queries; results in input order."""
        texts = list(queries)
        if not texts:
            return []
        with self._model_lock:
            router = self._router
            if router is None:
                emb = self.encoder.encode(texts, batch_size=self.batch_size, show_progress=False)
                lexical_weight = round(1.0 - self.alpha, 6)
                decisions = [RouteDecision(BASE, {}, {BASE: 1.0}, lexical_weight) for _ in texts]
            else:
                emb, decisions = router.route_and_encode(texts)
        if self.lexical is None or self.alpha >= 1.0:
            hits = self.index.search(emb, k)
        else:  # each side's top FUSION_DEPTH, fused by normalised score
            depth = max(k, FUSION_DEPTH)
            dense = self.index.search(emb, depth)
            lexical = self.lexical.search(texts, depth)
            hits = [fuse_scores(d, x, self.alpha, k) for d, x in zip(dense, lexical, strict=True)]
        return [
            SearchResult(h, d.expert, d.scores, d.members, d.lexical_weight)
            for h, d in zip(hits, decisions, strict=True)
        ]

    def embed(
        self, texts: Sequence[str], model: str = "auto", input_type: str = "query"
    ) -> tuple[np.ndarray, list[RouteDecision | None], int]:
        """Embeddings ``(n, d)`` as the index sees them, the routing decision behind each (for
        ``model="auto"`` queries), and the token count.

        ``model``: ``"auto"`` (routed, as ``search`` embeds queries), ``"base"``, or a served
        expert's name. Documents (``input_type="document"``) always get the base model: the
        shared index holds base-model document embeddings.
        """
        if input_type not in ("query", "document"):
            raise RequestError(f"input_type must be 'query' or 'document', got {input_type!r}", 422)
        if model not in ("auto", "base", *self.served):
            raise RequestError(
                f"unknown model {model[:100]!r}; available: {['auto', 'base', *self.experts]}", 404
            )
        texts = list(texts)
        tokens = sum(len(t) for t in self.encoder.tokenize(texts))
        decisions: list[RouteDecision | None] = [None] * len(texts)
        with self._model_lock:
            if (
                input_type == "document"
                or model == "base"
                or (model == "auto" and self._router is None)
            ):
                emb = self.encoder.encode(texts, batch_size=self.batch_size, show_progress=False)
            elif model == "auto":
                assert self._router is not None
                emb, routed = self._router.route_and_encode(texts)
                decisions = list(routed)
            else:
                emb = self.encoder.encode(
                    texts, experts=model, batch_size=self.batch_size, show_progress=False
                )
        return emb, decisions, tokens

    # -- live changes ----------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """A folder given relative to the store, refused if it, or any file in it, would leave the
        store (a link to a file outside is refused as a link to a folder outside is)."""
        if len(path) > MAX_PATH_CHARS or "\0" in path:
            raise RequestError(
                f"expert path must be at most {MAX_PATH_CHARS} characters, without NUL bytes", 400
            )
        p = Path(path)
        if not path or p.is_absolute() or ".." in p.parts or path.startswith("~"):
            raise RequestError(
                f"expert path {path!r} must be relative to the store, without '..'", 400
            )
        folder = (self.store / p).resolve()
        if not folder.is_relative_to(self.store) or folder == self.store:
            raise RequestError(f"expert path {path!r} leaves the store", 400)
        if not folder.is_dir():
            raise RequestError(f"no expert folder {path!r} in the store", 404)
        for entry in folder.rglob("*"):
            if not entry.resolve().is_relative_to(self.store):
                raise RequestError(f"expert path {path!r} holds a link that leaves the store", 400)
        return folder

    def _public(self, message: str) -> str:
        """``message`` with the store's absolute location left out (clients never see paths)."""
        return message.replace(str(self.store) + os.sep, "").replace(str(self.store), "STORE")

    def add_expert(self, path: str, name: str | None = None) -> dict[str, Any]:
        """Serve the expert in ``STORE/path`` (no restart, no training); returns its description."""
        folder = self.resolve(path)
        with self._admin_lock, self._store_lock():
            self._sync_locked()  # another replica may have changed the set
            try:
                info = check_folder(folder, self.encoder)
            except ModelError as e:
                raise RequestError(self._public(str(e)), 422) from None
            try:
                name = check_name(name or info.name)
            except ValueError as e:
                raise RequestError(str(e), 422) from None
            if name in self.served:
                raise RequestError(f"expert {name!r} is already served", 409)
            rel = str(folder.relative_to(self.store))
            try:
                self._load(rel, name, info)
            except Exception as e:  # unreadable weights: a truncated or damaged file
                logger.warning("cannot load expert %s: %s", rel, e)
                raise RequestError(
                    f"expert {rel!r}: its weights cannot be loaded ({type(e).__name__})", 422
                ) from None
            try:
                self._commit({**self.served, name: rel}, adding=True)
            except BaseException:
                with self._model_lock:
                    self.encoder.remove_adapter(name)
                self.infos.pop(name, None)
                raise
        return next(d for d in self.describe() if d["name"] == name)

    def remove_expert(self, name: str) -> None:
        """Stop serving expert ``name``; the pilot library is regrouped without it."""
        with self._admin_lock, self._store_lock():
            self._sync_locked()
            if name not in self.served:
                raise RequestError(f"unknown expert {name!r}; served: {self.experts}", 404)
            self._commit({n: p for n, p in self.served.items() if n != name})
            with self._model_lock:
                self.encoder.remove_adapter(name)
            self.infos.pop(name, None)

    def _load(self, rel: str, name: str, info: ExpertInfo | None = None) -> None:
        folder = self.store / rel
        info = info or check_folder(folder, self.encoder)
        with self._model_lock:  # a batch may be reading the expert table
            self.encoder.add_adapter(name, folder)  # the served router does not route to it yet
        self.infos[name] = info

    def sync(self) -> bool:
        """Serve the set ``STORE/.served.json`` records, if another process sharing the store
        (a replica) changed it; True if anything changed. The file is the one source of truth."""
        with self._admin_lock, self._store_lock():
            return self._sync_locked()

    def _sync_locked(self) -> bool:
        try:
            saved = dict(json.loads((self.store / SERVED).read_text())["experts"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if saved == self.served:
            return False
        for name, rel in saved.items():
            if name not in self.served:
                self._load(rel, name)
        gone = [n for n in self.served if n not in saved]
        self._commit(saved, write=False)
        for name in gone:
            with self._model_lock:
                self.encoder.remove_adapter(name)
            self.infos.pop(name, None)
        logger.info("synced with %s: serving %s", SERVED, sorted(saved))
        return True

    @contextmanager
    def _store_lock(self) -> Iterator[None]:
        """An exclusive lock on the store across processes (replicas change the served set one
        at a time, each starting from the latest one)."""
        import fcntl

        with open(self.store / ".served.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _commit(self, served: dict[str, str], adding: bool = False, write: bool = True) -> None:
        """Build the library for ``served``, record it (atomically, unless ``write=False``: it
        came from the record), then swap it in."""
        names = sorted(served)
        lib = None
        if names:
            if not self.sources:
                raise RequestError(
                    "no domains configured: the pilot library needs domain instances", 409
                )
            insts = [self._instances(d, names) for d in self.sources]
            lib = build_pilots(insts, names)
        delay = float(os.environ.get(_ADD_DELAY_ENV, "0") or 0)
        if delay and adding:
            time.sleep(delay)
        if write:
            atomic_write(
                self.store / SERVED,
                lambda tmp: tmp.write_text(json.dumps({"experts": served}, indent=2) + "\n"),
            )
        router = (
            None
            if lib is None
            else RouterRetriever(
                self.encoder,
                policy=PilotPolicy(lib, self.rule, self.base_mix),
                alpha=self.alpha,
                routing_precision=self.routing_precision,
                batch_size=self.batch_size,
                show_progress=False,
            )
        )
        with self._model_lock:
            self._router, self.pilots, self.served = router, lib, dict(served)
        logger.info("serving %d experts: %s", len(names), names)

    # -- scoring (cached) --------------------------------------------------------------------------

    def _domain(self, source: DomainSource) -> _Domain:
        if source.name not in self._domains:
            from routerretriever.training import load_training_set

            ts = load_training_set(
                self.encoder,
                source.path,
                split=None if source.split == "corpus" else source.split,
                from_corpus=source.split == "corpus",
                cache_dir=self.cache_dir,
                seed=self.seed,
            )
            qids = sorted(q for q in ts.qrels if q in ts.queries)
            random.Random(self.seed).shuffle(qids)
            qids = sorted(qids[: self.max_instances])
            queries = {q: ts.queries[q] for q in qids}
            qrels = {q: ts.qrels[q] for q in qids}
            fp = hashlib.sha256(
                json.dumps([ts.fingerprint, queries, qrels], sort_keys=True).encode()
            ).hexdigest()[:16]
            index = FaissIndex.from_embeddings(ts.doc_ids, ts.doc_emb)
            self._domains[source.name] = _Domain(source, queries, qrels, fp, index)
        return self._domains[source.name]

    def _model_key(self, model: str) -> str:
        if model == BASE:
            return "base-" + self.encoder.fingerprint
        folder = self.encoder.expert_dirs[model]
        return _digest_files(folder, ["adapter_config.json", "adapter_model.safetensors"])

    def _score(self, model: str, dom: _Domain) -> tuple[np.ndarray, np.ndarray]:
        """Per-instance nDCG@10 of ``model`` on a domain and the query embeddings, cached."""
        path = (
            self.cache_dir
            / "scores"
            / f"{self._model_key(model)}-{self.encoder.fingerprint}-{dom.fingerprint}.npz"
        )
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    return f["ndcg"], f["emb"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                logger.warning("%s: unreadable score cache; recomputing", path)
        ndcg, q_emb = per_query_ndcg(
            self.encoder, model, dom.index, dom.queries, dom.qrels, self.batch_size
        )

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, ndcg=ndcg, emb=q_emb)

        atomic_write(path, write)
        return ndcg, q_emb

    def _instances(self, source: DomainSource, experts: Sequence[str]) -> DomainInstances:
        dom = self._domain(source)
        if source.name not in self._instance_emb:
            self._scores[(BASE, source.name)], self._instance_emb[source.name] = self._score(
                BASE, dom
            )
        scores = {}
        for e in experts:
            key = (self._model_key(e), source.name)
            if key not in self._scores:  # only what is new is scored
                self._scores[key] = self._score(e, dom)[0]
            scores[e] = self._scores[key]
        return DomainInstances(
            source.name, list(dom.queries), self._instance_emb[source.name], scores
        )


class MicroBatcher:
    """Merges concurrent ``submit`` calls into one :meth:`Engine.search`.

    When the model frees up, every request queued meanwhile joins the next batch (up to
    ``max_queries`` queries), so batches grow with load and a lone request waits for nothing.
    ``window_s > 0`` also holds a batch's first request that long for others to arrive;
    ``max_queries=0`` runs each request alone.
    """

    def __init__(
        self,
        search: Callable[[Sequence[str], int], list[SearchResult]],
        *,
        window_s: float = 0.0,
        max_queries: int = 256,
    ) -> None:
        self._search = search
        self.window_s = window_s
        self.max_queries = max_queries
        self._queue: queue.Queue[tuple[list[str], int, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()
        self.batches = 0  # batches run so far (for tests and metrics)
        self.on_batch: Callable[[int], None] | None = None  # told each batch's query count

    def pending(self) -> int:
        """Requests waiting for the model."""
        return self._queue.qsize()

    def submit(self, queries: Sequence[str], k: int) -> Future:
        """A future of the queries' :class:`SearchResult` list."""
        fut: Future = Future()
        self._queue.put((list(queries), k, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            size = len(item[0])
            deadline = time.perf_counter() + self.window_s
            while self.max_queries and size < self.max_queries:
                left = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                size += len(nxt[0])
            self._serve(batch)

    def _serve(self, batch: list[tuple[list[str], int, Future]]) -> None:
        self.batches += 1
        texts = [q for queries, _, _ in batch for q in queries]
        if self.on_batch is not None:
            self.on_batch(len(texts))
        try:
            results = self._search(texts, max(k for _, k, _ in batch))
        except Exception as e:
            if len(batch) == 1:
                batch[0][2].set_exception(e)
                return
            # One request's failure must not fail the others: run each alone, so only the
            # request at fault fails.
            logger.warning("a batch of %d requests failed (%s); retrying each alone", len(batch), e)
            for item in batch:
                self._serve([item])
            return
        start = 0
        for queries, k, fut in batch:
            part = results[start : start + len(queries)]
            start += len(queries)
            fut.set_result([replace(r, hits=r.hits[:k]) for r in part])
