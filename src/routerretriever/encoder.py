"""The frozen base encoder: a Hugging Face transformer plus pooling, normalisation and similarity.

Pooling, normalisation and the maximum length come from the model's own sentence-transformers
files (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``) when present;
otherwise mean pooling, no normalisation and dot product (the Contriever recipe). Weights are read
from safetensors only. Encoding sorts texts by token length and pads per batch, which is what makes
it fast on a CPU.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from routerretriever.batch_plan import plan_batches
from routerretriever.devices import resolve_device
from routerretriever.lora import Adapter, cut_layers, read_adapter, with_row_experts
from routerretriever.model_folder import (
    check_model_folder,
    default_model_path,
    read_st_settings,
    resolve_folder,
    weights_digest,
)

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max"]
Similarity = Literal["cosine", "dot"]

_FINGERPRINT_VERSION = 1  # bump when encoding semantics change, to invalidate cached embeddings
_TOKENIZE_CHUNK = 16384  # texts tokenised and length-sorted at a time, to bound memory
BASE = "__base__"  # the base model's name in an expert pool (never an expert's name)


def load_base_weights(folder: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoModel.from_pretrained`` from safetensors, without transformers' "Loading weights"
    bar: a library call does not print (a bar the caller turned off stays off)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(folder, use_safetensors=True, **kwargs)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class EncoderSettings:
    """How texts become vectors; part of every cache key. ``None`` fields are read from the model."""

    pooling: Pooling
    normalize: bool
    max_length: int
    similarity: Similarity

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls", "max"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {self.pooling!r}")
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")


LOG_EVERY_S = 15.0  # without a terminal, long encodings log their progress this often


class _LogProgress:
    """tqdm's ``update`` as an INFO log line at most every :data:`LOG_EVERY_S` seconds, for runs
    whose output is not a terminal (logs, CI, spawned jobs): long work is never silent."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S and self.done < self.total:
            logger.info("%s: %d of %d texts", self.desc, self.done, self.total)
            self.last = now

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Encoder:
    """A frozen transformer that turns texts into ``float32`` vectors of shape ``(n, dim)``.

    Example:
        >>> enc = Encoder.load()                      # all-MiniLM-L6-v2, cosine
        >>> enc.encode(["a query", "another"]).shape
        (2, 384)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        settings: EncoderSettings,
        model_path: Path,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_path = model_path
        self.device = torch.device(device)
        self._fingerprint: str | None = None
        # Hugging Face's fast tokenizers are not safe to call from several threads at once
        # (truncation settings leak between calls, or "Already borrowed"); a server does that.
        self._tokenizer_lock = threading.Lock()
        # Each loaded expert (lora.Adapter): a shallow copy of the base model whose targeted
        # layers hold merged weights (the base model itself is never modified), and its LoRA
        # factors, for batches that mix experts.
        self._adapters: dict[str, Adapter] = {}
        self._variants: dict[tuple[int | None, torch.dtype | None], torch.nn.Module] = {}

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        similarity: Similarity | None = None,
        device: str | torch.device = "auto",
    ) -> Encoder:
        """Load a base model folder or hub id (default: the packaged all-MiniLM-L6-v2) onto
        ``device`` (:func:`routerretriever.devices.resolve_device`: a CUDA GPU where there is one).

        Settings left ``None`` come from the model's sentence-transformers files, else mean
        pooling, no normalisation, the tokenizer's max length and (cosine if normalised else dot).
        """
        from transformers import AutoTokenizer

        device = resolve_device(device)  # a bad name fails before any weights load
        folder = resolve_folder(
            str(name_or_path) if name_or_path is not None else default_model_path()
        )
        check_model_folder(folder)
        st = read_st_settings(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_base_weights(folder)
        model.eval().requires_grad_(False).to(device)
        tok_max = getattr(tokenizer, "model_max_length", None) or 512
        pos_max = getattr(model.config, "max_position_embeddings", None) or 512
        norm = st.get("normalize", False) if normalize is None else normalize
        settings = EncoderSettings(
            pooling=pooling or st.get("pooling", "mean"),
            normalize=norm,
            max_length=max_length or st.get("max_length") or min(int(tok_max), int(pos_max)),
            similarity=similarity or ("cosine" if norm else "dot"),
        )
        if settings.similarity == "cosine" and not settings.normalize:
            # Cosine over unnormalised vectors needs normalising; inner product then equals cosine.
            settings = EncoderSettings(settings.pooling, True, settings.max_length, "cosine")
        logger.info("loaded %s with %s", folder, settings)
        return cls(model, tokenizer, settings, folder, device)

    @property
    def dim(self) -> int:
        return int(cast(Any, self.model).config.hidden_size)

    @functools.cached_property
    def weights_digest(self) -> str:
        """sha256 of the base model's config and weights (read once per encoder)."""
        return weights_digest(self.model_path)

    @property
    def weights_fingerprint(self) -> str:
        """Identifies the base weights alone (what an expert was trained on top of)."""
        return self.weights_digest[:16]

    @property
    def fingerprint(self) -> str:
        """Identifies the base weights and encoding settings: equal fingerprints, equal vectors."""
        if self._fingerprint is None:
            payload = json.dumps(
                {
                    "weights": self.weights_digest,
                    "settings": asdict(self.settings),
                    "version": _FINGERPRINT_VERSION,
                },
                sort_keys=True,
            )
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return self._fingerprint

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_length`` (default: the encoder's), unpadded."""
        with self._tokenizer_lock:
            out = self.tokenizer(
                list(texts),
                truncation=True,
                max_length=max_length or self.settings.max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        return out["input_ids"]

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad token id lists to the longest one: ``input_ids`` and ``attention_mask`` (B, L)."""
        longest = max(len(x) for x in ids)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(ids), longest), dtype=np.int64)  # (B, L)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states ``(B, L, d)`` and mask ``(B, L)`` to sentence vectors ``(B, d)``."""
        pooling = self.settings.pooling
        if pooling == "cls":
            emb = hidden[:, 0]
        elif pooling == "max":
            emb = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).max(dim=1).values
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            emb = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # (B, d)
        if self.settings.normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
        return emb

    @property
    def num_layers(self) -> int:
        """Transformer layers of the base model."""
        return int(cast(Any, self.model).config.num_hidden_layers)

    def variant(
        self, layers: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.nn.Module:
        """The base model cut after its first ``layers`` layers and/or cast to ``dtype``.

        A cheaper routing pass (see ``RouterRetriever``): a cut shares the base weights; a cast
        holds its own copy. Made once and kept.
        """
        if layers is not None and not 1 <= layers <= self.num_layers:
            raise ValueError(f"layers must be in 1..{self.num_layers}, got {layers}")
        layers = None if layers == self.num_layers else layers
        dtype = None if dtype == self.model.dtype else dtype
        key = (layers, dtype)
        if key == (None, None):
            return self.model
        if key not in self._variants:
            net = self.model if layers is None else cut_layers(self.model, layers)
            self._variants[key] = net if dtype is None else copy.deepcopy(net).to(dtype)
        return self._variants[key]

    # -- experts (LoRA adapters on the query side) -------------------------------------------

    @property
    def experts(self) -> list[str]:
        """Names of the experts loaded on this base model."""
        return sorted(self._adapters)

    @property
    def expert_dirs(self) -> dict[str, Path]:
        """Where each loaded expert came from."""
        return {name: a.folder for name, a in self._adapters.items()}

    def add_adapter(self, name: str, folder: str | os.PathLike[str]) -> None:
        """Load a PEFT LoRA adapter folder as expert ``name`` (see :func:`lora.read_adapter`;
        checks of the folder live in ``experts.py``)."""
        if name in self._adapters:
            raise ValueError(f"an expert named {name!r} is already loaded; remove it first")
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model")
        self._adapters[name] = read_adapter(folder, self.model)

    def is_identity(self, name: str) -> bool:
        """True when expert ``name`` leaves the base model unchanged (all LoRA B weights zero):
        an expert that early stopping kept at step 0, run as the base model."""
        return self._adapters[name].identity if name in self._adapters else False

    def remove_adapter(self, name: str) -> None:
        """Unload expert ``name``; the base model's own weights are untouched throughout."""
        if name not in self._adapters:
            raise ValueError(f"unknown expert {name!r}; loaded: {self.experts}")
        del self._adapters[name]

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        model: torch.nn.Module | None = None,
        expert: str | None = None,
    ) -> torch.Tensor:
        """Embed one collated batch ``(B, L)`` to ``(B, d)``; keeps autograd.

        ``model`` swaps in another module (training does this); ``expert`` applies a loaded
        expert's merged weights to the base model for this call only.
        """
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if model is not None:
            out = model(**inputs)
        elif expert is not None:
            out = self._adapters[expert].merged(**inputs)
        else:
            out = self.model(**inputs)
        return self.pool(out.last_hidden_state.float(), batch["attention_mask"])

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        show_progress: bool | None = None,
        model: torch.nn.Module | None = None,
        experts: str | Sequence[str | None] | None = None,
        layers: int | None = None,
        dtype: torch.dtype | None = None,
        autocast: torch.dtype | None = None,
        desc: str = "encoding",
    ) -> np.ndarray:
        """Embed texts: ``float32`` array ``(len(texts), dim)``, rows in input order.

        Texts are sorted by token length so each batch pads little; the output does not depend
        on the input order beyond that. ``show_progress=None`` shows a bar on a terminal only.
        ``model`` swaps in another module with the same interface (e.g. the base plus a LoRA).
        ``experts`` applies a loaded expert to every text (a name) or per text (a list, ``None``
        meaning the base model); a batch may mix experts (each row its own LoRA term on the
        shared base; on a GPU only leftovers do: :mod:`routerretriever.batch_plan`). ``layers``
        and ``dtype`` run :meth:`variant` of the base model instead (a cheaper routing pass).
        ``autocast`` runs the passes under :func:`torch.autocast` in that dtype (matmuls in it,
        layer norms and the residual stream in float32: the corpus side's bfloat16 runtime).
        """
        texts = list(texts)
        model = self._variant_model(layers, dtype, model, experts)
        if autocast is not None and (model is not None or dtype is not None):
            raise ValueError("autocast applies to the torch model in float32, not with model/dtype")
        per_text = self._per_text_experts(experts, len(texts), model)
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (n, d)
        disable = None if show_progress is None else not show_progress  # None: only on a TTY
        bar: Any
        if show_progress is None and not sys.stderr.isatty():
            bar = _LogProgress(desc, len(texts))  # no terminal: a log line now and then instead
        else:
            bar = tqdm(total=len(texts), desc=desc, unit="text", disable=disable, leave=False)
        with bar:
            for start in range(0, len(texts), _TOKENIZE_CHUNK):
                chunk = slice(start, start + _TOKENIZE_CHUNK)
                ids = self.tokenize(texts[chunk])
                names = None if per_text is None else per_text[chunk]
                out[chunk] = self._encode_tokens(ids, names, batch_size, model, bar, autocast)
        return out

    def encode_tokens(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int = 32,
        experts: str | Sequence[str | None] | None = None,
        layers: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> np.ndarray:
        """:meth:`encode` for texts already :meth:`tokenize`-d (routing embeds them twice)."""
        model = self._variant_model(layers, dtype, None, experts)
        per_text = self._per_text_experts(experts, len(token_ids), model)
        with tqdm(total=len(token_ids), disable=True) as bar:
            return self._encode_tokens(token_ids, per_text, batch_size, model, bar)

    def _variant_model(
        self,
        layers: int | None,
        dtype: torch.dtype | None,
        model: torch.nn.Module | None,
        experts: Any,
    ) -> torch.nn.Module | None:
        if layers is None and dtype is None:
            return model
        if model is not None or experts is not None:
            raise ValueError(
                "layers and dtype apply to the base model only, not with model/experts"
            )
        net = self.variant(layers, dtype)
        return None if net is self.model else net

    def _per_text_experts(
        self, experts: str | Sequence[str | None] | None, n: int, model: torch.nn.Module | None
    ) -> list[str | None] | None:
        if experts is None:
            return None
        per_text: list[str | None] = [experts] * n if isinstance(experts, str) else list(experts)
        if len(per_text) != n:
            raise ValueError(f"experts has {len(per_text)} entries for {n} texts")
        unknown = sorted({e for e in per_text if e is not None} - set(self.experts))
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; loaded: {self.experts}")
        if model is not None and any(e is not None for e in per_text):
            raise ValueError("pass either model or experts, not both")
        return per_text

    def _encode_tokens(
        self,
        ids: Sequence[Sequence[int]],
        per_text: Sequence[str | None] | None,
        batch_size: int,
        model: torch.nn.Module | None,
        bar: Any,
        autocast: torch.dtype | None = None,
    ) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.empty((len(ids), self.dim), dtype=np.float32)  # (n, d)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
        names = [None] * len(ids) if per_text is None else per_text
        names = [None if e is not None and self.is_identity(e) else e for e in names]
        net = model if model is not None else self.model
        was_training = net.training
        net.eval()
        try:
            cast = torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None)
            with torch.inference_mode(), cast:
                for rows in plan_batches(ids, order, names, batch_size, self.device.type):
                    batch = self.collate([ids[i] for i in rows])
                    experts = {names[i] for i in rows}
                    if len(experts) == 1:
                        emb = self.forward(batch, model, experts.pop())
                    else:  # rows of several experts: base weights plus each row's LoRA term
                        emb = self._forward_mixed(batch, [names[i] for i in rows])
                    out[rows] = emb.float().cpu().numpy()  # (B, d)
                    bar.update(len(rows))
        finally:
            net.train(was_training)
        return out

    def _forward_mixed(
        self, batch: dict[str, torch.Tensor], names: Sequence[str | None]
    ) -> torch.Tensor:
        """One pass over a batch whose rows use different experts (``None``: the base model)."""
        rows: dict[str, list[int]] = {}
        for j, name in enumerate(names):
            if name is not None:
                rows.setdefault(name, []).append(j)
        device = batch["input_ids"].device
        index = {e: torch.tensor(r, device=device) for e, r in rows.items()}
        return self.forward(batch, with_row_experts(self.model, index, self._adapters))
