"""MTEB's search protocol over our retrievers, and a local BEIR folder as an MTEB retrieval task.

:class:`MTEBSearch` implements ``mteb.models.SearchProtocol``: MTEB hands it the corpus
(``index``: embedded by the base model, as our one shared index always is) and the queries
(``search``: routed to experts by a :class:`~routerretriever.retriever.RouterRetriever`, or
embedded by a :class:`~routerretriever.retriever.DenseRetriever`), so MTEB's metrics are
computed on exactly the rankings ``routerretriever evaluate`` scores. :func:`local_task` turns a
BEIR folder on disk into an MTEB retrieval task that needs no hub access::

    import mteb
    from routerretriever import RouterRetriever
    from routerretriever.mteb_model import MTEBSearch, local_task

    model = MTEBSearch(RouterRetriever.load("runs/paper/results/router"))
    results = mteb.evaluate(model, [local_task("data/beir/scifact")], cache=None)

Needs the ``mteb`` package (``pip install mteb``); importing this module without it fails with
a message saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routerretriever.data import Document, load_beir
from routerretriever.retriever import DenseRetriever

try:
    from mteb.abstasks import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("routerretriever.mteb_model needs the mteb package: pip install mteb") from e


class MTEBSearch:
    """An MTEB search model (``index`` the corpus, ``search`` the queries) over ``retriever``."""

    def __init__(self, retriever: DenseRetriever, name: str = "routerretriever/router") -> None:
        self.retriever = retriever
        self.name = name

    @property
    def mteb_model_meta(self) -> ModelMeta:
        enc = self.retriever.encoder
        return ModelMeta(
            loader=None,
            name=self.name,
            revision=enc.fingerprint,
            release_date=None,
            languages=None,
            n_parameters=None,
            memory_usage_mb=None,
            max_tokens=float(enc.settings.max_length),
            embed_dim=enc.dim,
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=None,
            use_instructions=False,
            training_datasets=None,
        )

    def index(self, corpus: Any, **kwargs: Any) -> None:
        """Embed and index MTEB's corpus (rows with ``id``, ``text`` and maybe ``title``)."""
        docs = {
            str(row["id"]): Document(title=row.get("title") or "", text=row.get("text") or "")
            for row in corpus
        }
        self.retriever.index_corpus(docs)

    def search(self, queries: Any, *, top_k: int, **kwargs: Any) -> dict[str, dict[str, float]]:
        """``{query id: {document id: score}}``, the ``top_k`` best per query."""
        return self.retriever.search({str(r["id"]): r["text"] for r in queries}, k=top_k)


def local_task(folder: str | Path, split: str = "test", name: str | None = None) -> Any:
    """A BEIR folder on disk as an MTEB retrieval task (main score nDCG@10), loaded locally."""
    from datasets import Dataset

    path = Path(folder)
    data = load_beir(path, split)
    task_name = name or f"Local{path.name.capitalize()}"

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=task_name,
            description=f"The BEIR folder {path.name}, read from disk.",
            dataset={"path": f"local/{path.name}", "revision": "local"},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=[split],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            corpus = Dataset.from_list(
                [{"id": d, "title": doc.title, "text": doc.text} for d, doc in data.corpus.items()]
            )
            queries = Dataset.from_list([{"id": q, "text": t} for q, t in data.queries.items()])
            relevant = {q: dict(r) for q, r in data.qrels.items()}
            self.dataset = {
                "default": {
                    split: {
                        "corpus": corpus,
                        "queries": queries,
                        "relevant_docs": relevant,
                        "top_ranked": None,
                    }
                }
            }
            self.data_loaded = True

    return LocalRetrieval()
