"""Algorithm 1's inputs: a domain's training instances, every model's score on each, cached.

A :class:`Domain` names where a domain's instances come from (a BEIR folder's labelled split, or
pseudo-queries of its corpus). :class:`InstanceScorer` samples them, scores the base model and
each expert on them (per-instance nDCG@10 against that domain's own corpus; cached on disk per
model, encoder and instance set, and in memory, so adding an expert scores only that expert),
and gives :class:`~routerretriever.pilots.DomainInstances`. :func:`build_pilot_library` is the
one call from a loaded encoder and its domains to a pilot library::

    enc = Encoder.load(); load_expert(enc, "store/scifact"); load_expert(enc, "store/med")
    pilots = build_pilot_library(enc, [Domain("scifact", "beir/scifact"),
                                       Domain("med", "classic/med", "corpus")])
    rr = RouterRetriever(enc, pilots)
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routerretriever.encoder import BASE, Encoder
from routerretriever.evaluation import evaluate
from routerretriever.files import atomic_write, default_cache_dir
from routerretriever.index import FaissIndex, VectorIndex
from routerretriever.pilots import DomainInstances, PilotLibrary, build_pilots
from routerretriever.runtime import Backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Domain:
    """Where a domain's pilot instances come from: a BEIR folder's labelled ``split``, or
    pseudo-queries of its corpus (``split="corpus"``), judged against that folder's corpus."""

    name: str
    path: Path
    split: str = "train"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def parse(cls, spec: str) -> Domain:
        """``NAME=DIR`` or ``NAME=DIR:SPLIT`` (SPLIT a qrels split name, or ``corpus``)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"domain {spec!r}: expected NAME=DIR or NAME=DIR:SPLIT")
        path, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "train")
        return cls(name, Path(path), split or "train")


@dataclass
class InstanceSet:
    """A domain's sampled instances, their judgments, and the index of its corpus."""

    domain: Domain
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    fingerprint: str
    index: FaissIndex


def _digest_files(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()[:16]


class InstanceScorer:
    """Samples each domain's instances once and scores models on them, caching both."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        cache_dir: str | Path | None = None,
        max_instances: int = 300,
        seed: int = 0,
        batch_size: int = 32,
        backend: Backend = "auto",
    ) -> None:
        self.encoder = encoder
        self.backend: Backend = backend  # what embeds each domain's corpus
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_instances, self.seed, self.batch_size = max_instances, seed, batch_size
        self._sets: dict[str, InstanceSet] = {}
        self._scores: dict[tuple[str, str], np.ndarray] = {}  # (model key, domain) -> (n,)
        self._emb: dict[str, np.ndarray] = {}  # domain -> base embeddings (n, d)

    def instance_set(self, domain: Domain) -> InstanceSet:
        """``domain``'s instances: at most ``max_instances`` judged queries, sampled by seed."""
        if domain.name not in self._sets:
            from routerretriever.training import load_training_set

            ts = load_training_set(
                self.encoder,
                domain.path,
                split=None if domain.split == "corpus" else domain.split,
                from_corpus=domain.split == "corpus",
                cache_dir=self.cache_dir,
                seed=self.seed,
                backend=self.backend,
            )
            qids = sorted(q for q in ts.qrels if q in ts.queries)
            random.Random(self.seed).shuffle(qids)
            qids = sorted(qids[: self.max_instances])
            queries = {q: ts.queries[q] for q in qids}
            qrels = {q: ts.qrels[q] for q in qids}
            key: list = [ts.fingerprint, queries, qrels]
            if ts.doc_backend != "torch":  # scores over other corpus vectors are cached apart
                key.append(ts.doc_backend)
            fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            index = FaissIndex.from_embeddings(ts.doc_ids, ts.doc_emb)
            self._sets[domain.name] = InstanceSet(domain, queries, qrels, fp, index)
        return self._sets[domain.name]

    def model_key(self, model: str) -> str:
        """What identifies a model's scores: the base encoder, or an expert's adapter files."""
        if model == BASE:
            return "base-" + self.encoder.fingerprint
        folder = self.encoder.expert_dirs[model]
        return _digest_files(folder, ["adapter_config.json", "adapter_model.safetensors"])

    def score(self, model: str, inst: InstanceSet) -> tuple[np.ndarray, np.ndarray]:
        """Per-instance nDCG@10 ``(n,)`` of ``model`` on ``inst`` and its query embeddings
        ``(n, d)``, cached on disk (an unreadable cache file is recomputed)."""
        path = (
            self.cache_dir
            / "scores"
            / f"{self.model_key(model)}-{self.encoder.fingerprint}-{inst.fingerprint}.npz"
        )
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    return f["ndcg"], f["emb"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                logger.warning("%s: unreadable score cache; recomputing", path)
        ndcg, q_emb = per_query_ndcg(
            self.encoder, model, inst.index, inst.queries, inst.qrels, self.batch_size
        )

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, ndcg=ndcg, emb=q_emb)

        atomic_write(path, write)
        return ndcg, q_emb

    def instances(self, domain: Domain, experts: Sequence[str]) -> DomainInstances:
        """``domain``'s instances with each of ``experts``' scores (only new ones computed)."""
        inst = self.instance_set(domain)
        if domain.name not in self._emb:
            self._scores[(BASE, domain.name)], self._emb[domain.name] = self.score(BASE, inst)
        scores = {}
        for e in experts:
            key = (self.model_key(e), domain.name)
            if key not in self._scores:
                self._scores[key] = self.score(e, inst)[0]
            scores[e] = self._scores[key]
        return DomainInstances(domain.name, list(inst.queries), self._emb[domain.name], scores)


def build_pilot_library(
    encoder: Encoder,
    domains: Sequence[Domain],
    experts: Sequence[str] | None = None,
    **scorer_options: object,
) -> PilotLibrary:
    """Algorithm 1 from a loaded encoder: each domain's instances scored by ``experts`` (default:
    every expert loaded on ``encoder``), grouped by best expert, centroids. ``scorer_options``
    go to :class:`InstanceScorer` (``cache_dir``, ``max_instances``, ``seed``, ``batch_size``,
    ``backend``)."""
    names = list(encoder.experts if experts is None else experts)
    if not names:
        raise ValueError("no experts to build pilots for: load some on the encoder first")
    if not domains:
        raise ValueError("no domains: the pilot library needs domain instances")
    scorer = InstanceScorer(encoder, **scorer_options)  # type: ignore[arg-type]
    return build_pilots([scorer.instances(d, names) for d in domains], names)


def per_query_ndcg(
    encoder: Encoder,
    model: str,
    index: VectorIndex,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """nDCG@10 of each query (0 when it has no hits) with ``model`` (an expert name or ``BASE``).

    Returns the scores ``(n,)`` in ``queries`` order and the query embeddings ``(n, d)``. This is
    what the pilot library and the oracles are built from.
    """
    qids = list(queries)
    emb = encoder.encode(
        [queries[q] for q in qids],
        experts=None if model == BASE else model,
        batch_size=batch_size,
        show_progress=False,
    )
    hits = index.search(emb, 10, exclude_ids=qids)
    run = {q: dict(h) for q, h in zip(qids, hits, strict=True)}
    per = evaluate({q: dict(r) for q, r in qrels.items()}, run, ["ndcg@10"]).per_query
    return np.array([per.get(q, {}).get("ndcg@10", 0.0) for q in qids]), emb
