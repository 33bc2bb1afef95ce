"""Does an expert's own early-stopping set flatter it? Its gain there against held-out queries.

For each domain of an experiment whose labelled dev split holds queries its expert never saw
(beyond the ``max_dev`` it early-stopped on), prints the expert's gain in nDCG@10 over the base
model, both fused with BM25, on the stopping set and on the unseen queries, with a one-sided
paired t-test. Dev data only: no test judgments are read.

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/stopping_bias.py experiments/paper.toml
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main() -> None:
    import numpy as np
    from scipy import stats

    from routerretriever.encoder import BASE
    from routerretriever.experiment import Experiment, ExperimentConfig
    from routerretriever.hybrid_eval import DEPTH, QuerySet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the experiment's TOML file")
    parser.add_argument(
        "--fusion",
        default="minmax:0.5,max:0.6,max:0.7",
        help="NORMALISATION:ALPHA pairs, comma-separated (default: %(default)s)",
    )
    args = parser.parse_args()
    fusions = [(h, float(a)) for h, a in (x.split(":") for x in args.fusion.split(","))]
    logging.basicConfig(level=logging.WARNING)

    exp = Experiment(ExperimentConfig.load(args.config))
    exp.instances("dev")  # loads each domain's training set (its stopping and unseen queries)
    print("| expert | queries | n | fusion | base mix | base | expert | gain | p (gain > 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in exp.cfg.expert_domains:
        ts = exp._training_sets[spec.name]
        if not ts.unseen_qrels:
            continue
        dom = exp.domains[spec.name]
        for label, queries, qrels in (
            ("early-stopped on", ts.dev_queries, ts.dev_qrels),
            ("never seen", ts.unseen_queries, ts.unseen_qrels),
        ):
            qids = sorted(q for q in qrels if q in queries)
            texts = [queries[q] for q in qids]
            emb = {
                BASE: exp.encoder.encode(texts, show_progress=False),
                spec.name: exp.encoder.encode(texts, experts=spec.name, show_progress=False),
            }
            lexical = exp.lexical[spec.name].search(texts, DEPTH, qids)
            qs = QuerySet(spec.name, qids, qrels, emb, dom.index, lexical, labelled=True)
            for how, alpha in fusions:
                alphas = np.full(len(qids), alpha)
                base = qs.score([BASE], np.ones((len(qids), 1)), alphas, how)  # type: ignore[arg-type]
                for mix in (0.0, 0.3):
                    w = np.tile([mix, 1.0 - mix], (len(qids), 1))
                    got = qs.score([BASE, spec.name], w, alphas, how)  # type: ignore[arg-type]
                    p = stats.ttest_1samp(got - base, 0.0, alternative="greater").pvalue
                    print(
                        f"| {spec.name} | {label} | {len(qids)} | {how}, α {alpha} | {mix} | "
                        f"{100 * base.mean():.1f} | {100 * got.mean():.1f} | "
                        f"{100 * (got - base).mean():+.2f} | {p:.3f} |"
                    )


if __name__ == "__main__":
    main()
