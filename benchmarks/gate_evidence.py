"""How close to its threshold does the experiment's gate decide, and how far apart are the fast
families on the labelled dev queries? Dev data only; no test set is scored.

For each gated family (base mix 0 and 0.3) at each lexical weight: every expert's dev
instances routed to it, how many of them its expert changes at all, the mean nDCG@10 gain over
the base model (both fused with BM25), and the one-sided paired t-test's p-value, fitted on all
dev instances and on each half, and how many folds' fits keep the expert (the cross-fitted dev
scores come from those fits: halves until this round, ten folds now). Then each fast
family's choice (the experiment's ``results.json``) against base + BM25 on the labelled dev
queries, with the standard error of the paired difference.

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/gate_evidence.py experiments/paper.toml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from routerretriever.encoder import BASE
from routerretriever.experiment import Experiment, ExperimentConfig
from routerretriever.hybrid_eval import Library, candidate_grid, evaluate_candidates, query_sets
from routerretriever.pilots import build_pilots
from routerretriever.policy import PilotPolicy, declined_experts
from routerretriever.router import expert_scores
from routerretriever.selection import MAX_PASSES, dev_margin


def p_greater(g: np.ndarray) -> float:
    return float(stats.ttest_1samp(g, 0.0, alternative="greater").pvalue) if len(g) > 1 else 1.0


def kept(e: str, routed: np.ndarray, gains: np.ndarray, fit: np.ndarray) -> bool:
    """Whether the experiment's gate, fitted on the instances ``fit``, keeps expert ``e``."""
    return not declined_experts(list(routed[fit]), gains[fit], [e])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--alphas", default="0.4,0.5,0.6")
    args = parser.parse_args()
    cfg = ExperimentConfig.load(args.config)
    exp = Experiment(cfg)
    seen = [d.name for d in cfg.expert_domains]
    members = [BASE, *exp.experts]
    train_inst = exp.instances("train")
    train = query_sets(exp, "train", seen, members)
    exp.instances("choice")
    dev = query_sets(exp, "choice", seen, members)
    rule = json.loads((cfg.results / "results.json").read_text())["rule"]
    pilots = build_pilots(train_inst, exp.experts)
    print(
        "| base mix | α | expert | routed | changed | mean gain | p (all) | p (halves) "
        "| kept: all dev / 2 folds / 10 folds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mix in (0.0, 0.3):
        policy = PilotPolicy(pilots, rule, mix)
        for alpha in (float(a) for a in args.alphas.split(",")):
            routed, gains, pos = [], [], []
            for qs in dev.values():
                routed += [
                    pilots.experts[b] for b in expert_scores(qs.base, pilots, rule).argmax(1)
                ]
                a = np.full(len(qs.qids), alpha)
                gains.append(
                    qs.score(policy.members, policy.weights(qs.base)[0], a)
                    - qs.score([BASE], np.ones((len(qs.qids), 1)), a)
                )
                pos += list(range(len(qs.qids)))
            r, g, i = np.array(routed), np.concatenate(gains), np.array(pos)

            for e in exp.experts:
                mine = g[r == e]
                halves = ", ".join(f"{p_greater(g[(r == e) & (i % 2 != f)]):.3f}" for f in (0, 1))
                folds = " / ".join(
                    f"{sum(kept(e, r, g, i % k != f) for f in range(k))} of {k}" for k in (2, 10)
                )
                print(
                    f"| {mix} | {alpha} | {e} | {len(mine)} | {int((np.abs(mine) > 1e-12).sum())} "
                    f"| {100 * mine.mean():+.2f} | {p_greater(mine):.3f} | {halves} "
                    f"| {'yes' if kept(e, r, g, np.ones(len(g), bool)) else 'no'} / {folds} |"
                )
    # The fast families' choices against base + BM25 on the labelled dev queries (cross-fitted
    # where a family fits on dev, as the experiment scores them).
    report = json.loads((cfg.results / "results.json").read_text())["pool"]
    cost = {c["name"]: c["cost"] for c in report["candidates"]}
    chosen = [n for n in report["family_choice"].values() if cost[n] <= MAX_PASSES + 1e-9]
    labelled = report["labelled_dev_domains"]
    lib = Library([train[d] for d in seen], train_inst, list(exp.experts), [dev[d] for d in seen])
    cands = [c for c in candidate_grid(rule, cfg.normalisations) if c.name in chosen]
    evaluate_candidates(cands, lib, {d: dev[d] for d in labelled}, {})
    ref = next(c for c in cands if c.name == report["family_choice"]["base"])
    print(f"\n| family's choice | labelled dev | minus {ref.name} | SE of the difference |")
    print("|---|---|---|---|")
    for c in cands:
        m = dev_margin(c, ref, labelled)
        print(
            f"| {c.name} | {100 * c.dev_mean():.2f} | {100 * m.difference:+.2f} | {100 * m.se:.2f} |"
        )


if __name__ == "__main__":
    main()
