"""Experts: PEFT LoRA adapters on the query side of the frozen base encoder, and their store.

An expert is a folder ``STORE/NAME/`` holding a standard PEFT adapter (``adapter_config.json``
and ``adapter_model.safetensors``, loadable by plain ``peft`` on top of the base model) and
``expert.json`` (name, base-model fingerprint, training-data fingerprint, hyper-parameters, dev
metrics, time taken). Folders are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from routerretriever.config import check_table
from routerretriever.encoder import BASE, Encoder
from routerretriever.errors import ModelError
from routerretriever.files import atomic_dir, recover_dir

logger = logging.getLogger(__name__)

METADATA = "expert.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class ExpertInfo:
    """What ``expert.json`` records about an expert."""

    name: str
    base_model: str  # the base model folder or hub id it was trained on
    base_fingerprint: str  # Encoder.weights_fingerprint of that model
    data_fingerprint: str = ""
    source: str = ""  # e.g. "beir/scifact train split" or "pseudo-queries from corpus"
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    dev: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    version: int = 1

    @classmethod
    def read(cls, folder: Path) -> ExpertInfo:
        path = folder / METADATA
        if not path.is_file():
            raise ModelError(f"{folder}: no {METADATA}; not an expert folder")
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            check_table(known, typing.get_type_hints(cls), "a field")  # other keys: left alone
            return cls(**known)
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ModelError(f"{path}: unreadable expert metadata ({e})") from None


def check_name(name: str) -> str:
    """Expert names become folder and adapter names: keep them plain."""
    if (
        not name
        or name == BASE
        or not all(c.isalnum() or c in "-_." for c in name)
        or name[0] == "."
    ):
        raise ValueError(
            f"invalid expert name {name!r}: use letters, digits, '-', '_' or '.', not starting "
            f"with '.', and not {BASE!r}"
        )
    return name


def check_folder(folder: str | Path, encoder: Encoder | None = None) -> ExpertInfo:
    """Validate an expert folder: metadata, safetensors weights, and the base model it needs."""
    folder = Path(folder)
    recover_dir(folder)  # a replacement killed half-way leaves the old folder aside
    if not folder.is_dir():
        raise ModelError(f"expert folder {folder} does not exist")
    info = ExpertInfo.read(folder)
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        hint = f" (found {pickled}: pickle formats are refused)" if pickled else ""
        raise ModelError(f"{folder}: no {ADAPTER_WEIGHTS}{hint}")
    if pickled:
        raise ModelError(f"{folder}: contains pickle files {pickled}; refusing to load")
    if encoder is not None and info.base_fingerprint != encoder.weights_fingerprint:
        raise ModelError(
            f"{folder}: expert {info.name!r} was trained on base model {info.base_model!r} "
            f"(fingerprint {info.base_fingerprint}), but the loaded base model "
            f"{str(encoder.model_path)!r} has fingerprint {encoder.weights_fingerprint}"
        )
    return info


def load_expert(encoder: Encoder, folder: str | Path, name: str | None = None) -> ExpertInfo:
    """Load an expert folder onto ``encoder`` (under its own name unless ``name`` is given)."""
    info = check_folder(folder, encoder)
    encoder.add_adapter(check_name(name or info.name), folder)
    return info


def caveat(info: ExpertInfo) -> str | None:
    """What a user must know before relying on an expert, or ``None``: it is the base model
    exactly (training kept step 0), or it scores below the base model on its own dev data."""
    dev, base = info.dev.get("ndcg@10"), info.dev.get("base_ndcg@10")
    if info.training.get("best_step") == 0:
        return (
            f"expert {info.name} kept step 0: no training step beat the base model on its dev "
            "data, so it IS the base model (routing to it changes nothing); try another --lr, "
            "more --max-steps or more training data"
        )
    if dev is not None and base is not None and dev < base:
        return (
            f"expert {info.name} scores below the base model on its own dev data "
            f"({dev:.4f} < {base:.4f}); it may hurt the queries routed to it"
        )
    return None


def list_experts(store: str | Path) -> list[ExpertInfo]:
    """The experts in a store folder, by name; folders that are not experts are skipped."""
    store = Path(store)
    if not store.is_dir():
        raise ModelError(f"expert store {store} does not exist")
    out = []
    for old in store.glob(".*.old-*"):
        recover_dir(store / old.name[1:].rsplit(".old-", 1)[0])
    for sub in sorted(store.iterdir()):
        if sub.is_dir() and not sub.name.startswith(".") and (sub / METADATA).is_file():
            out.append(ExpertInfo.read(sub))
    return out


def write_expert_folder(target: Path, write: Callable[[Path], None], info: ExpertInfo) -> Path:
    """Write an expert into ``target`` atomically: ``write(tmp)`` fills a temp folder, then rename.

    An existing expert of the same name is replaced only once the new one is complete.
    """

    def fill(tmp: Path) -> None:
        write(tmp)
        (tmp / METADATA).write_text(json.dumps(asdict(info), indent=2) + "\n")

    return atomic_dir(target, fill)
