"""Train a LoRA expert on the query side against cached, frozen document embeddings.

The document side never changes (documents are always embedded by the base model), so its
embeddings come from the corpus store and only queries run forward and backward. That makes big
batches and mined hard negatives cheap on a CPU. A document judged relevant to a query is never
a negative for it, in the batch or among the mined ones. Early stopping on a dev set keeps the
best checkpoint; the dev set is never the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import resource
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from routerretriever.config import ExpertConfig, TrainConfig
from routerretriever.data import Qrels, Queries, available_splits, load_beir, load_corpus
from routerretriever.encoder import Encoder, load_base_weights
from routerretriever.evaluation import evaluate
from routerretriever.experts import ExpertInfo, check_name, write_expert_folder
from routerretriever.index import FaissIndex
from routerretriever.losses import contrastive_loss
from routerretriever.pseudo import PseudoQueryConfig, make_pseudo_queries
from routerretriever.runtime import Backend
from routerretriever.store import corpus_fingerprint, embed_corpus

logger = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """One domain's training queries and their positives, over that domain's cached corpus."""

    name: str
    queries: Queries
    qrels: Qrels  # training judgments; score > 0 is a positive
    dev_queries: Queries
    dev_qrels: Qrels
    doc_ids: list[str]
    doc_emb: np.ndarray  # (N, d) base-model embeddings of the corpus
    source: str = ""
    fingerprint: str = ""
    doc_backend: str = "torch"  # the runtime that made doc_emb (store.CorpusEmbeddings.backend)
    #: Labelled queries neither trained nor early-stopped on (a dev split's queries beyond
    #: ``max_dev``, and ``hold_out`` training queries): the only held-out queries whose scores
    #: do not flatter this domain's expert.
    unseen_queries: Queries = field(default_factory=dict)
    unseen_qrels: Qrels = field(default_factory=dict)
    positives: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        known = set(self.doc_ids)
        self.positives = {
            q: [d for d, s in rels.items() if s > 0 and d in known]
            for q, rels in self.qrels.items()
            if q in self.queries
        }
        self.positives = {q: p for q, p in self.positives.items() if p}
        if not self.positives:
            raise ValueError(f"training set {self.name!r}: no query has a positive in the corpus")
        if not self.dev_qrels:
            raise ValueError(f"training set {self.name!r}: empty dev set")


def _split_off_dev(
    queries: Queries, qrels: Qrels, fraction: float, max_dev: int, seed: int
) -> tuple[Queries, Qrels, Queries, Qrels]:
    qids = sorted(q for q in qrels if q in queries)
    random.Random(seed).shuffle(qids)
    n_dev = max(1, min(max_dev, int(len(qids) * fraction)))
    dev, train = set(qids[:n_dev]), qids[n_dev:]
    return (
        {q: queries[q] for q in train},
        {q: qrels[q] for q in train},
        {q: queries[q] for q in dev},
        {q: qrels[q] for q in dev},
    )


def load_training_set(
    encoder: Encoder,
    folder: str | Path,
    *,
    split: str | None = "train",
    from_corpus: bool = False,
    dev_split: str | None = None,
    dev_fraction: float = 0.1,
    max_dev: int = 200,
    pseudo: PseudoQueryConfig | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    hold_out: int = 0,
    backend: Backend = "auto",
) -> TrainingSet:
    """A training set from a BEIR folder: its labelled ``split``, or pseudo-queries of its corpus.

    The dev set is ``dev_split`` when given (or the folder's ``dev`` split, for labelled data),
    else a held-out ``dev_fraction`` of the training queries. It is never the test split. A dev
    split larger than ``max_dev`` keeps the rest aside, unseen by training
    (:attr:`TrainingSet.unseen_queries`), and so do ``hold_out`` labelled training queries
    (drawn after the dev set): a third set, neither trained nor early-stopped on, for choices
    made after training (see :meth:`routerretriever.experiment.Experiment.instances`).
    ``backend`` embeds the corpus that hard negatives are mined from and dev is scored over
    (:mod:`routerretriever.runtime`); runtimes retrieve alike but train different experts.
    """
    folder = Path(folder)
    if dev_split == "test" or (split == "test" and not from_corpus):
        raise ValueError("the test split is for evaluation only; train and early-stop on others")
    if hold_out < 0:
        raise ValueError(f"hold_out must be >= 0, got {hold_out}")
    if hold_out and from_corpus:
        raise ValueError("hold_out needs labelled queries, not pseudo-queries")
    if from_corpus:
        corpus = load_corpus(folder)
        queries, qrels = make_pseudo_queries(corpus, pseudo, seed=seed)
        source = f"pseudo-queries from the corpus of {folder}"
    else:
        ds = load_beir(folder, split or "train")
        corpus, queries, qrels = ds.corpus, ds.queries, ds.qrels
        source = f"{folder} split {split!r}"
        if dev_split is None and "dev" in available_splits(folder):
            dev_split = "dev"
    if dev_split is not None and not from_corpus:
        dev = load_beir(folder, dev_split)
        dev_queries, dev_qrels = dev.queries, dev.qrels
        source += f", dev split {dev_split!r}"
    else:
        queries, qrels, dev_queries, dev_qrels = _split_off_dev(
            queries, qrels, dev_fraction, max_dev, seed
        )
        source += f", dev: {len(dev_qrels)} held-out training queries"
    unseen_queries: Queries = {}
    unseen_qrels: Qrels = {}
    if len(dev_qrels) > max_dev:
        keep = sorted(dev_qrels)
        random.Random(seed).shuffle(keep)
        rest = sorted(q for q in keep[max_dev:] if q in dev_queries)
        unseen_qrels = {q: dev_qrels[q] for q in rest}
        unseen_queries = {q: dev_queries[q] for q in rest}
        dev_qrels = {q: dev_qrels[q] for q in sorted(keep[:max_dev])}
        dev_queries = {q: dev_queries[q] for q in dev_qrels}
    if hold_out:
        qids = sorted(q for q in qrels if q in queries)
        if hold_out > len(qids) - 1:
            raise ValueError(
                f"{folder}: hold_out {hold_out} leaves no training query (there are {len(qids)})"
            )
        random.Random(seed + 1).shuffle(qids)
        held = set(qids[:hold_out])
        unseen_queries.update({q: queries[q] for q in sorted(held)})
        unseen_qrels.update({q: qrels[q] for q in sorted(held)})
        queries = {q: v for q, v in queries.items() if q not in held}
        qrels = {q: v for q, v in qrels.items() if q not in held}
        source += f", {hold_out} training queries held out for choices"
    emb = embed_corpus(encoder, corpus, cache_dir=cache_dir, backend=backend)
    payload = json.dumps([sorted(queries.items()), sorted(qrels.items())], sort_keys=True)
    fp = corpus_fingerprint(corpus) + ":" + hashlib.sha256(payload.encode()).hexdigest()[:16]
    return TrainingSet(
        name=folder.name,
        queries=queries,
        qrels=qrels,
        dev_queries=dev_queries,
        dev_qrels=dev_qrels,
        doc_ids=emb.ids,
        doc_emb=emb.embeddings,
        source=source,
        fingerprint=fp,
        doc_backend=emb.backend,
        unseen_queries=unseen_queries,
        unseen_qrels=unseen_qrels,
    )


class _Domain:
    """Per-set tensors and mined negatives, ready for sampling batches."""

    def __init__(self, ts: TrainingSet, encoder: Encoder, cfg: TrainConfig, max_len: int) -> None:
        self.ts = ts
        self.qids = sorted(ts.positives)
        self.row = {d: i for i, d in enumerate(ts.doc_ids)}
        self.pos_rows = [[self.row[d] for d in ts.positives[q]] for q in self.qids]
        self.relevant = [
            {self.row[d] for d, s in ts.qrels[q].items() if s > 0 and d in self.row}
            for q in self.qids
        ]
        # Truncated by the tokenizer, so long queries keep their closing special token.
        self.token_ids = encoder.tokenize([ts.queries[q] for q in self.qids], max_len)
        self.doc_emb = torch.from_numpy(ts.doc_emb).to(encoder.device)  # (N, d)
        self.index = FaissIndex.from_embeddings(ts.doc_ids, ts.doc_emb)
        self.negatives: list[list[int]] = [[] for _ in self.qids]
        if cfg.hard_negatives:
            q_emb = encoder.encode([ts.queries[q] for q in self.qids], show_progress=False)
            depth = cfg.mine_skip + cfg.mine_depth + max(len(r) for r in self.relevant)
            hits = self.index.search(q_emb, min(depth, len(ts.doc_ids)))
            for i, row_hits in enumerate(hits):
                ranked = [self.row[d] for d, _ in row_hits if self.row[d] not in self.relevant[i]]
                self.negatives[i] = ranked[cfg.mine_skip : cfg.mine_skip + cfg.mine_depth]


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def dev_ndcg(encoder: Encoder, model: torch.nn.Module, domains: Sequence[_Domain]) -> float:
    """Mean over domains of dev nDCG@10 with ``model`` on the query side."""
    scores = []
    for dom in domains:
        qids = list(dom.ts.dev_queries)
        q_emb = encoder.encode(
            [dom.ts.dev_queries[q] for q in qids], model=model, show_progress=False
        )
        hits = dom.index.search(q_emb, 10, exclude_ids=qids)
        run = {q: dict(h) for q, h in zip(qids, hits, strict=True)}
        scores.append(evaluate(dom.ts.dev_qrels, run, ["ndcg@10"]).scores["ndcg@10"])
    return float(np.mean(scores))


def train_expert(
    encoder: Encoder,
    sets: Sequence[TrainingSet],
    name: str,
    out_dir: str | Path,
    expert: ExpertConfig | None = None,
    train: TrainConfig | None = None,
    show_progress: bool | None = None,
) -> ExpertInfo:
    """Train one LoRA expert on ``sets`` (one domain, or several for a multi-task LoRA).

    Writes ``out_dir/name/`` (PEFT adapter in safetensors plus ``expert.json``) and returns its
    metadata. The base encoder is not modified.
    """
    model, info = fit_expert(encoder, sets, name, expert, train, show_progress)
    save_expert(model, info, out_dir)
    return info


def save_expert(model: torch.nn.Module, info: ExpertInfo, out_dir: str | Path) -> Path:
    """Write a trained PEFT model's adapter and ``info`` to ``out_dir/info.name/``, atomically."""
    path = write_expert_folder(
        Path(out_dir) / info.name,
        lambda tmp: cast(Any, model).save_pretrained(str(tmp), safe_serialization=True),
        info,
    )
    logger.info("saved expert %s to %s", info.name, path)
    return path


def fit_expert(
    encoder: Encoder,
    sets: Sequence[TrainingSet],
    name: str,
    expert: ExpertConfig | None = None,
    train: TrainConfig | None = None,
    show_progress: bool | None = None,
) -> tuple[torch.nn.Module, ExpertInfo]:
    """Train a LoRA on ``sets`` and return the PEFT model (in eval mode) and its metadata.

    Deterministic for a fixed ``train.seed`` on one machine: batches come from a generator of
    that seed, and the LoRA's initialisation and dropout from torch's generators (the CPU's,
    and the encoder's GPU's) seeded inside a forked RNG state, so the caller's global random
    state is left as it was.
    """
    train = train or TrainConfig()
    gpus = [encoder.device] if encoder.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(train.seed)
        return _fit(encoder, sets, name, expert, train, show_progress)


def _fit(
    encoder: Encoder,
    sets: Sequence[TrainingSet],
    name: str,
    expert: ExpertConfig | None,
    train: TrainConfig,
    show_progress: bool | None,
) -> tuple[torch.nn.Module, ExpertInfo]:
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    check_name(name)
    expert = expert or ExpertConfig()
    if not sets:
        raise ValueError("need at least one training set")
    start = time.perf_counter()
    rng = random.Random(train.seed)

    max_len = min(
        train.max_query_length or encoder.settings.max_length, encoder.settings.max_length
    )
    domains = [_Domain(ts, encoder, train, max_len) for ts in sets]
    weights = [len(d.qids) for d in domains]

    base = load_base_weights(encoder.model_path)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = get_peft_model(base, expert.lora_config())
    model.to(encoder.device)  # initialised on the CPU: the same LoRA on every device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = int(train.max_steps * train.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, train.max_steps))

    best = dev_ndcg(encoder, model, domains)  # step 0: the adapter starts as the identity
    history: list[dict[str, float]] = [{"step": 0, "dev_ndcg@10": best}]
    base_dev = best
    best_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    best_step, bad_evals, losses = 0, 0, []
    disable = None if show_progress is None else not show_progress
    bar = tqdm(range(1, train.max_steps + 1), desc=f"train {name}", disable=disable, leave=False)
    model.train()
    step = 0
    for step in bar:
        dom = domains[rng.choices(range(len(domains)), weights)[0]]
        rows = rng.sample(range(len(dom.qids)), min(train.batch_size, len(dom.qids)))
        pos = [rng.choice(dom.pos_rows[i]) for i in rows]
        negs = []
        for i in rows:
            pool = dom.negatives[i]
            negs.extend(rng.sample(pool, min(train.hard_negatives, len(pool))))
        cand_rows = pos + negs
        cand = dom.doc_emb[cand_rows]  # (C, d), C = B + mined
        targets = torch.arange(len(rows), device=encoder.device)  # query i's positive: row i
        # Relevant documents other than the target are never negatives (NFCorpus has dozens).
        mask = torch.tensor(
            [
                [c in dom.relevant[i] and j != b for j, c in enumerate(cand_rows)]
                for b, i in enumerate(rows)
            ],
            device=encoder.device,
        )  # (B, C)
        q = encoder.forward(encoder.collate([dom.token_ids[i] for i in rows]), model)  # (B, d)
        loss = contrastive_loss(q, cand, targets, mask, train.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % train.eval_every == 0 or step == train.max_steps:
            score = dev_ndcg(encoder, model, domains)
            history.append(
                {
                    "step": step,
                    "dev_ndcg@10": score,
                    "loss": float(np.mean(losses[-train.eval_every :])),
                }
            )
            bar.set_postfix(loss=f"{np.mean(losses[-train.eval_every :]):.3f}", dev=f"{score:.4f}")
            logger.info("%s step %d loss %.4f dev nDCG@10 %.4f", name, step, losses[-1], score)
            if score > best:
                best, best_step, bad_evals = score, step, 0
                best_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
            else:
                bad_evals += 1
                if bad_evals >= train.patience:
                    break
    bar.close()
    if train.keep_best:
        set_peft_model_state_dict(model, best_state)
    else:
        best, best_step = history[-1]["dev_ndcg@10"], int(history[-1]["step"])
    model.eval()

    info = ExpertInfo(
        name=name,
        base_model=str(encoder.model_path),
        base_fingerprint=encoder.weights_fingerprint,
        data_fingerprint="+".join(ts.fingerprint for ts in sets),
        source="; ".join(ts.source for ts in sets),
        lora=asdict(expert),
        training={
            **asdict(train),
            "steps_run": step,
            "best_step": best_step,
            "train_queries": sum(len(d.qids) for d in domains),
            # what embedded the corpus mined and early-stopped on (runtime.BACKENDS)
            "corpus_runtime": ",".join(sorted({ts.doc_backend for ts in sets})),
            "device": str(encoder.device),  # a GPU's expert differs from a CPU's (dropout draws)
            "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-train.eval_every :])) if losses else None,
        },
        dev={
            "ndcg@10": best,
            "base_ndcg@10": base_dev,
            "history": history,
            "queries": sum(len(ts.dev_qrels) for ts in sets),
        },
        seconds=round(time.perf_counter() - start, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    info.lora["target_modules"] = list(expert.target_modules)
    logger.info("trained expert %s: dev nDCG@10 %.4f (base %.4f)", name, best, base_dev)
    return model, info


def lora_steps_budget(sets: Sequence[TrainingSet], train: TrainConfig) -> int:
    """Steps for one multi-task LoRA on ``sets``: the sum of the per-expert step budgets."""
    return train.max_steps * len(sets) if sets else 0
