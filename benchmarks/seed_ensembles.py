"""Better experts from several seeds? Each domain's expert trained with seeds 0..3 on the same
training set (only the LoRA's initialisation, dropout and batch order change), then combined two
ways: the *weight soup* (the mean of the seeds' LoRA deltas, exactly one adapter of rank 4r:
one expert pass) and the *output ensemble* (the mean of the seeds' query vectors: four passes;
the one-search mixture serves it exactly). Every model alone and fused with BM25 (min-max,
``--alpha`` on the dense side, top 100 each), on the expert's stopping dev set, its unseen
labelled dev queries where it has any, and its test set.

The settings are the experiment config's own (``[train]``, ``[pseudo]``, a domain's
``overrides``); seed 0 is the experiment's expert. ``--same-init`` gives every seed seed 0's
LoRA initialisation and dropout, so only the batch order differs (the setting in which weight
averages of fine-tuned models are known to work).

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/seed_ensembles.py experiments/paper.toml \
        --out /tmp/seeds            # ~40 min on 2 cores: 24 experts
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from routerretriever import Encoder, load_beir
from routerretriever.evaluation import evaluate
from routerretriever.experiment import ExperimentConfig
from routerretriever.experts import load_expert
from routerretriever.fusion import fuse_lists
from routerretriever.index import FaissIndex
from routerretriever.lexical import BM25Index
from routerretriever.training import _fit, fit_expert, load_training_set, save_expert

DEPTH = 100


def weight_soup(folders: list[Path], out: Path) -> None:
    """One adapter whose delta ``scale * B A`` is the mean of ``folders``' deltas: A stacked,
    B side by side and divided by k, rank k r with the same alpha (so scale / k)."""
    weights = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    k = len(weights)
    merged = {}
    for key in weights[0]:
        axis = 0 if ".lora_A." in key else 1
        merged[key] = torch.cat([w[key] for w in weights], axis) / (1 if axis == 0 else k)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folders[0], out)
    save_file(merged, str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["r"] *= k
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    info = json.loads((out / "expert.json").read_text())
    (out / "expert.json").write_text(json.dumps({**info, "name": out.name}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="store for the seeds' experts")
    parser.add_argument("--domains", default="", help="comma-separated (default: every expert)")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--same-init", action="store_true")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    cfg = ExperimentConfig.load(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = set(args.domains.split(",")) - {""}
    base = Encoder.load()
    print("nDCG@10 x 100, dense / fused with BM25")
    for spec in cfg.expert_domains:
        if wanted and spec.name not in wanted:
            continue
        ts = load_training_set(
            base,
            spec.path,
            split=None if spec.train == "corpus" else spec.train,
            from_corpus=spec.train == "corpus",
            pseudo=cfg.pseudo,
            cache_dir=cfg.cache_dir,
            seed=cfg.train.seed,
            hold_out=spec.hold_out,
            backend=cfg.backend,
        )
        folders = []
        for seed in seeds:
            folder = args.out / f"{spec.name}-s{seed}"
            if not folder.is_dir():
                train = replace(cfg.train, seed=seed, **spec.overrides)
                if args.same_init:  # seed 0's initialisation and dropout, this seed's batches
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seeds[0])
                        model, info = _fit(base, [ts], folder.name, None, train, False)
                else:
                    model, info = fit_expert(base, [ts], folder.name, train=train)
                save_expert(model, info, args.out)
            folders.append(folder)
        soup = args.out / f"{spec.name}-soup"
        weight_soup(folders, soup)
        enc = Encoder.load()
        for folder in [*folders, soup]:
            load_expert(enc, folder)
        test = load_beir(spec.path, "test")
        index = FaissIndex.from_embeddings(ts.doc_ids, ts.doc_emb)
        bm25 = BM25Index.cached(test.corpus, cache_dir=cfg.cache_dir)
        parts = {"dev": (ts.dev_queries, ts.dev_qrels), "test": (test.queries, test.qrels)}
        if ts.unseen_qrels:
            parts["unseen dev"] = (ts.unseen_queries, ts.unseen_qrels)
        names = ["base", *(f"seed {s}" for s in seeds), "weight soup", "output ensemble"]
        rows: dict[str, list[str]] = {n: [] for n in names}
        header = []
        for part, (queries, qrels) in parts.items():
            qids = [q for q in qrels if q in queries]
            header.append(f"{part} (n {len(qids)})")
            texts = [queries[q] for q in qids]
            lexical = bm25.search(texts, DEPTH, exclude_ids=qids)
            vecs = [enc.encode(texts, experts=f.name, show_progress=False) for f in folders]
            mean = np.mean(vecs, axis=0)
            all_vecs = [
                enc.encode(texts, show_progress=False),
                *vecs,
                enc.encode(texts, experts=soup.name, show_progress=False),
                mean / np.linalg.norm(mean, axis=1, keepdims=True),
            ]
            for name, v in zip(names, all_vecs, strict=True):
                dense = index.search(v, DEPTH, exclude_ids=qids)
                fused = fuse_lists(dense, lexical, args.alpha, 10)
                scores = [
                    evaluate(
                        qrels,
                        {q: dict(h[:10]) for q, h in zip(qids, run, strict=True)},
                        ["ndcg@10"],
                    )
                    for run in (dense, fused)
                ]
                rows[name].append(" / ".join(f"{100 * s.scores['ndcg@10']:.1f}" for s in scores))
        print(f"\n{spec.name}\n\n| model | {' | '.join(header)} |\n|---|{'---|' * len(parts)}")
        for name in names:
            print(f"| {name} | {' | '.join(rows[name])} |", flush=True)


if __name__ == "__main__":
    main()
