"""On-disk cache of corpus embeddings, shared by every expert.

Documents are always embedded by the frozen base model, so one set of corpus embeddings serves
the base model and every expert. The cache key is the encoder's fingerprint (weights and encoding
settings) plus a fingerprint of the corpus contents (ids, titles, texts, in order), and the
runtime that made the vectors when it is not the torch float32 reference (``-onnx``): a file
holds one runtime's vectors, and an explicit ``backend`` reads only its own runtime's file;
``"auto"`` also takes the reference file (e.g. one Ray filled) rather than encode again. Files
are written to a temporary name and renamed, so a killed run never leaves a file that reads as
valid.
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
from routerretriever.onnx_encoder import Backend, onnx_model, onnx_usable

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


def _spot_check(encoder: Encoder, corpus: Corpus, ids: list[str], emb: np.ndarray) -> bool:
    """Re-encode a few documents (fixed by the corpus, spread over it) and compare their rows:
    a file that parses but holds other vectors (shuffled rows, another model's) is caught."""
    rows = sorted({int(i) for i in np.linspace(0, len(ids) - 1, num=min(SPOT_CHECKS, len(ids)))})
    fresh = encoder.encode(
        [corpus[ids[i]].full_text for i in rows], batch_size=SPOT_CHECKS, show_progress=False
    )
    return bool(np.allclose(fresh, emb[rows], atol=1e-3))


@dataclass
class CorpusEmbeddings:
    """Corpus ids and their base-model embeddings ``(n, dim)``; ``cached`` tells if read from disk."""

    ids: list[str]
    embeddings: np.ndarray
    cached: bool
    backend: str = "torch"  # the runtime that made them: "torch" or "onnx"


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
    ``backend`` runs the base model on torch or ONNX Runtime (``"auto"``: ONNX Runtime on a CPU
    where it works; :func:`routerretriever.onnx_encoder.onnx_model`).
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

    def cached(runtime: str) -> CorpusEmbeddings | None:
        if not use_cache:
            return None
        emb = read(Path(f"{stem}-onnx.npz" if runtime == "onnx" else f"{stem}.npz"))
        if emb is None:
            return None
        return CorpusEmbeddings(ids, emb, cached=True, backend=runtime)

    # "auto" takes either file, its own runtime's first: the torch float32 file is the exact
    # reference (and what Ray's embedder writes). "onnx" and "torch" read their own file only.
    model = None
    if embedder is None and onnx_usable(encoder, backend):
        if (hit := cached("onnx")) or (backend == "auto" and (hit := cached("torch"))):
            return hit
        model = onnx_model(encoder, root, backend)  # None: "auto" fell back to torch
    made = "torch" if model is None else "onnx"
    if made == "torch" and (hit := cached("torch")):
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
        emb = encoder.encode(
            texts, batch_size=batch_size, show_progress=show_progress, model=model, desc="corpus"
        )
    if use_cache:
        path = Path(f"{stem}-onnx.npz" if made == "onnx" else f"{stem}.npz")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, ids=np.array(ids, dtype=str), embeddings=emb)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(path, write)
        logger.info("cached corpus embeddings in %s", path)
    return CorpusEmbeddings(ids, emb, cached=False, backend=made)
