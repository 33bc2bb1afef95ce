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

from routerretriever.data import BeirDataset, Corpus, Document, Run
from routerretriever.encoder import BASE, Encoder, has_fast_bfloat16
from routerretriever.errors import ModelError
from routerretriever.evaluation import DEFAULT_METRICS, EvalResult, evaluate, parse_metric
from routerretriever.files import atomic_dir
from routerretriever.index import FaissIndex, VectorIndex
from routerretriever.pilots import PilotLibrary
from routerretriever.router import RULES, RouteDecision, Rule, route
from routerretriever.store import embed_corpus

logger = logging.getLogger(__name__)

RoutingPrecision = Literal["auto", "float32", "bfloat16"]


class DenseRetriever:
    """Base-model retriever; queries and documents both embedded by ``encoder``.

    Example::

        r = DenseRetriever(Encoder.load())
        r.index_corpus({"d1": Document("Cats purr."), "d2": Document("Rockets fly.")})
        r.search({"q": "felines"}, k=1)   # {'q': {'d1': <cosine>}}
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
    ) -> None:
        if expert is not None and expert not in encoder.experts:
            raise ValueError(f"unknown expert {expert!r}; loaded: {encoder.experts}")
        self.encoder = encoder
        self.expert = expert
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.show_progress = show_progress
        self.index: VectorIndex | None = None
        self.corpus_from_cache: bool | None = None

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
        return self.encoder.encode(
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
        )
        self.corpus_from_cache = emb.cached
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


class RouterRetriever(DenseRetriever):
    """Routes each query to one expert by its pilots, then embeds it with that expert.

    Step 1 embeds the query with the base model and compares it with the pilot library
    (:func:`routerretriever.router.route`); step 2 embeds it again with base + the chosen
    expert's LoRA, in mixed batches. A query routed to the base model itself (``"__base__"`` in
    the pool) keeps its routing embedding (with float32 routing): one forward pass, not two.

    Step 1 only has to pick an expert, so it can run cheaper than step 2:
    ``routing_precision="auto"`` (default) runs it in bfloat16 where the hardware does so
    natively (on the paper's six test sets it routed every query as float32 does; see
    docs/results.md), ``"float32"`` always exact. A pilot library built in the space of the base
    model's first layers (``PilotLibrary.layers``) is cheaper still, at some routing accuracy.

    Example::

        enc = Encoder.load()
        load_expert(enc, "experts/scifact"); load_expert(enc, "experts/nfcorpus")
        rr = RouterRetriever(enc, PilotLibrary.load("pilots/"))
        rr.index_corpus(corpus)
        run, decisions = rr.search_with_routes({"q1": "statins and cancer"}, k=10)
        decisions["q1"].expert, decisions["q1"].scores   # why it went where it went
    """

    def __init__(
        self,
        encoder: Encoder,
        pilots: PilotLibrary,
        *,
        rule: Rule = "weighted",
        routing_precision: RoutingPrecision = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        missing = [e for e in pilots.experts if e != BASE and e not in encoder.experts]
        if missing:
            raise ValueError(
                f"pilot library names expert(s) {missing} not loaded; loaded: {encoder.experts}"
            )
        if rule not in RULES:
            raise ValueError(f"unknown routing rule {rule!r}; use one of {list(RULES)}")
        if pilots.layers is not None and not 1 <= pilots.layers <= encoder.num_layers:
            raise ValueError(
                f"pilot library routes on {pilots.layers} layers; "
                f"the base model has {encoder.num_layers}"
            )
        if routing_precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"routing_precision must be 'auto', 'float32' or 'bfloat16', got {routing_precision!r}"
            )
        self.pilots = pilots
        self.rule = rule
        self.routing_precision = routing_precision
        bf16 = routing_precision == "bfloat16" or (
            routing_precision == "auto" and has_fast_bfloat16(encoder.device)
        )
        #: dtype of the routing pass (``None``: the base model's own, float32).
        self.routing_dtype = torch.bfloat16 if bf16 else None

    def route(self, queries: Sequence[str]) -> list[RouteDecision]:
        """The routing decision of each query, with every expert's score."""
        return self.route_and_encode(list(queries), None)[1]

    def route_and_encode(
        self, texts: list[str], batch_size: int | None = None
    ) -> tuple[np.ndarray, list[RouteDecision]]:
        """Final query embeddings ``(n, dim)`` and the routing decision of each query."""
        bs = batch_size or self.batch_size
        layers = self.pilots.layers
        ids = self.encoder.tokenize(texts)  # once, for both passes
        emb = self.encoder.encode_tokens(
            ids, batch_size=bs, layers=layers, dtype=self.routing_dtype
        )  # (n, d)
        decisions = route(emb, self.pilots, self.rule)
        full = (layers is None or layers == self.encoder.num_layers) and self.routing_dtype is None

        def plain(expert: str) -> bool:  # the base model's own embedding is the final one
            return expert == BASE or self.encoder.is_identity(expert)

        # A full routing embedding is final for the base model (and identity experts).
        todo = [i for i, d in enumerate(decisions) if not (full and plain(d.expert))]
        if todo:
            emb[todo] = self.encoder.encode_tokens(
                [ids[i] for i in todo],
                experts=[None if plain(decisions[i].expert) else decisions[i].expert for i in todo],
                batch_size=bs,
            )
        return emb, decisions

    def encode_queries(
        self, queries: Sequence[str], batch_size: int | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Routed query embeddings ``(n, dim)``; BEIR's ``DenseRetrievalExactSearch`` calls this."""
        return self.route_and_encode(list(queries), batch_size)[0]

    def search_with_routes(
        self, queries: Mapping[str, str], k: int = 10
    ) -> tuple[Run, dict[str, RouteDecision]]:
        """Top-``k`` hits per query and the routing decision behind each."""
        if self.index is None:
            raise RuntimeError("no corpus indexed yet: call index_corpus(corpus) first")
        qids = list(queries)
        emb, decisions = self.route_and_encode([queries[q] for q in qids], None)
        hits = self.index.search(emb, k, exclude_ids=qids)
        run = {qid: dict(h) for qid, h in zip(qids, hits, strict=True)}
        return run, dict(zip(qids, decisions, strict=True))

    def search(self, queries: Mapping[str, str], k: int = 10) -> Run:
        return self.search_with_routes(queries, k)[0]

    def save(self, path: str | Path) -> Path:
        """Write ``router.json``, ``pilots/`` and ``experts/<name>/`` into ``path`` (atomically).

        The corpus index is not saved: it is rebuilt from the corpus and the embedding cache.
        """
        import shutil

        from routerretriever import __version__

        names = [e for e in self.pilots.experts if e != BASE]
        manifest = {
            "version": 1,
            "routerretriever": __version__,
            "rule": self.rule,
            "routing_precision": self.routing_precision,
            "base_model": str(self.encoder.model_path),
            "base_fingerprint": self.encoder.weights_fingerprint,
            "encoder_settings": asdict(self.encoder.settings),
            "experts": names,
        }

        def fill(tmp: Path) -> None:
            self.pilots.save(tmp / "pilots")
            for name in names:
                shutil.copytree(self.encoder.expert_dirs[name], tmp / "experts" / name)
            (tmp / "router.json").write_text(json.dumps(manifest, indent=2) + "\n")

        return atomic_dir(Path(path), fill)

    @classmethod
    def load(
        cls, path: str | Path, base_model: str | None = None, **kwargs: Any
    ) -> RouterRetriever:
        """Inverse of :meth:`save`; ``base_model`` overrides the saved base model location."""
        from routerretriever.experts import load_expert

        path = Path(path)
        manifest_file = path / "router.json"
        if not manifest_file.is_file():
            raise ModelError(f"{path}: no router.json; not a saved RouterRetriever")
        manifest = json.loads(manifest_file.read_text())
        settings = manifest["encoder_settings"]
        saved = manifest["base_model"]
        if base_model is None and not Path(saved).is_dir():
            saved = None  # e.g. saved on another machine: fall back to the packaged default
        encoder = Encoder.load(base_model or saved, **settings)
        for name in manifest["experts"]:
            load_expert(encoder, path / "experts" / name, name)
        kwargs.setdefault("routing_precision", manifest.get("routing_precision", "auto"))
        return cls(encoder, PilotLibrary.load(path / "pilots"), rule=manifest["rule"], **kwargs)


def per_query_ndcg(
    encoder: Encoder,
    model: str,
    index: VectorIndex,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """nDCG@10 of each query (0 when it has no hits) with ``model`` (an expert name or ``BASE``).

    Returns the scores ``(n,)`` in ``queries`` order and the query embeddings ``(n, d)``. This is
    what the pilot library and the oracles are built from.
    """
    qids = list(queries)
    emb = encoder.encode(
        [queries[q] for q in qids],
        experts=None if model == BASE else model,
        batch_size=batch_size,
        show_progress=False,
    )
    hits = index.search(emb, 10, exclude_ids=qids)
    run = {q: dict(h) for q, h in zip(qids, hits, strict=True)}
    per = evaluate(dict(qrels), run, ["ndcg@10"]).per_query
    return np.array([per.get(q, {}).get("ndcg@10", 0.0) for q in qids]), emb
