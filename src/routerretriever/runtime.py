"""The corpus side's runtime: what runs the base model when documents are embedded.

Documents are embedded by the frozen base model only, so the corpus pass can run faster without
touching the experts (queries, with their LoRA terms, stay on torch in float32):

- ``"torch"``: float32, the exact reference and the fallback;
- ``"bfloat16"``: torch under bfloat16 autocast (matmuls in bfloat16, layer norms and the
  residual stream in float32), for hardware that does bfloat16 natively (CPUs with AVX512-BF16
  or AMX, CUDA with bf16: :func:`routerretriever.devices.has_fast_bfloat16`); elsewhere it is
  emulated and several times slower. Measured on a 2-core CPU with AMX: 2.3-3.1x
  sentence-transformers, nDCG@10 within 0.0012 of float32 on six collections;
- ``"onnx"``: ONNX Runtime in float32 (:mod:`routerretriever.onnx_encoder`).

``"auto"`` (the default) takes bfloat16 where it is native, else ONNX Runtime on a CPU where it is
installed, else torch. A fast runtime is checked against float32 on probe texts before use
(cosine ≥ :data:`MIN_COSINE`): ``"auto"`` falls back (logged), an explicit one raises. Cache files
name the runtime that made them (:mod:`routerretriever.store`), so vectors never mix.

    >>> rt = corpus_runtime(enc, cache_dir)           # e.g. CorpusRuntime(name="bfloat16", ...)
    >>> rt.encode(enc, texts)                         # the base model's document vectors
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from routerretriever.devices import has_fast_bfloat16
from routerretriever.encoder import Encoder
from routerretriever.onnx_encoder import MIN_COSINE, PROBES, onnx_model, onnx_usable

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx", "bfloat16"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx", "bfloat16")

__all__ = [
    "BACKENDS",
    "MIN_COSINE",
    "Backend",
    "CorpusRuntime",
    "corpus_runtime",
    "planned_runtime",
]


@dataclass(frozen=True)
class CorpusRuntime:
    """One runtime of the base model for documents; ``name`` is what cache files are keyed by."""

    name: str  # "torch", "onnx" or "bfloat16"
    model: torch.nn.Module | None = None  # the ONNX Runtime session, for "onnx"
    autocast: torch.dtype | None = None  # torch.bfloat16, for "bfloat16"

    def encode(self, encoder: Encoder, texts: list[str], **kwargs: Any) -> np.ndarray:
        """``encoder.encode`` on this runtime (``kwargs``: batch size, progress, description)."""
        return encoder.encode(texts, model=self.model, autocast=self.autocast, **kwargs)


TORCH = CorpusRuntime("torch")
BFLOAT16 = CorpusRuntime("bfloat16", autocast=torch.bfloat16)


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {repr(backend)[:40]}")


def planned_runtime(encoder: Encoder, backend: Backend = "auto") -> str:
    """The runtime :func:`corpus_runtime` will try first (cheap: loads and runs nothing), so a
    cached file of it can be read before any fast path is set up."""
    _check(backend)
    if backend != "auto":
        return backend
    if has_fast_bfloat16(encoder.device):
        return "bfloat16"
    return "onnx" if onnx_usable(encoder) else "torch"


# Per encoder: the lowest probe cosine of its bfloat16 pass (measured once).
_BF16_COSINE: weakref.WeakKeyDictionary[Encoder, float] = weakref.WeakKeyDictionary()


def _bfloat16_cosine(encoder: Encoder) -> float:
    if encoder not in _BF16_COSINE:
        ref = encoder.encode(PROBES, show_progress=False)
        got = BFLOAT16.encode(encoder, list(PROBES), show_progress=False)
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        got /= np.linalg.norm(got, axis=1, keepdims=True)
        _BF16_COSINE[encoder] = float((ref * got).sum(axis=1).min())
    return _BF16_COSINE[encoder]


def _bfloat16(encoder: Encoder, explicit: bool) -> CorpusRuntime | None:
    first = encoder not in _BF16_COSINE  # say things once per encoder, not once per batch
    cosine = _bfloat16_cosine(encoder)
    if cosine >= MIN_COSINE:
        if explicit and first and not has_fast_bfloat16(encoder.device):
            logger.warning("bfloat16 is emulated on %s here: slower than float32", encoder.device)
        return BFLOAT16
    why = f"bfloat16 gives vectors at cosine {cosine:.5f} to float32's (below {MIN_COSINE})"
    if explicit:
        raise RuntimeError(f"the bfloat16 path cannot be used: {why}")
    logger.info("not encoding in bfloat16: %s", why)
    return None


def corpus_runtime(
    encoder: Encoder, cache_dir: str | os.PathLike[str], backend: Backend = "auto"
) -> CorpusRuntime:
    """The runtime that embeds documents for ``backend`` (module docstring); ``cache_dir``
    holds the exported ONNX graph."""
    _check(backend)
    if backend == "torch":
        return TORCH
    if backend == "bfloat16" or planned_runtime(encoder, backend) == "bfloat16":
        if (fast := _bfloat16(encoder, explicit=backend == "bfloat16")) is not None:
            return fast
        if not onnx_usable(encoder, "auto"):
            return TORCH
    model = onnx_model(encoder, cache_dir, "onnx" if backend == "onnx" else "auto")
    return TORCH if model is None else CorpusRuntime("onnx", model=model)
