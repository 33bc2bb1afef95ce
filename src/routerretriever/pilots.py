"""The pilot embedding library: Algorithm 1 of RouterRetriever (Lee et al., AAAI 2025).

For every training instance (query) of every domain, each expert's per-query nDCG@10 against
that domain's corpus says which expert retrieves best for it (``e_max``). A domain's instances are
grouped by ``e_max``; each group's centroid of base-model embeddings becomes a pilot tagged with
that expert. No training is involved, so experts can be added or removed by scoring only what
changes and regrouping.

Tie rule (the reference code sends ties, even all-zero rows, to the first expert listed; we
don't, so the result never depends on the order experts were listed or added):
- an instance on which every expert scores 0 says nothing about which expert to pick: dropped;
- an instance with several best experts goes to the one among them with the highest mean score
  over the whole domain (the expert best for the domain as a whole), then by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from routerretriever.config import check_table, settings_from
from routerretriever.errors import ModelError
from routerretriever.files import atomic_write

logger = logging.getLogger(__name__)


@dataclass
class DomainInstances:
    """One domain's training instances: ids, base embeddings ``(n, d)``, and per-expert scores.

    ``scores[expert]`` is a ``(n,)`` array of that expert's per-query nDCG@10 on the instances.
    """

    domain: str
    ids: list[str]
    embeddings: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.shape[0] != len(self.ids):
            raise ValueError(
                f"domain {self.domain!r}: {len(self.ids)} ids but {self.embeddings.shape[0]} embeddings"
            )
        for expert, s in self.scores.items():
            if s.shape != (len(self.ids),):
                raise ValueError(
                    f"domain {self.domain!r}: scores of {expert!r} have shape {s.shape}"
                )


@dataclass(frozen=True)
class Pilot:
    """One pilot: the centroid of ``size`` instances of ``domain`` whose best expert is ``expert``."""

    expert: str
    domain: str
    size: int
    cluster: int = 0


#: the types of ``pilots.json``'s keys
MANIFEST_TYPES: dict[str, Any] = {
    "experts": list[str],
    "pilots": list[dict[str, Any]],
    "dropped": dict[str, int],
    "layers": int | None,
    "version": int,
}


@dataclass
class PilotLibrary:
    """Pilot embeddings ``(P, d)`` and what each pilot stands for.

    ``layers`` names the routing space: ``None`` for the base model's sentence embeddings (the
    paper), ``k`` for the pooled states after its first ``k`` layers (a cheaper routing pass).
    """

    experts: list[str]
    pilots: list[Pilot]
    embeddings: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)  # all-zero instances per domain
    layers: int | None = None

    def __len__(self) -> int:
        return len(self.pilots)

    def save(self, folder: str | Path) -> None:
        """Write ``pilots.safetensors`` and ``pilots.json`` (both atomically) into ``folder``."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        atomic_write(
            folder / "pilots.safetensors",
            lambda tmp: save_file({"embeddings": np.ascontiguousarray(self.embeddings)}, str(tmp)),
        )
        manifest = {
            "experts": self.experts,
            "pilots": [asdict(p) for p in self.pilots],
            "dropped": self.dropped,
            "layers": self.layers,
            "version": 1,
        }
        atomic_write(
            folder / "pilots.json",
            lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"),
        )

    @classmethod
    def load(cls, folder: str | Path) -> PilotLibrary:
        """Inverse of :meth:`save`; a library that does not read back whole is a ModelError."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        try:
            manifest = json.loads((folder / "pilots.json").read_text())
            if not isinstance(manifest, dict):
                raise ValueError("pilots.json is not a JSON object")
            check_table(manifest, MANIFEST_TYPES, "pilots.json", strict=False)  # newer keys: kept
            known = {f.name for f in fields(Pilot)}
            pilots = [
                settings_from(Pilot, {k: v for k, v in p.items() if k in known}, "a pilot")
                for p in manifest["pilots"]
            ]
            experts = manifest["experts"]
            if not {p.expert for p in pilots} <= set(experts):
                raise ValueError("a pilot names an expert that pilots.json does not list")
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{folder}: cannot read the pilot library ({e})") from None
        try:
            emb = load_file(str(folder / "pilots.safetensors"))["embeddings"]
        except Exception as e:  # safetensors' own error type, a missing tensor, a missing file
            raise ModelError(f"{folder}: cannot read pilots.safetensors ({e})") from None
        if emb.ndim != 2 or len(emb) != len(pilots) or not np.isfinite(emb).all():
            raise ModelError(
                f"{folder}: {len(pilots)} pilots in pilots.json but embeddings of shape "
                f"{emb.shape}{'' if np.isfinite(emb).all() else ' with NaN or infinite values'}"
            )
        return cls(experts, pilots, emb, manifest.get("dropped", {}), manifest.get("layers"))


def best_experts(inst: DomainInstances, experts: Sequence[str]) -> np.ndarray:
    """Index into ``experts`` of each instance's best expert, ``-1`` when all score 0."""
    s = np.stack([inst.scores[e] for e in experts], axis=1)  # (n, T)
    top = s.max(axis=1, keepdims=True)  # (n, 1)
    tied = s >= top - 1e-12  # (n, T)
    # Tie-break: the expert with the best mean over the domain, then by name (never list order).
    preference = sorted(range(len(experts)), key=lambda j: (-s[:, j].mean(), experts[j]))
    rank = np.empty(len(experts), dtype=np.int64)
    rank[preference] = np.arange(len(experts))
    choice = np.where(tied, rank[None, :], len(experts)).argmin(axis=1)  # (n,)
    return np.where(top[:, 0] > 0, choice, -1)


def _kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Labels of a small k-means (k-means++ init, fixed seed); ``k`` capped at ``len(x)``."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(
            x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))]
        )
    c = np.array(centers)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
    return labels


def build_pilots(
    domains: Sequence[DomainInstances],
    experts: Sequence[str],
    clusters: int = 1,
    layers: int | None = None,
) -> PilotLibrary:
    """Algorithm 1: group each domain's instances by best expert; centroids become pilots.

    ``clusters > 1`` splits each group by k-means into up to that many pilots (the paper found
    1 best). At most ``len(experts) * clusters`` pilots per domain. ``layers`` records the
    routing space the instances' embeddings were made in (see :class:`PilotLibrary`).
    """
    experts = list(experts)
    if not experts:
        raise ValueError("need at least one expert")
    for inst in domains:
        missing = [e for e in experts if e not in inst.scores]
        if missing:
            raise ValueError(f"domain {inst.domain!r} has no scores for expert(s) {missing}")
    pilots: list[Pilot] = []
    rows: list[np.ndarray] = []
    dropped: dict[str, int] = {}
    for inst in domains:
        best = best_experts(inst, experts)
        dropped[inst.domain] = int((best < 0).sum())
        for j, expert in enumerate(experts):
            members = inst.embeddings[best == j]
            if not len(members):
                continue
            labels = _kmeans(members, clusters) if clusters > 1 else np.zeros(len(members), int)
            for c in np.unique(labels):
                group = members[labels == c]
                pilots.append(Pilot(expert, inst.domain, int(len(group)), int(c)))
                rows.append(group.mean(axis=0))
    if not pilots:
        raise ValueError("no pilots: every instance scored 0 with every expert")
    emb = np.stack(rows).astype(np.float32)  # (P, d)
    return PilotLibrary(experts, pilots, emb, dropped, layers)


Scorer = Callable[[str, DomainInstances], np.ndarray]  # (expert, domain) -> (n,) nDCG@10


def add_expert(
    domains: list[DomainInstances],
    experts: list[str],
    new_expert: str,
    scorer: Scorer,
    new_domain: DomainInstances | None = None,
    clusters: int = 1,
) -> PilotLibrary:
    """Add an expert (and optionally its domain's instances) with no training, then regroup.

    Scores only what is new: ``new_expert`` on every existing instance, and every expert on the
    new domain's instances. ``domains`` and ``experts`` are updated in place.
    """
    if new_expert in experts:
        raise ValueError(f"expert {new_expert!r} is already in the pool: {experts}")
    for inst in domains:
        inst.scores[new_expert] = scorer(new_expert, inst)
    experts.append(new_expert)
    if new_domain is not None:
        for e in experts:
            if e not in new_domain.scores:
                new_domain.scores[e] = scorer(e, new_domain)
        domains.append(new_domain)
    return build_pilots(domains, experts, clusters)


def remove_expert(
    domains: list[DomainInstances],
    experts: list[str],
    expert: str,
    drop_domain: str | None = None,
    clusters: int = 1,
) -> PilotLibrary:
    """Remove an expert (and optionally a domain's instances) and regroup; nothing is re-scored."""
    if expert not in experts:
        raise ValueError(f"unknown expert {expert!r}; in the pool: {experts}")
    experts.remove(expert)
    for inst in domains:
        inst.scores.pop(expert, None)
    if drop_domain is not None:
        domains[:] = [d for d in domains if d.domain != drop_domain]
    return build_pilots(domains, experts, clusters)
