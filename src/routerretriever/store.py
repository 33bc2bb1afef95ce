"""On-disk cache of corpus embeddings, shared by every expert.

Documents are always embedded by the frozen base model, so one set of corpus embeddings serves
the base model and every expert. The cache key is the encoder's fingerprint (weights and encoding
settings) plus a fingerprint of the corpus contents (ids, titles, texts, in order), and the
runtime that made the vectors when it is not the torch float32 reference (``-onnx``,
``-bfloat16``; :mod:`routerretriever.runtime`): a file holds one runtime's vectors, and an
explicit ``backend`` reads only its own runtime's file; ``"auto"`` also takes the reference file
(e.g. one Ray filled) rather than encode again. Files are written to a temporary name and
renamed, so a killed run never leaves a file that reads as valid.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routerretriever.data import Corpus
from routerretriever.encoder import Encoder
from routerretriever.files import atomic_write, default_cache_dir
from routerretriever.runtime import TORCH, Backend, corpus_runtime, planned_runtime

logger = logging.getLogger(__name__)


def corpus_fingerprint(corpus: Corpus) -> str:
    """sha256 (16 hex digits) of the corpus ids and texts, in order."""
    h = hashlib.sha256()
    for doc_id, doc in corpus.items():
        h.update(doc_id.encode())
        h.update(b"\0")
        h.update(doc.title.encode())
        h.update(b"\0")
        h.update(doc.text.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


SPOT_CHECKS = 3  # cached rows re-encoded on every load to catch a stale or tampered file
SPOT_COSINE = 0.999  # below any runtime's rounding (bfloat16: 0.9999), far above another text's


def _spot_check(encoder: Encoder, corpus: Corpus, ids: list[str], emb: np.ndarray) -> bool:
    """Re-encode a few documents (fixed by the corpus, spread over it) in float32 and compare
    their rows: a file that parses but holds other vectors (shuffled rows, another model's) is
    caught, while any runtime's rounding (bfloat16's included) passes."""
    rows = sorted({int(i) for i in np.linspace(0, len(ids) - 1, num=min(SPOT_CHECKS, len(ids)))})
    fresh = encoder.encode(
        [corpus[ids[i]].full_text for i in rows], batch_size=SPOT_CHECKS, show_progress=False
    )
    got = emb[rows].astype(np.float64)
    norms = np.linalg.norm(fresh, axis=1) * np.linalg.norm(got, axis=1)
    cosine = (fresh * got).sum(axis=1) / np.maximum(norms, 1e-12)
    ratio = np.linalg.norm(got, axis=1) / np.maximum(np.linalg.norm(fresh, axis=1), 1e-12)
    near = np.abs(fresh - got).max(axis=1) <= 1e-3  # also where both are (near) zero
    return bool((near | ((cosine >= SPOT_COSINE) & (np.abs(ratio - 1) <= 1e-2))).all())


@dataclass
class CorpusEmbeddings:
    """Corpus ids and their base-model embeddings ``(n, dim)``; ``cached`` tells if read from disk."""

    ids: list[str]
    embeddings: np.ndarray
    cached: bool
    backend: str = "torch"  # the runtime that made them: "torch", "onnx" or "bfloat16"


def embed_corpus(
    encoder: Encoder,
    corpus: Corpus,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    show_progress: bool | None = None,
    embedder: Callable[[Corpus], np.ndarray] | None = None,
    backend: Backend = "auto",
) -> CorpusEmbeddings:
    """Embed a corpus with the base model, reading and filling the on-disk cache.

    A cache file that cannot be read, or that does not match the corpus, is logged and rebuilt.
    ``embedder`` computes a missing entry another way (e.g. with Ray:
    :func:`routerretriever.distributed.ray_embedder`); it must give the base model's vectors.
    ``backend`` is the base model's runtime for documents (:mod:`routerretriever.runtime`;
    ``"auto"``: bfloat16 where the hardware does it natively, else ONNX Runtime on a CPU).
    """
    ids = list(corpus)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = root / "corpus" / f"{encoder.fingerprint}-{corpus_fingerprint(corpus)}"

    def read(path: Path) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                cached_ids, emb = f["ids"].tolist(), f["embeddings"]
            if cached_ids != ids or emb.shape != (len(ids), encoder.dim):
                logger.warning("%s does not match the corpus; re-encoding", path)
            elif not np.isfinite(emb).all():
                logger.warning("%s holds NaN or infinite values; re-encoding", path)
            elif not _spot_check(encoder, corpus, ids, emb):
                logger.warning("%s: rows do not match their documents; re-encoding", path)
            else:
                logger.info("re-using corpus embeddings from %s", path)
                return emb.astype(np.float32, copy=False)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            logger.warning("cannot read cached embeddings %s (%s); re-encoding", path, e)
        return None

    def path_of(runtime: str) -> Path:
        return Path(f"{stem}.npz" if runtime == "torch" else f"{stem}-{runtime}.npz")

    tried: set[str] = set()

    def cached(runtime: str) -> CorpusEmbeddings | None:
        if not use_cache or runtime in tried:
            return None
        tried.add(runtime)
        emb = read(path_of(runtime))
        if emb is None:
            return None
        return CorpusEmbeddings(ids, emb, cached=True, backend=runtime)

    # "auto" takes either file, its own runtime's first: the torch float32 file is the exact
    # reference (and what Ray's embedder writes). An explicit backend reads its own file only.
    runtime = TORCH
    if embedder is None and (plan := planned_runtime(encoder, backend)) != "torch":
        if (hit := cached(plan)) or (backend == "auto" and (hit := cached("torch"))):
            return hit
        runtime = corpus_runtime(encoder, root, backend)  # may fall back where "auto"
    made = runtime.name
    if hit := cached(made):
        return hit
    if embedder is not None:
        emb = np.asarray(embedder(corpus), dtype=np.float32)
        if emb.shape != (len(ids), encoder.dim):
            raise ValueError(
                f"embedder gave shape {emb.shape}, expected ({len(ids)}, {encoder.dim})"
            )
    else:
        texts = [doc.full_text for doc in corpus.values()]
        logger.info("embedding %d documents (not in the cache yet; %s)", len(texts), made)
        emb = runtime.encode(
            encoder, texts, batch_size=batch_size, show_progress=show_progress, desc="corpus"
        )
    if use_cache:
        path = path_of(made)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, ids=np.array(ids, dtype=str), embeddings=emb)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(path, write)
        logger.info("cached corpus embeddings in %s", path)
    return CorpusEmbeddings(ids, emb, cached=False, backend=made)
