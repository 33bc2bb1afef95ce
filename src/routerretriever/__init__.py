"""routerretriever: routed mixture-of-expert dense retrieval over one shared corpus index."""

from __future__ import annotations

from routerretriever.data import (
    BeirDataset,
    Corpus,
    Document,
    Qrels,
    Queries,
    Run,
    load_beir,
    load_corpus,
    load_qrels,
    load_queries,
)
from routerretriever.encoder import Encoder, EncoderSettings
from routerretriever.errors import DataError, ModelError, RouterRetrieverError
from routerretriever.evaluation import EvalResult, evaluate
from routerretriever.index import FaissIndex, VectorIndex
from routerretriever.pilots import PilotLibrary, build_pilots
from routerretriever.retriever import DenseRetriever, RouterRetriever, evaluate_retriever
from routerretriever.router import RouteDecision, route
from routerretriever.store import embed_corpus

__version__ = "0.1.0"

__all__ = [
    "BeirDataset",
    "Corpus",
    "DataError",
    "DenseRetriever",
    "Document",
    "Encoder",
    "EncoderSettings",
    "EvalResult",
    "FaissIndex",
    "ModelError",
    "PilotLibrary",
    "RouteDecision",
    "RouterRetriever",
    "Qrels",
    "Queries",
    "RouterRetrieverError",
    "Run",
    "VectorIndex",
    "build_pilots",
    "embed_corpus",
    "evaluate",
    "evaluate_retriever",
    "load_beir",
    "load_corpus",
    "load_qrels",
    "load_queries",
    "route",
]
