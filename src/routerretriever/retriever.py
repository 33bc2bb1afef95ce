"""A dense retriever over the shared corpus index: the base model, or the base model plus one expert.

Documents are embedded once by the frozen base model (and cached on disk); queries go through
``encode_queries``, which subclasses override (one expert, or routing over many).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from routerretriever.config import check_table, settings_from
from routerretriever.corpora import CorpusScope, CorpusSketch
from routerretriever.data import BeirDataset, Corpus, Document, Run
from routerretriever.devices import has_fast_bfloat16
from routerretriever.encoder import BASE, Encoder, EncoderSettings
from routerretriever.errors import ModelError
from routerretriever.evaluation import DEFAULT_METRICS, EvalResult, evaluate, parse_metric
from routerretriever.files import atomic_dir, default_cache_dir
from routerretriever.fusion import NORMALISATIONS, Normalisation
from routerretriever.index import FaissIndex, VectorIndex
from routerretriever.indexes import hybrid_search
from routerretriever.lexical import BM25Config, BM25Index
from routerretriever.pilots import PilotLibrary
from routerretriever.policy import PilotPolicy, Policy, load_policy
from routerretriever.router import RouteDecision, Rule
from routerretriever.runtime import BACKENDS, Backend, corpus_runtime
from routerretriever.store import embed_corpus

logger = logging.getLogger(__name__)

RoutingPrecision = Literal["auto", "float32", "bfloat16"]
FUSION_DEPTH = 100  # each ranking's depth before dense and lexical are fused


class DenseRetriever:
    """Base-model retriever; queries and documents both embedded by ``encoder``.

    Example::

        r = DenseRetriever(Encoder.load())
        r.index_corpus({"d1": Document("Cats purr."), "d2": Document("Rockets fly.")})
        r.search({"q": "felines"}, k=1)   # {'q': {'d1': <cosine>}}

    ``backend`` is the corpus side's runtime (:mod:`routerretriever.runtime`): ``"auto"``
    (bfloat16 where the hardware does it natively, else ONNX Runtime in float32 on a CPU where
    it is installed, else torch), ``"torch"`` (the exact float32 reference), ``"onnx"`` or
    ``"bfloat16"``.
    Queries are always embedded by torch (experts apply there).
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        expert: str | None = None,
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        show_progress: bool | None = None,
        backend: Backend = "auto",
    ) -> None:
        if expert is not None and expert not in encoder.experts:
            raise ValueError(f"unknown expert {expert!r}; loaded: {encoder.experts}")
        self.encoder = encoder
        self.expert = expert
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.show_progress = show_progress
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        #: the corpus side's runtime (:func:`routerretriever.runtime.corpus_runtime`)
        self.backend = backend
        self.index: VectorIndex | None = None
        self.corpus_from_cache: bool | None = None
        self.corpus_runtime: str | None = None  # what embedded the indexed corpus (runtime.py)

    def encode_queries(
        self, queries: Sequence[str], batch_size: int | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Query embeddings ``(n, dim)``; BEIR's ``DenseRetrievalExactSearch`` calls this too."""
        return self.encoder.encode(
            queries,
            experts=self.expert,
            batch_size=batch_size or self.batch_size,
            show_progress=self.show_progress,
            desc="queries",
        )

    def encode_corpus(
        self,
        corpus: Sequence[Mapping[str, str]] | Sequence[Document],
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Document embeddings ``(n, dim)`` by the base model, from dicts or :class:`Document`s."""
        docs = [
            d if isinstance(d, Document) else Document(d.get("text") or "", d.get("title") or "")
            for d in corpus
        ]
        cache = self.cache_dir if self.cache_dir is not None else default_cache_dir()
        return corpus_runtime(self.encoder, cache, self.backend).encode(
            self.encoder,
            [d.full_text for d in docs],
            batch_size=batch_size or self.batch_size,
            show_progress=self.show_progress,
            desc="corpus",
        )

    def index_corpus(self, corpus: Corpus) -> None:
        """Embed the corpus with the base model (through the on-disk cache) and index it."""
        emb = embed_corpus(
            self.encoder,
            corpus,
            cache_dir=self.cache_dir,
            use_cache=self.use_cache,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
            backend=self.backend,
        )
        self.corpus_from_cache, self.corpus_runtime = emb.cached, emb.backend
        self.index = FaissIndex.from_embeddings(emb.ids, emb.embeddings)

    def search(self, queries: Mapping[str, str], k: int = 10) -> Run:
        """Top-``k`` hits per query id, ``{query_id: {doc_id: score}}``; a query's own id is no hit."""
        if self.index is None:
            raise RuntimeError("no corpus indexed yet: call index_corpus(corpus) first")
        qids = list(queries)
        q_emb = self.encode_queries([queries[q] for q in qids])  # (n, d)
        hits = self.index.search(q_emb, k, exclude_ids=qids)
        return {qid: dict(h) for qid, h in zip(qids, hits, strict=True)}


def evaluate_retriever(
    retriever: DenseRetriever,
    dataset: BeirDataset,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> EvalResult:
    """Index the dataset's corpus, search its queries deep enough for ``metrics``, and score."""
    depth = max(parse_metric(m)[1] for m in metrics)
    retriever.index_corpus(dataset.corpus)
    run = retriever.search(dataset.queries, k=depth)
    return evaluate(dataset.qrels, run, metrics)


#: the types of ``router.json``'s keys (other keys, from later versions, are left alone)
MANIFEST_TYPES: dict[str, Any] = {
    "version": int,
    "routerretriever": str,
    "policy": dict[str, Any] | None,
    "alpha": float,
    "base_alpha": float,
    "normalise": str,
    "bm25": dict[str, Any],
    "routing_precision": str,
    "base_model": str,
    "base_fingerprint": str,
    "encoder_settings": dict[str, Any],
    "experts": list[str],
    "rule": str,
}


class RouterRetriever(DenseRetriever):
    """Routes each query over a pool of dense members (base model, experts) and, optionally, BM25.

    Step 1 embeds the query with the base model; a routing policy (:mod:`routerretriever.policy`)
    turns that into weights over the pool's dense members: one expert by its pilots (the paper,
    the default when only ``pilots`` is given), or a mixture. Step 2 embeds the query with each
    member it uses, in one mixed batch, and searches the shared index once with the weighted sum
    of those vectors (exact score fusion, since documents are embedded by the base model only).
    With ``alpha < 1`` the dense ranking is fused with BM25's (each list normalised as
    ``normalise`` says, ``alpha`` on the dense side; :func:`routerretriever.fusion.fuse_scores`);
    a query on the base model alone is fused at ``base_alpha`` (default ``alpha``). A policy
    scoped to corpora routes as the indexed corpus allows (``PilotPolicy.on_corpus``).

    Step 1 only has to route, so it can run cheaper than step 2:
    ``routing_precision="auto"`` (default) runs it in bfloat16 where the hardware does so
    natively (on the paper's six test sets it routed every query as float32 does; see
    docs/results.md), ``"float32"`` always exact. A query routed wholly to the base model gets
    an exact float32 base embedding (one pass with float32 routing); a mixture's base share uses
    the routing embedding itself (free; bfloat16 where the routing pass is). A pilot library
    built in the space of the base model's first layers (``PilotLibrary.layers``) is cheaper
    still, at some routing accuracy.

    Example::

        enc = Encoder.load()
        load_expert(enc, "experts/scifact"); load_expert(enc, "experts/nfcorpus")
        rr = RouterRetriever(enc, PilotLibrary.load("pilots/"), alpha=0.5)  # + BM25
        rr.index_corpus(corpus)
        run, decisions = rr.search_with_routes({"q1": "statins and cancer"}, k=10)
        decisions["q1"].members, decisions["q1"].lexical_weight   # why it ranked as it did
    """

    def __init__(
        self,
        encoder: Encoder,
        pilots: PilotLibrary | None = None,
        *,
        rule: Rule = "weighted",
        policy: Policy | None = None,
        alpha: float = 1.0,
        bm25: BM25Config | None = None,
        routing_precision: RoutingPrecision = "auto",
        normalise: Normalisation = "minmax",
        base_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if (pilots is None) == (policy is None):
            raise ValueError("give either pilots (routing by the paper's pilots) or a policy")
        if policy is None:
            assert pilots is not None
            policy = PilotPolicy(pilots, rule)
        self.policy: Policy = policy
        #: the policy as it routes on the indexed corpus (see :meth:`index_corpus`)
        self.active_policy: Policy = policy
        missing = [e for e in policy.members if e != BASE and e not in encoder.experts]
        if missing:
            raise ValueError(
                f"routing policy names expert(s) {missing} not loaded; loaded: {encoder.experts}"
            )
        layers = getattr(policy, "layers", None)
        if layers is not None and not 1 <= layers <= encoder.num_layers:
            raise ValueError(
                f"pilot library routes on {layers} layers; the base model has {encoder.num_layers}"
            )
        if routing_precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"routing_precision must be 'auto', 'float32' or 'bfloat16', got {routing_precision!r}"
            )
        for name, a in (("alpha", alpha), ("base_alpha", base_alpha)):
            if a is not None and not 0.0 <= a <= 1.0:
                raise ValueError(f"{name} (the dense side's weight) must be in [0, 1], got {a}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}, got {normalise!r}")
        self.alpha = float(alpha)
        self.base_alpha = self.alpha if base_alpha is None else float(base_alpha)
        self.normalise: Normalisation = normalise
        self.bm25 = bm25 or BM25Config()
        self.lexical: BM25Index | None = None
        self.routing_precision = routing_precision
        bf16 = routing_precision == "bfloat16" or (
            routing_precision == "auto" and has_fast_bfloat16(encoder.device)
        )
        #: dtype of the routing pass (``None``: the base model's own, float32).
        self.routing_dtype = torch.bfloat16 if bf16 else None

    @property
    def pilots(self) -> PilotLibrary | None:
        """The pilot library of a pilot policy (``None`` for other policies)."""
        return getattr(self.policy, "pilots", None)

    @property
    def rule(self) -> str | None:
        return getattr(self.policy, "rule", None)

    def index_corpus(self, corpus: Corpus) -> None:
        """Embed and index the corpus; with ``alpha < 1`` also its BM25 index (cached likewise)."""
        super().index_corpus(corpus)
        if isinstance(self.policy, PilotPolicy) and self.policy.scope is not None:
            self.active_policy = self.policy.on_corpus(CorpusSketch.of(corpus))
        if min(self.alpha, self.base_alpha) < 1.0:
            self.lexical = (
                BM25Index.cached(corpus, self.bm25, self.cache_dir)
                if self.use_cache
                else BM25Index.build(corpus, self.bm25)
            )

    def route(self, queries: Sequence[str]) -> list[RouteDecision]:
        """The routing decision of each query, with every member's score and weight."""
        return self.route_and_encode(list(queries), None)[1]

    def route_and_encode(
        self, texts: list[str], batch_size: int | None = None
    ) -> tuple[np.ndarray, list[RouteDecision]]:
        """Final query embeddings ``(n, dim)`` and the routing decision of each query."""
        bs = batch_size or self.batch_size
        policy = self.active_policy
        layers = getattr(policy, "layers", None)
        same_space = layers is None or layers == self.encoder.num_layers
        # A policy that sends every query to the base model alone needs no cheaper routing
        # pass: one exact pass is both the routing pass and the answer.
        dtype = None if same_space and getattr(policy, "base_only", False) else self.routing_dtype
        ids = self.encoder.tokenize(texts)  # once, for both passes
        routing = self.encoder.encode_tokens(
            ids, batch_size=bs, layers=layers, dtype=dtype
        )  # (n, d)
        weights, scores = policy.weights(routing)  # (n, m), (n, m)
        members = policy.members
        exact = same_space and dtype is None

        def plain(m: str) -> bool:  # the base model's own embedding
            return m == BASE or self.encoder.is_identity(m)

        out = np.zeros_like(routing)  # (n, d)
        rows: list[tuple[int, float, str | None]] = []  # (query, weight, expert) needing a pass
        for i, j in zip(*np.nonzero(weights), strict=True):
            m, w = members[j], float(weights[i, j])
            if plain(m) and same_space and (exact or w < 1.0):
                out[i] += w * routing[i]  # the routing embedding serves as the base member
            else:
                rows.append((int(i), w, None if plain(m) else m))
        if rows:
            emb = self.encoder.encode_tokens(
                [ids[i] for i, _, _ in rows], experts=[e for _, _, e in rows], batch_size=bs
            )
            for (i, w, _), e in zip(rows, emb, strict=True):
                out[i] += w * e
        decisions = []
        for i in range(len(texts)):
            used = {m: float(w) for m, w in zip(members, weights[i], strict=True) if w > 0}
            decisions.append(
                RouteDecision(
                    members[int(weights[i].argmax())],
                    {
                        m: float(v)
                        for m, v in zip(members, scores[i], strict=True)
                        if np.isfinite(v)
                    },
                    used,
                    round(1.0 - self.query_alpha(used), 6),
                )
            )
        return out, decisions

    def query_alpha(self, members: Mapping[str, float]) -> float:
        """The dense weight of a query with these member weights: ``base_alpha`` if all of it
        is on the base model, else ``alpha``."""
        return self.base_alpha if members.get(BASE, 0.0) >= 1.0 - 1e-9 else self.alpha

    def encode_queries(
        self, queries: Sequence[str], batch_size: int | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Routed query embeddings ``(n, dim)`` (the dense side only); BEIR's
        ``DenseRetrievalExactSearch`` calls this."""
        return self.route_and_encode(list(queries), batch_size)[0]

    def search_with_routes(
        self, queries: Mapping[str, str], k: int = 10
    ) -> tuple[Run, dict[str, RouteDecision]]:
        """Top-``k`` hits per query and the routing decision behind each."""
        if self.index is None:
            raise RuntimeError("no corpus indexed yet: call index_corpus(corpus) first")
        qids = list(queries)
        texts = [queries[q] for q in qids]
        emb, decisions = self.route_and_encode(texts, None)
        alphas = [self.query_alpha(d.members) for d in decisions]
        if min(alphas, default=1.0) >= 1.0:
            hits = self.index.search(emb, k, exclude_ids=qids)
        elif self.lexical is None:
            raise RuntimeError("no BM25 index: call index_corpus(corpus) first")
        else:
            hits = hybrid_search(
                self.index,
                self.lexical,
                emb,
                texts,
                k,
                alphas,
                self.normalise,
                FUSION_DEPTH,
                qids,
            )
        run = {qid: dict(h) for qid, h in zip(qids, hits, strict=True)}
        return run, dict(zip(qids, decisions, strict=True))

    def search(self, queries: Mapping[str, str], k: int = 10) -> Run:
        return self.search_with_routes(queries, k)[0]

    def save(self, path: str | Path) -> Path:
        """Write ``router.json``, the policy's files and ``experts/<name>/`` into ``path``
        (atomically). The corpus indexes are not saved: they are rebuilt (or read from the cache)
        for whatever corpus the loaded retriever is given.
        """
        import shutil

        from routerretriever import __version__

        names = [e for e in self.policy.members if e != BASE]

        def fill(tmp: Path) -> None:
            policy = self.policy.save(tmp)
            for name in names:
                shutil.copytree(self.encoder.expert_dirs[name], tmp / "experts" / name)
            manifest = {
                "version": 2,
                "routerretriever": __version__,
                "policy": policy,
                "alpha": self.alpha,
                "base_alpha": self.base_alpha,
                "normalise": self.normalise,
                "bm25": asdict(self.bm25),
                "routing_precision": self.routing_precision,
                "base_model": str(self.encoder.model_path),
                "base_fingerprint": self.encoder.weights_fingerprint,
                "encoder_settings": asdict(self.encoder.settings),
                "experts": names,
            }
            (tmp / "router.json").write_text(json.dumps(manifest, indent=2) + "\n")

        return atomic_dir(Path(path), fill)

    @staticmethod
    def serving_settings(path: str | Path) -> dict[str, Any]:
        """What a server needs to serve a saved pilots router as the experiment chose it, read
        from its ``router.json`` without loading any model: ``alpha``, ``normalise``, ``bm25``
        (a :class:`BM25Config`), ``rule``, ``base_mix``, ``decline``, ``base_alpha`` and
        ``scope`` (a :class:`routerretriever.corpora.CorpusScope` or ``None``). The server builds its
        own pilots from its domains; a router of another kind (k-NN) cannot be served so."""
        manifest_file = Path(path) / "router.json"
        if not manifest_file.is_file():
            raise ModelError(f"{path}: no router.json; not a saved RouterRetriever")
        try:
            manifest = json.loads(manifest_file.read_text())
            policy = manifest.get("policy") or {"kind": "pilots", "rule": manifest["rule"]}
            normalise = manifest.get("normalise", "minmax")
            if normalise not in NORMALISATIONS:
                raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}")
            out = {
                "alpha": float(manifest.get("alpha", 1.0)),
                "normalise": normalise,
                "bm25": settings_from(BM25Config, manifest.get("bm25", {}), "bm25"),
                "rule": str(policy.get("rule", "weighted")),
                "base_mix": float(policy.get("base_mix", 0.0)),
                "decline": [str(n) for n in policy.get("decline", [])],
                "base_alpha": manifest.get("base_alpha"),
                "scope": None
                if policy.get("scope") is None
                else CorpusScope.from_json(policy["scope"]),
            }
            if out["base_alpha"] is not None:
                out["base_alpha"] = float(out["base_alpha"])
            kind = policy.get("kind")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise ModelError(f"{manifest_file}: cannot read the saved router ({e})") from None
        if kind != "pilots":
            raise ModelError(
                f"{manifest_file}: a {kind!r} router routes by its own instances; only a pilots "
                "router's settings can be served (the server builds its pilots from its domains)"
            )
        return out

    @classmethod
    def load(
        cls, path: str | Path, base_model: str | None = None, device: str = "auto", **kwargs: Any
    ) -> RouterRetriever:
        """Inverse of :meth:`save`, onto ``device``; ``base_model`` overrides the saved base
        model location."""
        from routerretriever.experts import check_name, load_expert

        path = Path(path)
        manifest_file = path / "router.json"
        if not manifest_file.is_file():
            raise ModelError(f"{path}: no router.json; not a saved RouterRetriever")
        try:
            manifest = json.loads(manifest_file.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            check_table(manifest, MANIFEST_TYPES, "router.json", strict=False)
            settings = asdict(
                settings_from(EncoderSettings, manifest["encoder_settings"], "encoder_settings")
            )
            saved = manifest["base_model"]
            experts = [check_name(name) for name in manifest["experts"]]
            policy_spec = manifest.get("policy") or {  # version 1: pilots and a rule
                "kind": "pilots",
                "rule": manifest["rule"],
                "base_mix": 0.0,
            }
            policy = load_policy(path, policy_spec)
            bm25 = settings_from(BM25Config, manifest.get("bm25", {}), "bm25")
            normalise = manifest.get("normalise", "minmax")  # before it was saved: min-max
            if normalise not in NORMALISATIONS:
                raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise ModelError(f"{manifest_file}: cannot read the saved router ({e})") from None
        if base_model is None and not (saved and Path(saved).is_dir()):
            saved = None  # e.g. saved on another machine: fall back to the packaged default
        encoder = Encoder.load(base_model or saved, device=device, **settings)
        for name in experts:
            load_expert(encoder, path / "experts" / name, name)
        kwargs.setdefault("routing_precision", manifest.get("routing_precision", "auto"))
        kwargs.setdefault("alpha", float(manifest.get("alpha", 1.0)))
        kwargs.setdefault("base_alpha", manifest.get("base_alpha"))  # absent before: alpha
        kwargs.setdefault("normalise", normalise)
        try:
            return cls(encoder, policy=policy, bm25=bm25, **kwargs)
        except ValueError as e:  # a saved alpha or routing precision out of range
            raise ModelError(f"{manifest_file}: cannot use the saved router ({e})") from None
