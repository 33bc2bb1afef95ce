"""``routerretriever experiment CONFIG``: train what is missing, score, run every system and
the pool, save the default system, write the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from routerretriever.devices import describe
from routerretriever.encoder import BASE
from routerretriever.experiment import Experiment, ExperimentConfig, train_all
from routerretriever.hybrid_eval import run_pool
from routerretriever.pilots import build_pilots
from routerretriever.report import write_report
from routerretriever.retriever import RouterRetriever
from routerretriever.router import Rule
from routerretriever.systems import run_systems

logger = logging.getLogger(__name__)


def run_experiment(config: str | Path, rule: Rule | None = None) -> Path:
    """Train what is missing, score everything, write the report; returns ``results.md``."""
    cfg = ExperimentConfig.load(config)
    cfg.check_paths()  # now, not when the first expert starts training
    start = time.perf_counter()
    train_all(cfg)
    exp = Experiment(cfg)
    res = run_systems(exp, rule)
    res["environment"] = describe(exp.encoder.device) | {
        "corpus_runtimes": sorted({d.backend for d in exp.domains.values()})
    }
    logger.info("the pool with a lexical member: every candidate on dev and test")
    res["pool"], systems = run_pool(exp, exp.instances("train"), res["rule"])
    # The default system travels: experts, routing policy and BM25 settings in one folder
    # (each family's choice too, under routers/, for benchmarks/route_speed.py).
    for family, (policy, alpha, how, base_alpha) in systems.items():
        rr = RouterRetriever(
            exp.encoder,
            policy=policy,
            alpha=alpha,
            bm25=cfg.bm25,
            normalise=how,
            base_alpha=base_alpha,
        )
        rr.save(cfg.results / "routers" / family)
        if family == res["pool"]["default"]["family"]:
            rr.save(cfg.results / "router")
    res["seconds"] = round(time.perf_counter() - start, 1)
    # Save the pilot libraries (with and without the base model in the pool) for reuse.
    train_inst = exp.instances("train")
    build_pilots(train_inst, exp.experts).save(cfg.results / "pilots")
    build_pilots(train_inst, [BASE, *exp.experts]).save(cfg.results / "pilots-with-base")
    for k in cfg.routing_layers:
        insts_k = exp.in_space({}, {"train": train_inst}, k)[1]["train"]
        build_pilots(insts_k, exp.experts, layers=k).save(cfg.results / f"pilots-{k}-layers")
    logger.info("writing the report")
    return write_report(exp, res)
