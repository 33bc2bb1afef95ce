"""The experiment's TOML config: domains, paths and settings, each value checked on load.

A mistyped key, a value of the wrong type or out of range is an error that names the file and
the table, raised before anything runs; nothing falls back to a default silently.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routerretriever.config import TrainConfig, check_table, settings_from
from routerretriever.errors import DataError
from routerretriever.fusion import NORMALISATIONS, Normalisation
from routerretriever.lexical import BM25Config
from routerretriever.pseudo import PseudoQueryConfig
from routerretriever.runtime import BACKENDS, Backend


@dataclass
class DomainSpec:
    """A domain: its BEIR folder and where its expert's training data comes from."""

    name: str
    path: Path
    train: str = "corpus"  # a labelled split name, "corpus" (pseudo-queries) or "none" (zero-shot)
    overrides: dict[str, Any] = field(default_factory=dict)  # [train] settings for this expert
    #: labelled training queries kept from training and early stopping, for the pool's choices
    hold_out: int = 0


#: each key of the TOML file and its type there (paths are strings, relative to the file)
RAW_KEYS: dict[str, Any] = {
    "data_root": str,
    "store": str,
    "results": str,
    "cache_dir": str,
    "test_split": str,
    "train": dict[str, Any],
    "pseudo": dict[str, Any],
    "bm25": dict[str, Any],
    "max_instances": int,
    "classifier_instances": int,
    "seed": int,
    "batch_size": int,
    "routing_layers": list[int],
    "routing_bf16": bool,
    "multitask": bool,
    "backend": str,
    "normalisations": list[str],
    "min_lead_se": float,
    "domains": list[Any],
}
DOMAIN_KEYS: dict[str, Any] = {
    "name": str,
    "path": str,
    "train": str,
    "overrides": dict[str, Any],
    "hold_out": int,
}


@dataclass
class ExperimentConfig:
    """What ``routerretriever experiment CONFIG`` runs (see ``experiments/paper.toml``)."""

    domains: list[DomainSpec]
    store: Path
    results: Path
    cache_dir: Path | None = None
    test_split: str = "test"
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoQueryConfig = field(default_factory=PseudoQueryConfig)
    max_instances: int = 300  # training instances per domain for the pilot library
    classifier_instances: int = 100  # DatasetRouter's sampled instances per domain
    seed: int = 0
    batch_size: int = 32
    routing_layers: list[int] = field(default_factory=list)  # also route on these first layers
    routing_bf16: bool = False  # also route with a bfloat16 routing pass
    bm25: BM25Config = field(default_factory=BM25Config)  # the pool's lexical member
    multitask: bool = True  # train the multi-task LoRA baseline (Table 1's second row)
    backend: Backend = "auto"  # the corpus side's runtime (routerretriever.runtime)
    #: the pool's candidates fuse BM25 with each of these (routerretriever.fusion.normalise)
    normalisations: list[Normalisation] = field(default_factory=lambda: ["minmax"])
    #: the pool's default must lead base + BM25 on labelled dev by this many standard errors,
    #: else base + BM25 is the default (0: the best on dev; routerretriever.selection)
    min_lead_se: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        check_table(raw, RAW_KEYS, str(path))
        here = path.parent

        def resolve(value: str, key: str) -> Path:
            try:
                return (here / value).resolve()
            except (ValueError, OSError) as e:  # a NUL byte, a loop of links
                raise ValueError(f"{path}: {key} is not a usable path ({e})") from None

        root = resolve(raw.get("data_root", "."), "data_root")
        domains = []
        for i, d in enumerate(raw.get("domains", [])):
            where = f"{path}: [[domains]] number {i + 1}"
            if not isinstance(d, dict) or not {"name", "path"} <= set(d):
                raise ValueError(f"{where} needs a name and a path")
            check_table(d, DOMAIN_KEYS, where)
            where = f"{path}: domain {d['name'][:40]!r}"
            hold_out = d.get("hold_out", 0)
            if hold_out < 0:
                raise ValueError(f"{where}: hold_out must be an integer >= 0")
            train = d.get("train", "corpus")
            if hold_out and train in ("corpus", "none"):
                raise ValueError(f"{where}: hold_out needs labelled training queries")
            overrides = d.get("overrides", {})
            settings_from(TrainConfig, overrides, f"{where} overrides")
            folder = resolve(str(root / d["path"]), f"domain {d['name'][:40]!r} path")
            domains.append(DomainSpec(d["name"], folder, train, overrides, hold_out))
        if not domains:
            raise ValueError(f"{path}: no [[domains]]")
        backend = raw.get("backend", "auto")
        if backend not in BACKENDS:
            raise ValueError(
                f"{path}: backend must be one of {', '.join(BACKENDS)}; got {backend[:20]!r}"
            )
        norms = raw.get("normalisations", ["minmax"])
        if not norms or set(norms) - set(NORMALISATIONS):
            raise ValueError(
                f"{path}: normalisations must be a non-empty list of {list(NORMALISATIONS)}; "
                f"got {str(norms)[:80]}"
            )
        for name in ("max_instances", "classifier_instances", "batch_size"):
            if raw.get(name, 1) < 1:
                raise ValueError(f"{path}: {name} must be a positive integer")
        min_lead_se = float(raw.get("min_lead_se", 0.0))
        if not 0.0 <= min_lead_se <= 10.0:
            raise ValueError(f"{path}: min_lead_se must be in [0, 10]; got {min_lead_se:.3g}")
        if any(k < 1 for k in raw.get("routing_layers", [])):
            raise ValueError(f"{path}: routing_layers must be layer counts >= 1")
        cache_dir = raw.get("cache_dir")
        return cls(
            domains=domains,
            store=resolve(raw.get("store", "runs/experts"), "store"),
            results=resolve(raw.get("results", "runs/results"), "results"),
            cache_dir=None if cache_dir is None else resolve(cache_dir, "cache_dir"),
            test_split=raw.get("test_split", "test"),
            train=settings_from(TrainConfig, raw.get("train", {}), f"{path}: [train]"),
            pseudo=settings_from(PseudoQueryConfig, raw.get("pseudo", {}), f"{path}: [pseudo]"),
            max_instances=raw.get("max_instances", 300),
            classifier_instances=raw.get("classifier_instances", 100),
            seed=raw.get("seed", 0),
            batch_size=raw.get("batch_size", 32),
            routing_layers=list(raw.get("routing_layers", [])),
            routing_bf16=raw.get("routing_bf16", False),
            bm25=settings_from(BM25Config, raw.get("bm25", {}), f"{path}: [bm25]"),
            multitask=raw.get("multitask", True),
            backend=backend,
            normalisations=list(dict.fromkeys(norms)),
            min_lead_se=min_lead_se,
        )

    @property
    def expert_domains(self) -> list[DomainSpec]:
        return [d for d in self.domains if d.train != "none"]

    def check_paths(self) -> None:
        """Every domain's data is there (corpus, queries, the test and training qrels), checked
        before anything runs; the error lists everything missing at once."""
        missing = []
        for d in self.domains:
            need = ["corpus.jsonl", "queries.jsonl", f"qrels/{self.test_split}.tsv"]
            if d.train not in ("corpus", "none"):
                need.append(f"qrels/{d.train}.tsv")
            gone = [
                n for n in need if not (d.path / n).is_file() and not (d.path / f"{n}.gz").is_file()
            ]
            if not d.path.is_dir():
                missing.append(f"{d.name}: no folder {d.path}")
            elif gone:
                missing.append(f"{d.name}: {d.path} lacks {', '.join(gone)}")
        if missing:
            raise DataError(
                "missing data:\n  "
                + "\n  ".join(missing)
                + "\nBEIR collections: routerretriever data get NAME --to DIR (see: data list); "
                "point data_root or each domain's path at them"
            )
