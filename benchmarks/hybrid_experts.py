"""Experts trained for the hybrid: each domain's LoRA trained as the dense side of BM25 fusion.

A CLEAR-style residual objective (Gao et al., 2021): each (query, document) logit of the usual
InfoNCE gets the document's BM25 score for the query added, min-max normalised over the query's
BM25 top 100 and scaled as :func:`routerretriever.fusion.fuse_scores` weighs it at dense weight
``--alpha`` (so the expert learns what BM25 misses); the mined negatives come from the base
model's fused ranking; early stopping scores the dev set fused with BM25 (never the test split).
Same training sets, LoRA and optimiser settings as the experiment's experts (its ``[train]``
table and each domain's ``overrides``). Writes one expert folder per domain under ``--out``
(and copies the experiment's multi-task LoRA there), and prints fused dev nDCG@10, base against
expert. The test rows come from the experiment itself, pointed at that store:

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/hybrid_experts.py experiments/paper.toml \
        --out /tmp/hybrid/experts
    sed -e 's#^store = .*#store = "/tmp/hybrid/experts"#' \
        -e 's#^results = .*#results = "/tmp/hybrid/results"#' experiments/paper.toml > /tmp/h.toml
    # (data_root made absolute the same way), then
    ROUTERRETRIEVER_CACHE=/work/cache routerretriever experiment /tmp/h.toml
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

DEPTH = 100  # the lists fusion normalises over, as in the experiment


def train_hybrid(enc: Any, ts: Any, bm25: Any, train: Any, alpha: float) -> tuple:
    """Train one expert on ``ts`` for fusion with ``bm25`` at dense weight ``alpha``; returns
    the PEFT model (best dev checkpoint), fused dev nDCG@10 of the base model and of the
    expert, the best step and the steps run."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModel

    from routerretriever.config import ExpertConfig
    from routerretriever.evaluation import evaluate
    from routerretriever.fusion import fuse_scores
    from routerretriever.index import FaissIndex

    row = {d: i for i, d in enumerate(ts.doc_ids)}
    qids = sorted(ts.positives)
    texts = [ts.queries[q] for q in qids]
    relevant = [{row[d] for d, s in ts.qrels[q].items() if s > 0 and d in row} for q in qids]
    pos_rows = [[row[d] for d in ts.positives[q]] for q in qids]
    index = FaissIndex.from_embeddings(ts.doc_ids, ts.doc_emb)
    dense = index.search(enc.encode(texts, show_progress=False), DEPTH)
    lexical = bm25.search(texts, DEPTH)
    # fuse_scores adds (1 - a) * lex to a * (cos - lo) / (hi - lo); over the temperature, that
    # is cos / T plus this per-query weight times the min-max-normalised BM25 score.
    spread = np.array([max(h[0][1] - h[-1][1], 1e-3) if h else 1.0 for h in dense])
    weight = (1 - alpha) / alpha * spread / train.temperature
    lex_norm = []
    for hits in lexical:
        s = np.array([v for _, v in hits]) if hits else np.zeros(1)
        lo, span = s.min(), s.max() - s.min()
        lex_norm.append({row[d]: (v - lo) / span if span > 0 else 1.0 for d, v in hits})
    negatives = []
    for i in range(len(qids)):
        fused = fuse_scores(dense[i], lexical[i], alpha, DEPTH)
        ranked = [row[d] for d, _ in fused if row[d] not in relevant[i]]
        negatives.append(ranked[train.mine_skip : train.mine_skip + train.mine_depth])
    dev_ids = list(ts.dev_queries)
    dev_texts = [ts.dev_queries[q] for q in dev_ids]
    dev_lex = bm25.search(dev_texts, DEPTH)

    def dev_fused(model: torch.nn.Module) -> float:
        hits = index.search(enc.encode(dev_texts, model=model, show_progress=False), DEPTH, dev_ids)
        run = {
            q: dict(fuse_scores(h, lx, alpha, 10))
            for q, h, lx in zip(dev_ids, hits, dev_lex, strict=True)
        }
        return evaluate(ts.dev_qrels, run, ["ndcg@10"]).scores["ndcg@10"]

    def schedule(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return max(0.0, (train.max_steps - s) / max(1, train.max_steps - warm))

    tokens = enc.tokenize(texts, train.max_query_length or enc.settings.max_length)
    doc_emb = torch.from_numpy(ts.doc_emb)
    rng = random.Random(train.seed)
    base = AutoModel.from_pretrained(enc.model_path, use_safetensors=True)
    model = get_peft_model(base, ExpertConfig().lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warm = max(1, int(train.max_steps * train.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    base_dev = best = dev_fused(model)
    best_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    best_step, bad, step = 0, 0, 0
    model.train()
    for step in range(1, train.max_steps + 1):
        batch = rng.sample(range(len(qids)), min(train.batch_size, len(qids)))
        cand = [rng.choice(pos_rows[i]) for i in batch]
        for i in batch:
            cand += rng.sample(negatives[i], min(train.hard_negatives, len(negatives[i])))
        mask = torch.tensor(
            [[c in relevant[i] and j != b for j, c in enumerate(cand)] for b, i in enumerate(batch)]
        )
        lex = torch.tensor(
            [[weight[i] * lex_norm[i].get(c, 0.0) for c in cand] for i in batch],
            dtype=torch.float32,
        )
        q = enc.forward(enc.collate([tokens[i] for i in batch]), model)
        logits = (q @ doc_emb[cand].T / train.temperature + lex).masked_fill(mask, -torch.inf)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        if step % train.eval_every == 0:
            model.eval()
            score = dev_fused(model)
            model.train()
            if score > best:
                best, best_step, bad = score, step, 0
                best_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
            else:
                bad += 1
                if bad >= train.patience:
                    break
    set_peft_model_state_dict(model, best_state)
    model.eval()
    return model, base_dev, best, best_step, step


def main() -> None:
    import torch

    from routerretriever.config import ExpertConfig
    from routerretriever.data import load_corpus
    from routerretriever.encoder import Encoder
    from routerretriever.experiment import MULTITASK, ExperimentConfig
    from routerretriever.experts import ExpertInfo, write_expert_folder
    from routerretriever.lexical import BM25Index
    from routerretriever.training import load_training_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the experiment's TOML file")
    parser.add_argument("--out", type=Path, required=True, help="expert store to write")
    parser.add_argument("--alpha", type=float, default=0.5, help="dense weight of the fusion")
    args = parser.parse_args()
    if not 0.0 < args.alpha < 1.0:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    logging.basicConfig(level=logging.WARNING)
    cfg = ExperimentConfig.load(args.config)
    enc = Encoder.load()
    lora = {**asdict(ExpertConfig()), "target_modules": list(ExpertConfig().target_modules)}
    rows = []
    for spec in cfg.expert_domains:
        train = replace(cfg.train, **spec.overrides)
        ts = load_training_set(
            enc,
            spec.path,
            split=None if spec.train == "corpus" else spec.train,
            from_corpus=spec.train == "corpus",
            pseudo=cfg.pseudo,
            cache_dir=cfg.cache_dir,
            seed=cfg.train.seed,
        )
        bm25 = BM25Index.cached(load_corpus(spec.path), cfg.bm25, cfg.cache_dir)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # seeded as the library seeds its training
            torch.manual_seed(train.seed)
            model, base_dev, best, best_step, steps = train_hybrid(enc, ts, bm25, train, args.alpha)
        info = ExpertInfo(
            name=spec.name,
            base_model=str(enc.model_path),
            base_fingerprint=enc.weights_fingerprint,
            data_fingerprint=ts.fingerprint,
            source=f"{ts.source}; trained for BM25 fusion at dense weight {args.alpha}",
            lora=lora,
            training={"hybrid_alpha": args.alpha, "best_step": best_step, "steps_run": steps},
            dev={"fused_ndcg@10": best, "base_fused_ndcg@10": base_dev},
            seconds=round(time.perf_counter() - start, 1),
        )
        write_expert_folder(
            args.out / spec.name,
            lambda tmp, m=model: m.save_pretrained(str(tmp), safe_serialization=True),
            info,
        )
        rows.append((spec.name, base_dev, best, best_step, steps, info.seconds))
    if cfg.multitask and (cfg.store / MULTITASK).is_dir() and not (args.out / MULTITASK).exists():
        shutil.copytree(cfg.store / MULTITASK, args.out / MULTITASK)
    print(f"fused dev nDCG@10 (BM25 at dense weight {args.alpha}), experts in {args.out}")
    print("| expert | base + BM25 | expert + BM25 | best step / steps run | seconds |")
    print("|---|---|---|---|---|")
    for name, b, e, s, n, sec in rows:
        print(f"| {name} | {b * 100:.1f} | {e * 100:.1f} | {s} / {n} | {sec:.0f} |")


if __name__ == "__main__":
    main()
