"""What the HTTP service serves: a thread-safe search engine with live expert add/remove.

The engine holds the shared corpus index (and, with ``alpha < 1``, the lexical index beside it),
the base encoder with the served experts, and the pilot library built from each configured
domain's instances (Algorithm 1, :mod:`routerretriever.instances`). Adding an expert scores only
what it changes (the new expert on every domain's instances; per-(expert, domain) scores are
cached on disk) and regroups; removing one regroups with no scoring. Neither trains anything.
Concurrent requests reach it through :class:`routerretriever.batching.MicroBatcher`.

The served experts are recorded in ``STORE/.served.json``, written atomically only once a new
library is complete: a server killed in the middle of an add restarts with the expert either
fully served or absent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from routerretriever.batching import RequestError, SearchResult
from routerretriever.corpora import CorpusScope, CorpusSketch
from routerretriever.data import Corpus
from routerretriever.encoder import BASE, Encoder
from routerretriever.errors import ModelError
from routerretriever.experts import ExpertInfo, check_folder, check_name
from routerretriever.files import atomic_write, default_cache_dir
from routerretriever.fusion import NORMALISATIONS, Normalisation
from routerretriever.index import VectorIndex
from routerretriever.indexes import corpus_index, hybrid_search, lexical_index
from routerretriever.instances import Domain, InstanceScorer
from routerretriever.lexical import BM25Config, LexicalIndex
from routerretriever.pilots import PilotLibrary, build_pilots
from routerretriever.policy import PilotPolicy
from routerretriever.retriever import FUSION_DEPTH, RouterRetriever, RoutingPrecision
from routerretriever.router import RouteDecision, Rule
from routerretriever.runtime import BACKENDS, Backend, corpus_runtime

logger = logging.getLogger(__name__)

SERVED = ".served.json"  # the served experts, in the store folder
MAX_PATH_CHARS = 1024  # an expert path longer than this is refused before touching the disk


class SharedLock:
    """Shared by many holders at once (batches) or held by one alone (a swap of the experts).
    A waiting swap goes before holders that arrive after it, so a busy server cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0  # swaps waiting for the shared holders to leave

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._alone or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class Engine:
    """The shared index, the base encoder and the served experts, searchable from many threads.

    Example::

        engine = Engine.open(Encoder.load(), "store/", corpus,
                             domains=[Domain("scifact", Path("beir/scifact"))])
        engine.search(["statins and cancer"], k=5)[0].expert
        engine.add_expert("nfcorpus")          # a folder inside the store: live, no training
    """

    def __init__(
        self,
        encoder: Encoder,
        store: str | Path,
        index: VectorIndex,
        domains: Sequence[Domain] = (),
        *,
        rule: Rule = "weighted",
        routing_precision: RoutingPrecision = "auto",
        cache_dir: str | Path | None = None,
        max_instances: int = 300,
        seed: int = 0,
        batch_size: int = 32,
        alpha: float = 1.0,
        base_mix: float = 0.0,
        normalise: Normalisation = "minmax",
        lexical: LexicalIndex | None = None,
        decline: Sequence[str] = (),
        base_alpha: float | None = None,
        runtime: Backend = "auto",
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        for name, a in (("alpha", alpha), ("base_alpha", base_alpha)):
            if a is not None and not 0.0 <= a <= 1.0:
                raise ValueError(f"{name} (the dense side's weight) must be in [0, 1], got {a}")
        if not 0.0 <= base_mix <= 1.0:
            raise ValueError(f"base_mix must be in [0, 1], got {base_mix}")
        if min(alpha, alpha if base_alpha is None else base_alpha) < 1.0 and lexical is None:
            raise ValueError("alpha < 1 fuses BM25: give a lexical index (see lexical_index)")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}, got {normalise!r}")
        if runtime not in BACKENDS:
            raise ValueError(f"runtime must be one of {', '.join(BACKENDS)}, got {runtime!r}")
        #: What embeds documents (:mod:`routerretriever.runtime`), as the index was embedded.
        self.runtime: Backend = runtime
        self.alpha, self.base_mix, self.lexical = float(alpha), float(base_mix), lexical
        #: dense weight of a query routed to the base model alone (a saved router's)
        self.base_alpha = self.alpha if base_alpha is None else float(base_alpha)
        self.normalise: Normalisation = normalise
        #: Experts whose routed queries get the base model instead (the experiment's gate, e.g.
        #: a saved router's ``decline``); a name not served now is kept for when it is.
        self.decline = tuple(dict.fromkeys(check_name(n) for n in decline))
        #: Called by an add once the new library is built, before it is recorded (tests kill
        #: the server there).
        self.before_commit = before_commit
        self.encoder = encoder
        self.store = Path(store).resolve()
        if not self.store.is_dir():
            raise ModelError(f"expert store {self.store} does not exist")
        self.index = index
        self.sources = list(domains)
        self.rule: Rule = rule
        self.routing_precision: RoutingPrecision = routing_precision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch_size = batch_size
        self.served: dict[str, str] = {}  # name -> folder relative to the store
        self.infos: dict[str, ExpertInfo] = {}
        self.scorer = InstanceScorer(
            encoder,
            cache_dir=self.cache_dir,
            max_instances=max_instances,
            seed=seed,
            batch_size=batch_size,
            backend=runtime,
        )
        self._router: RouterRetriever | None = None
        self.pilots: PilotLibrary | None = None
        # Batches share it (several may run at once); a swap of the experts holds it alone.
        self._model_lock = SharedLock()
        self._admin_lock = threading.Lock()  # one add/remove at a time

    @classmethod
    def open(
        cls,
        encoder: Encoder,
        store: str | Path,
        corpus: Corpus,
        domains: Sequence[Domain] = (),
        *,
        index: VectorIndex | None = None,
        experts: Sequence[str] | None = None,
        bm25: BM25Config | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        alpha: float = 1.0,
        lexical: LexicalIndex | None = None,
        runtime: Backend = "auto",
        scope: CorpusScope | None = None,
        **options: Any,
    ) -> Engine:
        """Index ``corpus`` (unless ``index`` is given) and serve ``experts`` (folders relative to
        the store) when given, which then replace the saved set; else the experts of the last run
        (``STORE/.served.json``); else none. With ``alpha < 1`` the dense ranking is fused with
        BM25 (``bm25`` settings; see :func:`routerretriever.store.lexical_index`). ``runtime``
        embeds the documents; a saved router's ``scope`` declines, on top of ``decline``, the
        experts it keeps only on other corpora (:class:`routerretriever.corpora.CorpusScope`);
        ``options`` are :class:`Engine`'s other keyword arguments."""
        if index is None:
            index = corpus_index(
                encoder, corpus, cache_dir=cache_dir, batch_size=batch_size, runtime=runtime
            )
        base_alpha = options.get("base_alpha")
        if min(alpha, alpha if base_alpha is None else base_alpha) < 1.0 and lexical is None:
            lexical = lexical_index(index, corpus, bm25, cache_dir)
        if scope is not None:
            out = scope.excluded(CorpusSketch.of(corpus))
            options["decline"] = [*options.get("decline", ()), *out]
        engine = cls(
            encoder,
            store,
            index,
            domains,
            cache_dir=cache_dir,
            batch_size=batch_size,
            alpha=alpha,
            lexical=lexical,
            runtime=runtime,
            **options,
        )
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
            engine.scorer.instance_set(source)
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
                    "declined": name in self.decline,
                }
            )
        return out

    def search(self, queries: Sequence[str], k: int = 10) -> list[SearchResult]:
        """Route, embed and search a batch of queries; results in input order."""
        texts = list(queries)
        if not texts:
            return []
        with self._model_lock.shared():
            router = self._router
            if router is None:
                emb = self.encoder.encode(texts, batch_size=self.batch_size, show_progress=False)
                lexical_weight = round(1.0 - self.base_alpha, 6)
                decisions = [RouteDecision(BASE, {}, {BASE: 1.0}, lexical_weight) for _ in texts]
            else:
                emb, decisions = router.route_and_encode(texts)
        alphas = [
            self.base_alpha if router is None else router.query_alpha(d.members) for d in decisions
        ]
        if self.lexical is None or min(alphas) >= 1.0:
            hits = self.index.search(emb, k)
        else:  # each side's top FUSION_DEPTH, fused by normalised score
            hits = hybrid_search(
                self.index, self.lexical, emb, texts, k, alphas, self.normalise, FUSION_DEPTH
            )
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
        with self._model_lock.shared():
            if input_type == "document":  # the runtime the corpus index was embedded with
                runtime = corpus_runtime(self.encoder, self.cache_dir, self.runtime)
                emb = runtime.encode(
                    self.encoder, texts, batch_size=self.batch_size, show_progress=False
                )
            elif model == "base" or (model == "auto" and self._router is None):
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
                with self._model_lock.exclusive():
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
            with self._model_lock.exclusive():
                self.encoder.remove_adapter(name)
            self.infos.pop(name, None)

    def _load(self, rel: str, name: str, info: ExpertInfo | None = None) -> None:
        folder = self.store / rel
        info = info or check_folder(folder, self.encoder)
        with self._model_lock.exclusive():  # a batch may be reading the expert table
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
            with self._model_lock.exclusive():
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
            insts = [self.scorer.instances(d, names) for d in self.sources]
            lib = build_pilots(insts, names)
        if adding and self.before_commit is not None:
            self.before_commit()
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
                policy=PilotPolicy(
                    lib, self.rule, self.base_mix, tuple(n for n in self.decline if n in names)
                ),
                alpha=self.alpha,
                base_alpha=self.base_alpha,
                normalise=self.normalise,
                routing_precision=self.routing_precision,
                batch_size=self.batch_size,
                show_progress=False,
            )
        )
        with self._model_lock.exclusive():
            self._router, self.pilots, self.served = router, lib, dict(served)
        logger.info("serving %d experts: %s", len(names), names)
