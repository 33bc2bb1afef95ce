"""How much of the demo's expert is luck: its SciFact expert trained with several seeds, over the
corpus embedded by each runtime, scored on the demo's SciFact test queries.

The settings are the demo config's own (``examples/demo.toml``: ``[train]``, the domain's split
and overrides); only the seed (which also draws the dev queries held out of training) and the
runtime that embeds the corpus for hard negatives and early stopping change. Test queries are
scored over the float32 corpus, so every row is judged alike.

    python benchmarks/demo_seeds.py [--seeds 0,1,2,3] [--runtimes torch,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from transformers.utils import logging as hf_logging

from routerretriever import DenseRetriever, Encoder, evaluate_retriever, load_beir
from routerretriever.experiment import ExperimentConfig
from routerretriever.experts import load_expert
from routerretriever.training import load_training_set, train_expert

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples/demo.toml")
    parser.add_argument("--domain", default="scifact")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--runtimes", default="torch,bfloat16", help="comma-separated backends")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # nine model loads: their bars are noise
    cfg = ExperimentConfig.load(args.config)
    spec = next(d for d in cfg.expert_domains if d.name == args.domain)
    test = load_beir(spec.path, "test")
    base = Encoder.load()
    plain = DenseRetriever(base, backend="torch", cache_dir=cfg.cache_dir)
    base_test = evaluate_retriever(plain, test, ["ndcg@10"]).scores["ndcg@10"]
    print(f"{args.domain} ({spec.path.name}), base model on its test queries: {base_test:.4f}")
    print("| corpus runtime | seed | dev queries | base dev | expert dev | best step | test |")
    print("|---|---|---|---|---|---|---|")
    tests: dict[str, list[float]] = {}
    for runtime in args.runtimes.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            train = replace(cfg.train, seed=seed, **spec.overrides)
            ts = load_training_set(
                base,
                spec.path,
                split=None if spec.train == "corpus" else spec.train,
                from_corpus=spec.train == "corpus",
                pseudo=cfg.pseudo,
                cache_dir=cfg.cache_dir,
                seed=seed,
                backend=runtime,  # type: ignore[arg-type]
            )
            with tempfile.TemporaryDirectory() as store:
                info = train_expert(base, [ts], spec.name, store, train=train, show_progress=False)
                enc = Encoder.load()
                load_expert(enc, Path(store) / spec.name)
                routed = DenseRetriever(
                    enc, expert=spec.name, backend="torch", cache_dir=cfg.cache_dir
                )
                score = evaluate_retriever(routed, test, ["ndcg@10"]).scores["ndcg@10"]
            tests.setdefault(runtime, []).append(score)
            print(
                f"| {runtime} | {seed} | {info.dev['queries']} | {info.dev['base_ndcg@10']:.4f} | "
                f"{info.dev['ndcg@10']:.4f} | {info.training['best_step']} | {score:.4f} |",
                flush=True,
            )
    for runtime, scores in tests.items():
        spread = f"{min(scores):.4f}-{max(scores):.4f}"
        print(f"{runtime}: test mean {statistics.mean(scores):.4f}, range {spread}")


if __name__ == "__main__":
    main()
