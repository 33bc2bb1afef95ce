"""LoRA experts on a shared base model, and the module surgery they need.

An expert is a PEFT LoRA adapter folder. It is applied two ways, both leaving the base model's
own weights untouched: merged (a shallow copy of the base model whose targeted layers hold
``W + scale * B @ A``, every other weight shared, so an expert pass costs exactly a base pass),
and as factors (``A``, ``scale * B``) added per row, for a batch whose rows use different experts
(:func:`with_row_experts`). :func:`cut_layers` makes the cheaper routing variant.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from routerretriever.config import check_table
from routerretriever.errors import ModelError

Factors = dict[
    str, tuple[torch.Tensor, torch.Tensor]
]  # module path -> (A (r, in), scale*B (out, r))


@dataclass(frozen=True)
class Adapter:
    """One loaded expert: its merged copy of the base model and its LoRA factors."""

    folder: Path
    merged: torch.nn.Module
    factors: Factors
    identity: bool  # all B weights zero: exactly the base model (early stopping kept step 0)


def read_adapter(folder: str | os.PathLike[str], model: torch.nn.Module) -> Adapter:
    """Load a PEFT LoRA adapter folder onto ``model`` (checks of the folder: ``experts.py``).

    Standard LoRA only (no DoRA, no rank or alpha patterns); the weights are read from
    ``adapter_model.safetensors`` only.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        check_table(cfg, {"r": int, "lora_alpha": float, "peft_type": str}, "it", strict=False)
        if not (cfg.get("r", 0) >= 1 and cfg.get("lora_alpha", 0) > 0):
            raise ValueError("r must be a positive integer and lora_alpha a positive number")
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ModelError(f"{folder}: unreadable adapter_config.json ({e})") from None
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if cfg.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ModelError(
            f"{folder}: unsupported adapter settings {unsupported or cfg.get('peft_type')}"
        )
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    try:
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as e:  # safetensors' own error type, or a missing file
        raise ModelError(f"{folder}: cannot read adapter_model.safetensors ({e})") from None
    params = dict(model.named_parameters())
    merged: dict[str, torch.Tensor] = {}
    factors: Factors = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        if b is None or target not in params:
            raise ModelError(f"{folder}: adapter weight {key!r} matches no base-model layer")
        w = params[target].detach()
        if not (
            a.ndim == b.ndim == 2
            and a.shape[1] == w.shape[1]
            and b.shape == (w.shape[0], a.shape[0])
            and bool(torch.isfinite(a).all() and torch.isfinite(b).all())
        ):
            raise ModelError(
                f"{folder}: adapter weight {key!r} of shape {tuple(a.shape)} (B: "
                f"{tuple(b.shape)}) does not fit the layer "
                f"{tuple(w.shape)}, or holds NaN or infinite values"
            )
        a, b = a.to(w.dtype).to(w.device), (scale * b).to(w.dtype).to(w.device)
        merged[target] = w + b @ a  # (out, in)
        factors[target.removesuffix(".weight")] = (a, b)  # (r, in), (out, r)
    if not merged or len(merged) * 2 != sum(".lora_" in k for k in weights):
        raise ModelError(f"{folder}: adapter_model.safetensors holds no usable LoRA weights")
    identity = all(not w.any() for k, w in weights.items() if ".lora_B." in k)
    return Adapter(folder, with_params(model, merged), factors, identity)


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
            child = copy.copy(cast(torch.nn.Module, parent._modules[name]))
            child._modules = dict(child._modules)
            child._parameters = dict(child._parameters)
            parent._modules[name] = child
            copies[path] = child
        return copies[path]

    return get


def with_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` sharing all its weights except ``params`` (name -> tensor)."""
    get = _path_copier(model)
    for name, tensor in params.items():
        path, _, attr = name.rpartition(".")
        get(path)._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    return get("")


class RowLoRA(torch.nn.Module):
    """A base linear layer plus, for each group of rows, that group's expert's LoRA term
    ``(x A^T) (scale B)^T``."""

    def __init__(
        self,
        base: torch.nn.Module,
        groups: Sequence[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]],
    ) -> None:
        super().__init__()
        self.base, self.groups = base, list(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, L, out)
        for rows, (a, b) in self.groups:
            y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return y


def with_row_experts(
    model: torch.nn.Module, rows: dict[str, torch.Tensor], adapters: dict[str, Adapter]
) -> torch.nn.Module:
    """A copy of ``model`` for one batch: the rows ``rows[name]`` (indices into the batch) get
    expert ``name``'s LoRA term on every layer it targets; other rows, the base model. Built per
    batch (shallow copies of the targeted modules only), so no state outlives the call."""
    get = _path_copier(model)
    paths = sorted({p for name in rows for p in adapters[name].factors})
    for path in paths:
        groups = [
            (r, adapters[n].factors[path]) for n, r in rows.items() if path in adapters[n].factors
        ]
        parent, _, name = path.rpartition(".")
        get(parent)._modules[name] = RowLoRA(model.get_submodule(path), groups)
    return get("")


def cut_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A copy of ``model`` whose layer list keeps its first ``layers`` entries.

    Finds the ``ModuleList`` of ``config.num_hidden_layers`` layers (``encoder.layer`` in BERT,
    RoBERTa, MPNet; ``transformer.layer`` in DistilBERT) and copies only the modules on the path
    to it, so parameters are shared and the original model is untouched.
    """
    n = int(cast(Any, model).config.num_hidden_layers)
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
    layer_list = cast(torch.nn.ModuleList, parent._modules[name])
    parent._modules[name] = torch.nn.ModuleList(list(layer_list)[:layers])
    return get("")
