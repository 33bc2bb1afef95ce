"""routerretriever: routed mixture-of-expert dense retrieval over one shared corpus index."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names, imported on first use: `import routerretriever` (and the command line's --help)
# stays fast, loading torch only when a model is needed.
_LAZY = {
    "BeirDataset": "routerretriever.data",
    "Corpus": "routerretriever.data",
    "Document": "routerretriever.data",
    "Qrels": "routerretriever.data",
    "Queries": "routerretriever.data",
    "Run": "routerretriever.data",
    "load_beir": "routerretriever.data",
    "load_corpus": "routerretriever.data",
    "load_qrels": "routerretriever.data",
    "load_queries": "routerretriever.data",
    "Encoder": "routerretriever.encoder",
    "EncoderSettings": "routerretriever.encoder",
    "DataError": "routerretriever.errors",
    "ModelError": "routerretriever.errors",
    "RouterRetrieverError": "routerretriever.errors",
    "EvalResult": "routerretriever.evaluation",
    "evaluate": "routerretriever.evaluation",
    "FaissIndex": "routerretriever.index",
    "VectorIndex": "routerretriever.index",
    "PilotLibrary": "routerretriever.pilots",
    "build_pilots": "routerretriever.pilots",
    "DenseRetriever": "routerretriever.retriever",
    "RouterRetriever": "routerretriever.retriever",
    "evaluate_retriever": "routerretriever.retriever",
    "RouteDecision": "routerretriever.router",
    "route": "routerretriever.router",
    "embed_corpus": "routerretriever.store",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'routerretriever' has no attribute {name!r}")


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
