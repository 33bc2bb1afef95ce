"""Corpus encoding with Ray Data, for corpora larger than one machine wants to embed alone.

Documents flow through ``map_batches`` over a pool of actors, each holding one copy of the base
encoder; the result is the same ``(ids, embeddings)`` as :func:`routerretriever.store.embed_corpus`
computes in one process. On a laptop ``ray.init()`` starts a local Ray; on a cluster, connect
first (``ray.init(address="auto")`` on a cluster node, or ``ray://head:10001``) and every node
needs this package and the base model installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from routerretriever.data import Corpus
from routerretriever.encoder import Encoder

logger = logging.getLogger(__name__)


class _EncodeActor:
    """One base encoder per Ray actor; turns a batch of texts into embeddings."""

    def __init__(self, model: str, settings: dict[str, Any], batch_size: int, threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.encoder = Encoder.load(model, device="cpu", **settings)  # actors ask for CPUs only
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encoder.encode(
            [str(t) for t in batch["text"]], batch_size=self.batch_size, show_progress=False
        )
        return {"id": batch["id"], "embedding": emb}


def encode_corpus_ray(
    encoder: Encoder,
    corpus: Corpus,
    *,
    actors: int = 2,
    batch_size: int = 32,
    rows_per_task: int = 256,
    threads_per_actor: int = 0,
) -> tuple[list[str], np.ndarray]:
    """Embed ``corpus`` with ``actors`` Ray actors; ``(ids, embeddings (n, d))`` in corpus order.

    Uses the running Ray: ``ray.init()`` it first (a local Ray, or ``address="auto"`` on a
    cluster); the library never starts one itself.
    The actors load the same base model folder and settings as ``encoder``, so the vectors match
    the single-process ones (up to float rounding). Documents are sent longest first in chunks of
    ``rows_per_task``, so each chunk pads little.
    """
    import ray

    if actors < 1:
        raise ValueError(f"actors must be positive, got {actors}")
    ids = list(corpus)
    if not ids:
        return [], np.zeros((0, encoder.dim), dtype=np.float32)
    if not ray.is_initialized():
        raise RuntimeError(
            "Ray is not running: call ray.init() first (ray.init() for a local Ray, "
            'ray.init(address="auto") on a cluster node)'
        )
    texts = [corpus[i].full_text for i in ids]
    order = sorted(range(len(ids)), key=lambda i: -len(texts[i]))
    items = [{"id": ids[i], "text": texts[i]} for i in order]
    per_task = max(1, min(rows_per_task, -(-len(items) // actors)))  # every actor gets work
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_task))
    out = ds.map_batches(
        _EncodeActor,
        batch_size=per_task,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        fn_constructor_kwargs={
            "model": str(encoder.model_path),
            "settings": asdict(encoder.settings),
            "batch_size": batch_size,
            "threads": threads_per_actor,
        },
    )
    row_of = {d: r for r, d in enumerate(ids)}
    emb = np.empty((len(ids), encoder.dim), dtype=np.float32)  # (n, d)
    seen = 0
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        rows = [row_of[str(i)] for i in batch["id"]]
        emb[rows] = np.stack(list(batch["embedding"]))
        seen += len(rows)
    if seen != len(ids):
        raise RuntimeError(f"Ray returned {seen} embeddings for {len(ids)} documents")
    logger.info("encoded %d documents with %d Ray actors", len(ids), actors)
    return ids, emb


def ray_embedder(encoder: Encoder, **kwargs: Any) -> Callable[[Corpus], np.ndarray]:
    """An ``embedder`` for :func:`routerretriever.store.embed_corpus` that encodes with Ray, so
    the result lands in the same on-disk cache; ``kwargs`` go to :func:`encode_corpus_ray`."""

    def embed(corpus: Corpus) -> np.ndarray:
        return encode_corpus_ray(encoder, corpus, **kwargs)[1]

    return embed
