"""Pick the expert learning rate on a dev set within a CPU budget.

Trains one expert per learning rate with the same step budget and early stopping, and prints the
best dev nDCG@10 of each (never the test split), the step it was reached at, and the time.

    python benchmarks/lr_sweep.py --dataset ../shared/data/beir/scifact --split train \
        --lrs 1e-4,3e-4,1e-3,3e-3 --max-steps 150
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main() -> None:
    from routerretriever import Encoder
    from routerretriever.training import TrainConfig, fit_expert, load_training_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--from-corpus", action="store_true")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--patience", type=int, default=6)
    parser.add_argument("--mine-skip", type=int, default=0)
    parser.add_argument("--hard-negatives", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    enc = Encoder.load()
    ts = load_training_set(
        enc,
        args.dataset,
        split=None if args.from_corpus else args.split,
        from_corpus=args.from_corpus,
    )
    print(
        f"{args.dataset.name}: {len(ts.positives)} training queries, {len(ts.dev_qrels)} dev "
        f"queries ({ts.source}); budget {args.max_steps} steps; {args.hard_negatives} mined "
        f"negatives per query from base-model rank {args.mine_skip}"
    )
    print("| lr | dev nDCG@10 (base) | best | best step | steps run | seconds |")
    print("|---|---|---|---|---|---|")
    for lr in (float(x) for x in args.lrs.split(",")):
        cfg = TrainConfig(
            lr=lr,
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            patience=args.patience,
            mine_skip=args.mine_skip,
            hard_negatives=args.hard_negatives,
        )
        _, info = fit_expert(enc, [ts], "sweep", train=cfg, show_progress=False)
        print(
            f"| {lr:g} | {info.dev['base_ndcg@10']:.4f} | {info.dev['ndcg@10']:.4f} "
            f"| {info.training['best_step']} | {info.training['steps_run']} "
            f"| {info.seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
