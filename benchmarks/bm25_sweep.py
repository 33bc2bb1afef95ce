"""Pick the lexical member's BM25 k1 and b on the labelled dev queries, never on test.

Scores a saved routed system (its policy and dense weight, e.g. the experiment's default under
``results/router``) fused with BM25 at each setting, on the dev instances of the experiment's
domains with labelled dev queries (pseudo-query instances are crops of their own positive
document and flatter BM25, so they do not vote), and prints nDCG@10 per domain, fused and BM25
alone, and the best setting by the mean of the fused column.

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/bm25_sweep.py experiments/paper.toml \
        --router runs/paper/results/router --settings 1.5:0.75,1.2:0.75,0.9:0.4,2.0:0.6
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

DEFAULT_SETTINGS = (
    "1.5:0.75,1.2:0.75,0.9:0.4,0.9:0.75,1.2:0.5,2.0:0.6,2.0:0.75,2.0:0.9,2.5:0.75,3.0:0.75"
)


def settings(text: str) -> list[tuple[float, float]]:
    """argparse type: comma-separated ``K1:B`` pairs (checked as BM25Config checks them)."""
    from routerretriever.lexical import BM25Config

    out = []
    for item in text.split(","):
        try:
            k1, b = (float(x) for x in item.split(":"))
            BM25Config(k1=k1, b=b)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{item[:40]!r} is not K1:B ({e})") from None
        out.append((k1, b))
    return out


def main() -> None:
    import numpy as np

    from routerretriever.data import load_beir
    from routerretriever.encoder import BASE
    from routerretriever.experiment import Experiment, ExperimentConfig
    from routerretriever.hybrid_eval import query_sets
    from routerretriever.lexical import BM25Config, BM25Index
    from routerretriever.policy import load_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the experiment's TOML file")
    parser.add_argument("--router", type=Path, required=True, help="a saved routed system")
    parser.add_argument(
        "--settings",
        type=settings,
        default=settings(DEFAULT_SETTINGS),
        help="K1:B pairs, comma-separated",
    )
    args = parser.parse_args()
    if not (args.router / "router.json").is_file():
        parser.error(f"--router {args.router}: no router.json (a folder the experiment saved)")
    logging.basicConfig(level=logging.WARNING)

    cfg = ExperimentConfig.load(args.config)
    exp = Experiment(cfg)
    exp.instances("dev")  # samples the dev instances (cached) that query_sets reads
    saved = json.loads((args.router / "router.json").read_text())
    policy = load_policy(args.router, saved["policy"])
    alpha = float(saved["alpha"])
    labelled = [d for d in cfg.expert_domains if d.train != "corpus"]
    members = [BASE, *exp.experts]
    rows: dict[tuple[float, float], dict[str, tuple[float, float]]] = {s: {} for s in args.settings}
    for spec in labelled:
        corpus = load_beir(spec.path, cfg.test_split).corpus
        for k1, b in args.settings:
            exp.lexical[spec.name] = BM25Index.build(corpus, BM25Config(k1=k1, b=b))
            qs = query_sets(exp, "dev", [spec.name], members)[spec.name]
            weights = policy.weights(qs.base)[0]
            fused = qs.score(policy.members, weights, np.full(len(qs.qids), alpha))
            rows[(k1, b)][spec.name] = (float(fused.mean()), float(qs.ndcg(qs.lexical).mean()))
    names = [d.name for d in labelled]
    print(f"dev nDCG@10 x 100 of {args.router} (alpha {alpha}) fused with BM25, and BM25 alone")
    print("| k1 | b | " + " | ".join(f"{n} fused | {n} BM25" for n in names) + " | mean fused |")
    print("|---|---|" + "---|---|" * len(names) + "---|")
    for (k1, b), per in rows.items():
        cells = " | ".join(f"{per[n][0] * 100:.1f} | {per[n][1] * 100:.1f}" for n in names)
        mean = np.mean([per[n][0] for n in names]) * 100
        print(f"| {k1:g} | {b:g} | {cells} | {mean:.2f} |")
    best = max(rows, key=lambda s: np.mean([rows[s][n][0] for n in names]))
    print(f"best on labelled dev: k1 {best[0]:g}, b {best[1]:g}")


if __name__ == "__main__":
    main()
