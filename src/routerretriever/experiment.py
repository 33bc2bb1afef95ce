"""The paper's experiments from one TOML config: experts, baselines, routers, oracles, tables, figures.

Everything is computed from per-query nDCG@10: every model (base, each expert, the multi-task
LoRA) is run once on every test set, and a routed system's score is each query's score under the
expert it was routed to (a query's nDCG@10 depends only on its own ranking, so this is exact).
Heavy steps are cached under the results folder; delete it to start over.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from routerretriever.corpora import CorpusSketch
from routerretriever.data import load_beir
from routerretriever.encoder import BASE, Encoder
from routerretriever.experiment_config import DomainSpec, ExperimentConfig
from routerretriever.experts import load_expert
from routerretriever.files import atomic_write
from routerretriever.index import FaissIndex
from routerretriever.instances import per_query_ndcg
from routerretriever.lexical import BM25Index
from routerretriever.pilots import DomainInstances
from routerretriever.store import embed_corpus
from routerretriever.training import load_training_set

logger = logging.getLogger(__name__)

MULTITASK = "multitask"
MIN_CHOICE = 50  # unseen labelled queries a domain needs before they, not its dev set, decide


# -- step 1: experts ---------------------------------------------------------------------------


def train_one(
    cfg: ExperimentConfig,
    name: str,
    specs: Sequence[DomainSpec],
    steps: int,
    log_level: int = logging.WARNING,
) -> None:
    """Train expert ``name`` on ``specs`` with the library, every ``[train]`` and ``[pseudo]``
    setting of the config applied (a domain's ``overrides`` on top, for a one-domain expert).
    Run in a spawned process, it logs at the parent's ``log_level``."""
    from transformers.utils import logging as hf_logging

    from routerretriever.experts import caveat
    from routerretriever.training import train_expert

    if not logging.getLogger().handlers:  # a fresh (spawned) interpreter: as the parent logs
        # Other libraries' INFO (faiss's loader listing the builds it could not load) stays out.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("routerretriever").setLevel(log_level)
    hf_logging.disable_progress_bar()

    t = cfg.train
    if len(specs) == 1 and specs[0].overrides:
        t = replace(t, **specs[0].overrides)
    t = replace(t, max_steps=steps)
    encoder = Encoder.load()
    sets = [
        load_training_set(
            encoder,
            spec.path,
            split=None if spec.train == "corpus" else spec.train if len(specs) == 1 else "train",
            from_corpus=spec.train == "corpus",
            pseudo=cfg.pseudo,
            cache_dir=cfg.cache_dir,
            seed=t.seed,
            hold_out=spec.hold_out,  # never trained on, by the multi-task LoRA either
            backend=cfg.backend,  # mining and early stopping over the corpus the tables use
        )
        for spec in specs
    ]
    info = train_expert(encoder, sets, name, cfg.store, train=t, show_progress=False)
    logger.info(
        "expert %s: dev nDCG@10 %.4f (base %.4f), best step %s of %s, %.0f s",
        name,
        info.dev["ndcg@10"],
        info.dev["base_ndcg@10"],
        info.training["best_step"],
        info.training["steps_run"],
        info.seconds,
    )
    note = caveat(info)
    if note:
        logger.warning(note)


def train_all(cfg: ExperimentConfig) -> None:
    """Train each domain's expert and the multi-task LoRA, each in its own process (so its time
    and peak memory are its own); experts already in the store are kept."""
    import multiprocessing

    jobs = [(d.name, [d], cfg.train.max_steps) for d in cfg.expert_domains]
    if cfg.multitask:  # the multi-task LoRA gets the budget of all experts together
        jobs.append((MULTITASK, cfg.expert_domains, cfg.train.max_steps * len(cfg.expert_domains)))
    spawn = multiprocessing.get_context("spawn")
    for name, specs, steps in jobs:
        if (cfg.store / name / "expert.json").is_file():
            logger.info("expert %s already trained; keeping it", name)
            continue
        logger.info("training expert %s", name)
        level = logging.getLogger(__name__).getEffectiveLevel()
        proc = spawn.Process(
            target=train_one, args=(cfg, name, specs, steps, level), name=f"train-{name}"
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"training expert {name!r} failed (exit code {proc.exitcode})")


# -- step 2: per-query scores of every model on every test set and on the instances --------------


@dataclass
class Domain:
    spec: DomainSpec
    doc_ids: list[str]
    index: FaissIndex
    backend: str  # the runtime that embedded the corpus: "torch", "onnx" or "bfloat16"
    test_queries: dict[str, str]
    test_qrels: dict[str, dict[str, int]]


class Experiment:
    """Runs the steps of an :class:`ExperimentConfig` and holds their results."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.encoder = Encoder.load()
        self.experts = [d.name for d in cfg.expert_domains]
        trained = [*self.experts, MULTITASK] if cfg.multitask else self.experts
        for name in trained:
            load_expert(self.encoder, cfg.store / name)
        self.models = [BASE, *trained]
        self.domains: dict[str, Domain] = {}
        self.lexical: dict[str, BM25Index] = {}
        #: domain -> a sketch of its corpus (which corpus a scoped gate's evidence came from)
        self.sketches: dict[str, CorpusSketch] = {}
        for spec in cfg.domains:
            ds = load_beir(spec.path, cfg.test_split)
            logger.info("indexing %s (%d documents, dense and BM25)", spec.name, len(ds.corpus))
            emb = embed_corpus(
                self.encoder,
                ds.corpus,
                cache_dir=cfg.cache_dir,
                batch_size=cfg.batch_size,
                backend=cfg.backend,
            )
            self.domains[spec.name] = Domain(
                spec,
                emb.ids,
                FaissIndex.from_embeddings(emb.ids, emb.embeddings),
                emb.backend,
                ds.queries,
                ds.qrels,
            )
            self.lexical[spec.name] = BM25Index.cached(ds.corpus, cfg.bm25, cfg.cache_dir)
            self.sketches[spec.name] = CorpusSketch.of(ds.corpus)
        self.cache = cfg.results / "cache"
        self._training_sets: dict[str, Any] = {}
        #: ``(part, domain)`` -> the sampled instance queries and qrels of :meth:`instances`
        self.instance_queries: dict[tuple[str, str], tuple[dict[str, str], dict]] = {}
        #: domain -> which queries its ``"choice"`` instances are (see :meth:`instances`)
        self.choice_source: dict[str, str] = {}

    def _scores(
        self,
        key: str,
        model: str,
        dom: Domain,
        queries: dict[str, str],
        qrels: dict[str, dict[str, int]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-query nDCG@10 and query embeddings of ``model``, cached on disk under ``key`` (and
        the corpus runtime, where not torch: scores over other corpus vectors never mix)."""
        suffix = "" if dom.backend == "torch" else f"-{dom.backend}"
        path = self.cache / f"{key}{suffix}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                if f["qids"].tolist() == list(queries):
                    return f["ndcg"], f["emb"]
        logger.info("scoring %s: %d queries (%s)", model, len(queries), key)
        ndcg, emb = per_query_ndcg(
            self.encoder, model, dom.index, queries, qrels, self.cfg.batch_size
        )

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, ndcg=ndcg, emb=emb, qids=np.array(list(queries), dtype=str))

        atomic_write(path, write)
        return ndcg, emb

    def test_scores(self) -> dict[str, dict[str, np.ndarray]]:
        """``[domain][model]`` -> per-query nDCG@10 on the test split; plus ``[domain]["_emb"]``."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for name, dom in self.domains.items():
            out[name] = {}
            for model in self.models:
                ndcg, emb = self._scores(
                    f"test-{name}-{model}", model, dom, dom.test_queries, dom.test_qrels
                )
                out[name][model] = ndcg
                if model == BASE:
                    out[name]["_emb"] = emb
        return out

    def instances(self, part: str) -> list[DomainInstances]:
        """Training (``part="train"``), dev or choice instances of each expert domain, scored by
        every model.

        ``"dev"`` is the set each expert early-stopped on. ``"choice"`` is what the pool's gates
        and choices are scored on (:mod:`routerretriever.hybrid_eval`): a domain's labelled
        queries that its expert never saw (neither trained nor early-stopped on) where it has at
        least :data:`MIN_CHOICE`, else its dev set; :attr:`choice_source` says which. An
        expert's own stopping set flatters it: the checkpoint (and its settings) were picked
        there."""
        if part not in ("train", "dev", "choice"):
            raise ValueError(f"part must be 'train', 'dev' or 'choice', got {part!r}")
        out = []
        for spec in self.cfg.expert_domains:
            dom = self.domains[spec.name]
            if spec.name not in self._training_sets:  # the same queries the expert trained on
                self._training_sets[spec.name] = load_training_set(
                    self.encoder,
                    spec.path,
                    split=None if spec.train == "corpus" else spec.train,
                    from_corpus=spec.train == "corpus",
                    pseudo=self.cfg.pseudo,
                    cache_dir=self.cfg.cache_dir,
                    seed=self.cfg.train.seed,
                    hold_out=spec.hold_out,
                    backend=self.cfg.backend,
                )
            ts = self._training_sets[spec.name]
            queries, qrels = (
                (ts.queries, ts.qrels) if part == "train" else (ts.dev_queries, ts.dev_qrels)
            )
            if part == "choice":
                if len(ts.unseen_qrels) >= MIN_CHOICE:
                    queries, qrels = ts.unseen_queries, ts.unseen_qrels
                    self.choice_source[spec.name] = (
                        f"{len(qrels)} labelled queries its expert never saw"
                    )
                else:
                    self.choice_source[spec.name] = "the dev set its expert early-stopped on"
            qids = sorted(q for q in qrels if q in queries)
            random.Random(self.cfg.seed).shuffle(qids)
            qids = sorted(qids[: self.cfg.max_instances])
            sub_q, sub_r = {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}
            self.instance_queries[(part, spec.name)] = (sub_q, sub_r)
            # Pseudo-query instances are judged against the full corpus they came from.
            scores = {}
            for model in [BASE, *self.experts]:
                scores[model], emb = self._scores(
                    f"{part}-{spec.name}-{model}", model, dom, sub_q, sub_r
                )
                if model == BASE:
                    base_emb = emb
            out.append(DomainInstances(spec.name, qids, base_emb, scores))
        return out

    def member_embeddings(self, part: str, domain: str, members: Sequence[str]) -> dict:
        """Each member's query embeddings ``(n, d)`` of a domain's test queries (``part="test"``)
        or its ``"train"``/``"dev"`` instances (after :meth:`instances`), from the score cache."""
        dom = self.domains[domain]
        if part == "test":
            queries, qrels = dom.test_queries, dom.test_qrels
        else:
            queries, qrels = self.instance_queries[(part, domain)]
        return {m: self._scores(f"{part}-{domain}-{m}", m, dom, queries, qrels)[1] for m in members}

    def _variant_emb(
        self, key: str, queries: dict[str, str], layers: int | None, dtype: Any
    ) -> np.ndarray:
        """Query embeddings by :meth:`Encoder.variant` ``(layers, dtype)``, cached under ``key``."""
        tag = f"layers{layers}" if dtype is None else f"layers{layers}-{str(dtype).split('.')[-1]}"
        path = self.cache / f"{tag}-{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                if f["qids"].tolist() == list(queries):
                    return f["emb"]
        logger.info("routing-pass embeddings %s: %d queries (%s)", tag, len(queries), key)
        emb = self.encoder.encode(
            list(queries.values()),
            layers=layers,
            dtype=dtype,
            batch_size=self.cfg.batch_size,
            show_progress=False,
        )

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, emb=emb, qids=np.array(list(queries), dtype=str))

        atomic_write(path, write)
        return emb

    def in_space(
        self,
        test: dict[str, dict[str, np.ndarray]],
        insts: dict[str, list],
        layers: int | None = None,
        dtype: Any = None,
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[DomainInstances]]]:
        """``test`` scores and ``insts`` (by part) with embeddings by a cheaper routing pass:
        the base model's first ``layers`` layers, and/or cast to ``dtype``."""
        test_k = {
            d: {
                **t,
                "_emb": self._variant_emb(f"test-{d}", self.domains[d].test_queries, layers, dtype),
            }
            for d, t in test.items()
        }
        insts_k: dict[str, list[DomainInstances]] = {}
        for part, part_insts in insts.items():
            insts_k[part] = []
            for inst in part_insts:
                ts = self._training_sets[inst.domain]
                pool = ts.queries if part == "train" else ts.dev_queries
                emb = self._variant_emb(
                    f"{part}-{inst.domain}", {q: pool[q] for q in inst.ids}, layers, dtype
                )
                insts_k[part].append(replace(inst, embeddings=emb))
        return test_k, insts_k
