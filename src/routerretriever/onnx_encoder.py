"""The base model's transformer on ONNX Runtime: the corpus side's fast path on a CPU.

Documents are embedded by the frozen base model only, so the corpus pass can run on another
runtime without touching the experts (query passes, with their LoRA terms, stay on torch). The
transformer is exported once per base weights with ``torch.onnx.export`` (eager attention, so the
padding mask is a graph input, not a constant) into the cache folder, written atomically, and
checked against torch on probe texts before use; pooling and normalisation stay in
:meth:`Encoder.pool`. In float32 it gives the torch path's vectors (cosine 1.0000, the same
nDCG@10 on six collections) 1.16-1.20x faster than sentence-transformers on a 2-core AVX2 CPU
(docs/results.md). Why not ``optimum``: installing it downgrades ``transformers`` here; the
plain exporter needs only the ``onnx`` package.

    >>> model = onnx_model(enc, cache_dir)            # None where it cannot be used
    >>> enc.encode(texts, model=model)                # same vectors, faster
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch

from routerretriever.encoder import Encoder, load_base_weights
from routerretriever.files import atomic_write

logger = logging.getLogger(__name__)

OnnxBackend = Literal["auto", "torch", "onnx"]
ONNX_BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx")

_EXPORT_VERSION = 1  # bump when the exported graph changes, to invalidate exported files
_OPSET = 17
MIN_COSINE = 0.9999  # an exported graph must give torch's vectors to this cosine, else unused
#: texts embedded by both runtimes before an exported graph is used
PROBES = (
    "a short probe",
    "A longer probe text, so that the probe batch has padding in it, as every real batch does.",
)


class OnnxModel(torch.nn.Module):
    """An ONNX Runtime session behind the interface :meth:`Encoder.forward` calls a model with:
    ``model(input_ids=..., attention_mask=...)`` returning an object with ``last_hidden_state``."""

    def __init__(self, session: Any, path: Path) -> None:
        super().__init__()
        self.session = session
        self.path = path

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        feed = {
            "input_ids": input_ids.cpu().numpy(),
            "attention_mask": attention_mask.cpu().numpy(),
        }
        (hidden,) = self.session.run(None, feed)  # (B, L, d) float32
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.asarray(hidden)))


class _Transformer(torch.nn.Module):
    """The base model's token states from ids and mask only (what the graph takes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_path(encoder: Encoder, cache_dir: str | os.PathLike[str]) -> Path:
    """Where the base model's exported graph lives: keyed by its weights and the exporter."""
    name = f"{encoder.weights_fingerprint}-v{_EXPORT_VERSION}-opset{_OPSET}.onnx"
    return Path(cache_dir) / "onnx" / name


def export_onnx(encoder: Encoder, path: Path) -> None:
    """Export the base model's transformer to ``path`` (atomically: a killed export leaves no
    file that a later run would load)."""
    # Eager attention: the SDPA path traces the padding mask into a constant.
    model = load_base_weights(encoder.model_path, attn_implementation="eager").eval()
    ids = encoder.collate(encoder.tokenize(PROBES))
    args = (ids["input_ids"].cpu(), ids["attention_mask"].cpu())
    axes = {0: "batch", 1: "tokens"}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            torch.onnx.export(
                _Transformer(model),
                args,
                str(tmp),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                opset_version=_OPSET,
                dynamo=False,
            )

    atomic_write(path, write)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: no per-session chatter on stderr
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _agrees(encoder: Encoder, model: OnnxModel) -> float:
    """Lowest cosine between torch's and the graph's vectors of the probe texts."""
    ref = encoder.encode(PROBES, show_progress=False)
    got = encoder.encode(PROBES, show_progress=False, model=model)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    return float((ref * got).sum(axis=1).min())


def onnx_usable(encoder: Encoder, backend: OnnxBackend = "auto") -> bool:
    """Whether :func:`onnx_model` will try ONNX Runtime (cheap: imports nothing)."""
    if backend == "onnx":
        return True
    return (
        backend == "auto"
        and encoder.device.type == "cpu"
        and all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    )


# Per encoder: its loaded graph, or None where "auto" found none usable (not tried again).
_LOADED: weakref.WeakKeyDictionary[Encoder, OnnxModel | None] = weakref.WeakKeyDictionary()


def onnx_model(
    encoder: Encoder, cache_dir: str | os.PathLike[str], backend: OnnxBackend = "auto"
) -> OnnxModel | None:
    """The base model on ONNX Runtime for ``encoder.encode(..., model=...)``, or ``None`` for
    the torch path.

    ``backend="torch"`` gives ``None``; ``"onnx"`` raises :class:`RuntimeError` where the graph
    cannot be exported, loaded or does not match torch; ``"auto"`` (the default) uses ONNX
    Runtime on a CPU where it works and logs why not otherwise.
    """
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(ONNX_BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return None
    if encoder in _LOADED and (_LOADED[encoder] is not None or backend == "auto"):
        return _LOADED[encoder]
    try:
        if encoder.device.type != "cpu":
            raise RuntimeError(
                f"the ONNX path runs on the CPU; this encoder is on {encoder.device}"
            )
        path = onnx_path(encoder, cache_dir)
        if not path.is_file():
            logger.info("exporting the base model to ONNX (once per model): %s", path)
            export_onnx(encoder, path)
        model = OnnxModel(_session(path, torch.get_num_threads()), path)
        cosine = _agrees(encoder, model)
        if cosine < MIN_COSINE:
            raise RuntimeError(
                f"{path} gives vectors at cosine {cosine:.5f} to torch's (below {MIN_COSINE}); "
                "delete it to export again"
            )
    except Exception as e:  # noqa: BLE001 - any failure of an optional fast path
        if backend == "onnx":
            raise RuntimeError(f"the ONNX Runtime path cannot be used: {e}") from e
        logger.info("encoding with torch (the ONNX Runtime path is unavailable: %s)", e)
        _LOADED[encoder] = None
        return None
    _LOADED[encoder] = model
    return model
