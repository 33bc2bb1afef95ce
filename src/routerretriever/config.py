"""Settings of an expert: its LoRA shape and its training. Plain dataclasses that check
themselves (importing them loads no model library, so the command line starts fast), and the
checks that read such settings from a user's TOML or JSON: every key known, every value typed.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

S = TypeVar("S")


@dataclass
class ExpertConfig:
    """LoRA hyper-parameters (the paper's: r=8, alpha=32, dropout 0.1, on query and value)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        self.target_modules = tuple(self.target_modules)

    def lora_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


@dataclass
class TrainConfig:
    """Optimisation settings. ``lr`` is the paper's; pick yours by the dev set (see docs)."""

    lr: float = 1e-4
    batch_size: int = 32
    max_steps: int = 300
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    hard_negatives: int = 3  # mined negatives per query per step (0: in-batch only)
    mine_depth: int = 30  # pool of mined negatives: base-model ranks [mine_skip, mine_skip+depth)
    mine_skip: int = 0  # skip the top ranks, where unjudged relevant documents hide
    eval_every: int = 20
    patience: int = 5  # evaluations without improvement before stopping
    max_query_length: int | None = 128
    grad_clip: float = 1.0
    seed: int = 0
    keep_best: bool = True  # restore the best dev checkpoint (False: keep the last step)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("hard_negatives", "mine_depth", "mine_skip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def fits(value: Any, tp: Any) -> bool:
    """Whether a TOML or JSON value fits a type annotation (ints pass as floats; bools pass
    only as bools)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in get_args(tp))
    if origin in (list, tuple):
        return isinstance(value, list) and all(fits(v, get_args(tp)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def settings_from(cls: type[S], table: Any, where: str) -> S:
    """``cls(**table)`` with every key known and every value of its field's type."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of settings")
    hints = typing.get_type_hints(cls)
    check_table(table, {f.name: hints[f.name] for f in fields(cls)}, where)  # type: ignore[arg-type]
    try:
        return cls(**table)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def check_table(
    table: dict[str, Any], expected: dict[str, Any], where: str, strict: bool = True
) -> None:
    """Every key of ``table`` of its ``expected`` type (and, if ``strict``, known), else an
    error naming ``where`` that shows at most the first 40 characters of a bad value."""
    bad = sorted(set(table) - set(expected))
    if bad and strict:
        raise ValueError(f"{where}: unknown keys {bad}; known: {sorted(expected)}")
    for name, value in table.items():
        if name in expected and not fits(value, expected[name]):
            shown = repr(value)[:40]
            raise ValueError(
                f"{where}: {name} must be of type {_name(expected[name])}, got {shown}"
            )


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
