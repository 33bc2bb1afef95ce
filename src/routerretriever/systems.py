"""The paper's systems from per-query scores: baselines, routers, classifiers, oracles (Table 1),
zero-shot (Table 2) and growth (Table 3).

A routed system's score is each query's score under the model it was routed to: a query's
nDCG@10 depends only on its own ranking, so this is exact (:class:`Experiment` holds the scores).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routerretriever.encoder import BASE
from routerretriever.experiment import MULTITASK, Experiment
from routerretriever.pilots import DomainInstances, PilotLibrary, build_pilots
from routerretriever.router import RULES, Rule, expert_scores

logger = logging.getLogger(__name__)


# -- systems ------------------------------------------------------------------------------


def _train_linear(x: np.ndarray, y: np.ndarray, n_out: int, binary: bool, seed: int) -> Any:
    """A linear layer over base embeddings: softmax head, or one sigmoid per output."""
    import torch

    xt = torch.from_numpy(x)
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG state untouched
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], n_out)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    yt = torch.from_numpy(y)
    for _ in range(300):
        logits = head(xt)  # (n, T)
        if binary:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.nn.functional.one_hot(yt, n_out).float()
            )
        else:
            loss = torch.nn.functional.cross_entropy(logits, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda q: head(torch.from_numpy(q)).detach().numpy()


@dataclass
class SystemResult:
    name: str
    per_domain: dict[str, float]
    routes: dict[str, dict[str, float]] = field(default_factory=dict)  # domain -> expert -> share

    @property
    def average(self) -> float:
        return float(np.mean(list(self.per_domain.values())))


def _routed(name: str, test: dict, domains: Sequence[str], choose) -> SystemResult:
    """Score of routing each test query to ``choose(domain, emb) -> list of model names``."""
    per, routes = {}, {}
    for d in domains:
        picks = choose(d, test[d]["_emb"])
        per[d] = float(np.mean([test[d][m][i] for i, m in enumerate(picks)]))
        names, counts = np.unique(picks, return_counts=True)
        routes[d] = {str(n): float(c / len(picks)) for n, c in zip(names, counts, strict=True)}
    return SystemResult(name, per, routes)


def _oracle_picks(test_d: dict[str, np.ndarray], experts: list[str], domain: str) -> list[str]:
    """Each query's best expert; a tie goes to the domain's own expert when it is among the best
    (so the routing heatmap does not credit ties to whichever expert is listed first)."""
    order = sorted(experts, key=lambda e: e != domain)  # own expert first, then as listed
    return [order[j] for j in np.stack([test_d[m] for m in order], 1).argmax(1)]


def _dev_score(lib: PilotLibrary, dev: list[DomainInstances], rule: Rule) -> float:
    """Mean nDCG@10 of the dev instances when routed by ``lib`` with ``rule``."""
    s = [
        inst.scores[lib.experts[j]][i]
        for inst in dev
        for i, j in enumerate(expert_scores(inst.embeddings, lib, rule).argmax(1))
    ]
    return float(np.mean(s))


def run_systems(exp: Experiment, rule: Rule | None = None) -> dict[str, Any]:
    """All systems of the paper's Table 1, plus zero-shot (Table 2) and growth (Table 3)."""
    logger.info("the paper's systems: baselines, routers, oracles, zero-shot, growth")
    cfg = exp.cfg
    test = exp.test_scores()
    train_inst, dev_inst = exp.instances("train"), exp.instances("dev")
    experts = exp.experts
    seen = [d.name for d in cfg.expert_domains]
    unseen = [d.name for d in cfg.domains if d.train == "none"]

    def single(model: str, name: str) -> SystemResult:
        return SystemResult(name, {d: float(test[d][model].mean()) for d in seen})

    def router(pool: list[str], r: Rule, insts: list[DomainInstances]) -> Any:
        lib = build_pilots(insts, pool)
        return lambda d, emb: [lib.experts[j] for j in expert_scores(emb, lib, r).argmax(1)]

    # Pick the routing rule on the dev instances (never the test sets).
    lib = build_pilots(train_inst, experts)
    dev_scores: dict[str, float] = {r: _dev_score(lib, dev_inst, r) for r in RULES}
    chosen: Rule = rule if rule is not None else max(RULES, key=lambda r: dev_scores[r])

    systems: list[SystemResult] = [single(BASE, "Base model")]
    if MULTITASK in exp.models:
        systems.append(single(MULTITASK, "Multi-task LoRA"))
    # Routers trained on the same training instances, labelled by their domain.
    x = np.concatenate([i.embeddings for i in train_inst])
    y = np.concatenate([np.full(len(i.ids), k) for k, i in enumerate(train_inst)])
    head = _train_linear(x, y, len(experts), binary=False, seed=cfg.seed)
    binary = _train_linear(x, y, len(experts), binary=True, seed=cfg.seed)
    systems.append(
        _routed(
            "ExpertClassifierRouter",
            test,
            seen,
            lambda d, e: [experts[j] for j in binary(e).argmax(1)],
        )
    )
    systems.append(
        _routed(
            "ClassificationHeadRouter",
            test,
            seen,
            lambda d, e: [experts[j] for j in head(e).argmax(1)],
        )
    )
    rng = np.random.default_rng(cfg.seed)
    sample = [
        (
            i.embeddings[
                rng.choice(len(i.ids), min(cfg.classifier_instances, len(i.ids)), replace=False)
            ],
            k,
        )
        for k, i in enumerate(train_inst)
    ]
    sx = np.concatenate([s for s, _ in sample])
    sy = np.concatenate([np.full(len(s), k) for s, k in sample])
    systems.append(
        _routed(
            "DatasetRouter", test, seen, lambda d, e: [experts[sy[j]] for j in (e @ sx.T).argmax(1)]
        )
    )
    for r in RULES:
        systems.append(
            _routed(f"RouterRetriever ({r})", test, seen, router(experts, r, train_inst))
        )
    with_base = [BASE, *experts]
    for r in RULES:
        systems.append(
            _routed(f"RouterRetriever + base ({r})", test, seen, router(with_base, r, train_inst))
        )
    bf16_agreement: dict[str, float] = {}
    if cfg.routing_bf16:  # the routing pass in bfloat16; pilots as built (float32)
        import torch

        test_b = exp.in_space(test, {}, dtype=torch.bfloat16)[0]
        name = f"RouterRetriever ({chosen}, bf16 routing)"
        systems.append(_routed(name, test_b, seen, router(experts, chosen, train_inst)))
        bf16_agreement = {
            d: float(
                np.mean(
                    expert_scores(test_b[d]["_emb"], lib, chosen).argmax(1)
                    == expert_scores(test[d]["_emb"], lib, chosen).argmax(1)
                )
            )
            for d in seen
        }
    # Routing on the first k layers' pooled states (pilots built in the same space).
    for k in cfg.routing_layers:
        test_k, insts_k = exp.in_space(test, {"train": train_inst, "dev": dev_inst}, k)
        dev_scores[f"{chosen}, {k}-layer routing"] = _dev_score(
            build_pilots(insts_k["train"], experts), insts_k["dev"], chosen
        )
        systems.append(
            _routed(
                f"RouterRetriever ({chosen}, {k}-layer routing)",
                test_k,
                seen,
                router(experts, chosen, insts_k["train"]),
            )
        )
    oracle_best = {d: max(experts, key=lambda m: test[d][m].mean()) for d in seen}
    systems.append(
        SystemResult(
            "DatasetOracle",
            {d: float(test[d][oracle_best[d]].mean()) for d in seen},
            {d: {oracle_best[d]: 1.0} for d in seen},
        )
    )
    systems.append(
        _routed(
            "InstanceOracle",
            test,
            seen,
            lambda d, e: _oracle_picks(test[d], experts, d),
        )
    )

    per_expert = {m: {d: float(test[d][m].mean()) for d in [*seen, *unseen]} for m in exp.models}

    # Zero-shot (Table 2): each domain without its own expert and instances; unseen domains with all.
    zero: dict[str, dict[str, float]] = {"Base model": {}}
    if MULTITASK in exp.models:
        zero["Multi-task LoRA"] = {}
    zero[f"RouterRetriever ({chosen})"] = {}
    zero["InstanceOracle"] = {}
    for d in [*seen, *unseen]:
        pool = [e for e in experts if e != d]
        insts = [i for i in train_inst if i.domain != d]
        zero["Base model"][d] = float(test[d][BASE].mean())
        if MULTITASK in exp.models:
            zero["Multi-task LoRA"][d] = float(test[d][MULTITASK].mean())
        zero[f"RouterRetriever ({chosen})"][d] = _routed(
            "", test, [d], router(pool, chosen, insts)
        ).per_domain[d]
        zero["InstanceOracle"][d] = float(np.stack([test[d][m] for m in pool], 1).max(1).mean())

    # Growth (Table 3, Figures 4 and 5): add experts (and their domains) one at a time.
    growth = []
    for m in range(1, len(experts) + 1):
        pool, insts = experts[:m], train_inst[:m]
        rr = _routed("", test, seen, router(pool, chosen, insts))
        oracle = float(
            np.mean([np.stack([test[d][e] for e in pool], 1).max(1).mean() for d in seen])
        )
        growth.append({"experts": pool, "router": rr.average, "instance_oracle": oracle})

    accuracy = {}
    rr_main = next(s for s in systems if s.name == f"RouterRetriever ({chosen})")
    for d in seen:
        accuracy[d] = rr_main.routes[d].get(d, 0.0)
    return {
        "systems": systems,
        "per_expert": per_expert,
        "zero_shot": zero,
        "growth": growth,
        "rule": chosen,
        "dev_rule_scores": dev_scores,
        "routing_accuracy": accuracy,
        "bf16_agreement": bf16_agreement,
        "seen": seen,
        "unseen": unseen,
        "dataset_oracle_choice": oracle_best,
        "instances": {i.domain: len(i.ids) for i in train_inst},
        "pilots": len(build_pilots(train_inst, experts)),
        "test_queries": {d: len(test[d][BASE]) for d in [*seen, *unseen]},
    }
