"""The pool with a lexical member, measured: every candidate system's dev and test scores.

A candidate turns each query's base embedding into member weights (which dense members' query
vectors are mixed, :func:`routerretriever.fusion.mix_queries`) and a dense weight ``alpha``
(fused with BM25 by :func:`routerretriever.fusion.fuse_scores`). Unlike the paper's systems,
whose scores follow from each model's per-query nDCG, a mixture or a fusion is a new ranking:
each is searched and scored here, from the member embeddings the experiment already cached.

Choices are made on dev instances only: the experiment's ``"choice"`` instances, which are a
domain's labelled queries its expert never saw where it has enough, else the set its expert
early-stopped on (that set flatters the expert: on NFCorpus's, its expert fused with BM25 gained
+1.1 nDCG@10, p 0.005; on the 124 dev-split queries it never saw, −0.4; docs/results.md).
Pseudo-query instances are crops of their own positive document, so BM25 finds them by their
words far more easily than real queries: the lexical weight and the default's family are
therefore chosen on the domains with labelled dev queries (the report shows what choosing
``alpha`` on all would give); gates are fitted on the dev instances of every domain (an
unlabelled domain's expert has no other held-out evidence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from routerretriever.corpora import CorpusScope
from routerretriever.encoder import BASE
from routerretriever.fusion import (
    Normalisation,
    reciprocal_rank,
)
from routerretriever.pilots import build_pilots
from routerretriever.policy import (
    NeighbourPolicy,
    PilotPolicy,
    Policy,
    declined_experts,
    scoped_declines,
)
from routerretriever.querysets import DEPTH, Library, QuerySet, query_sets
from routerretriever.router import Rule, expert_scores
from routerretriever.selection import MAX_PASSES, choose, lead_or_base

if TYPE_CHECKING:
    from routerretriever.experiment import Experiment

logger = logging.getLogger(__name__)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # dense weights tried


PolicyMaker = Callable[[Library], Policy]


def pilot_maker(rule: Rule, base_mix: float = 0.0) -> PolicyMaker:
    """Today's router (one expert by its pilots), mixed with the base vector at ``base_mix``."""
    return lambda lib: PilotPolicy(build_pilots(lib.instances, lib.experts), rule, base_mix)


def gated_maker(
    rule: Rule,
    alpha: float,
    base_mix: float = 0.0,
    how: Normalisation = "minmax",
    base_alpha: float | None = None,
) -> PolicyMaker:
    """Today's router that declines each expert whose routed held-out instances (``lib.dev``)
    show no significant gain over the base model, fused with BM25 at ``alpha`` and
    ``base_alpha`` (default ``alpha``) respectively (lists normalised ``how``;
    :func:`routerretriever.policy.declined_experts`). With ``base_alpha`` given, the gate is
    fitted on each corpus apart (:func:`routerretriever.policy.scoped_declines`): an expert is
    kept only on the corpora whose dev instances it measurably helped."""

    def make(lib: Library) -> Policy:
        pilots = build_pilots(lib.instances, lib.experts)
        policy = PilotPolicy(pilots, rule, base_mix)
        routed, gains, corpora = [], [], []
        for qs in lib.dev:
            best = expert_scores(qs.base, pilots, rule).argmax(axis=1)
            routed += [pilots.experts[b] for b in best]
            corpora += [qs.domain] * len(qs.qids)
            n = len(qs.qids)
            gains.append(
                qs.score(policy.members, policy.weights(qs.base)[0], np.full(n, alpha), how)
                - qs.score(
                    [BASE],
                    np.ones((n, 1)),
                    np.full(n, alpha if base_alpha is None else base_alpha),
                    how,
                )
            )
        gain = np.concatenate(gains) if gains else np.zeros(0)
        if base_alpha is None:
            return PilotPolicy(pilots, rule, base_mix, declined_experts(routed, gain, lib.experts))
        if any(qs.corpus is None for qs in lib.dev):
            raise ValueError("a gate per corpus needs each dev set's corpus (QuerySet.corpus)")
        per = scoped_declines(routed, gain, corpora, lib.experts)
        kept = {e: tuple(c for c, out in per.items() if e not in out) for e in lib.experts}
        sketches = {qs.domain: qs.corpus for qs in lib.dev if qs.corpus is not None}
        scope = CorpusScope(sketches, {e: cs for e, cs in kept.items() if cs})
        decline = tuple(e for e in lib.experts if not kept[e])
        return PilotPolicy(pilots, rule, base_mix, decline, scope)

    return make


def neighbour_maker(k: int, temperature: float, top: int | None) -> PolicyMaker:
    """:class:`NeighbourPolicy` over the base model and every expert (``top=None``: all)."""
    return lambda lib: NeighbourPolicy(
        lib.members, lib.emb, lib.member_scores, k, 0.05, temperature, top or len(lib.members)
    )


def rrf_run(qs: QuerySet, members: Sequence[str], lexical: bool) -> np.ndarray:
    """Reciprocal-rank fusion of every member's ranking (and BM25's), per-query nDCG@10."""
    runs = [
        reciprocal_rank(
            [qs.dense_member(m)[i] for m in members] + ([qs.lexical[i]] if lexical else []), DEPTH
        )
        for i in range(len(qs.qids))
    ]
    return qs.ndcg(runs)


@dataclass
class Candidate:
    """One candidate system: its family, settings, and scores."""

    name: str
    family: str
    make: PolicyMaker
    alpha: float
    dev: dict[str, float] = field(default_factory=dict)  # domain -> mean dev nDCG@10
    dev_scores: dict[str, np.ndarray] = field(default_factory=dict)  # domain -> per dev query
    test: dict[str, float] = field(default_factory=dict)  # domain -> mean test nDCG@10
    cost: float = 1.0  # dense passes per query beyond the routing pass (mean, on dev)
    fits_dev: bool = False  # fitted on dev instances too: its dev scores are cross-fitted
    how: Normalisation = "minmax"  # how each list is normalised before fusion
    base_alpha: float | None = None  # dense weight of base-only queries (None: alpha)

    def dev_mean(self, domains: Sequence[str] | None = None) -> float:
        keys = domains if domains is not None else list(self.dev)
        return float(np.mean([self.dev[d] for d in keys]))


def run_policy(
    policy: Policy,
    alpha: float,
    qs: QuerySet,
    how: Normalisation = "minmax",
    base_alpha: float | None = None,
) -> tuple[np.ndarray, float]:
    """Per-query nDCG@10 of ``policy`` (as it routes on ``qs``'s corpus) fused with BM25 at
    ``alpha``, or ``base_alpha`` for a query on the base model alone (lists normalised ``how``),
    on ``qs``, and its cost (expert passes per query beyond the routing pass); as
    :class:`routerretriever.retriever.RouterRetriever` searches."""
    on_corpus = getattr(policy, "on_corpus", None)
    if on_corpus is not None and qs.corpus is not None:
        policy = on_corpus(qs.corpus)
    w = policy.weights(qs.base)[0]  # (n, m)
    members = np.array(policy.members)
    used = (w > 0) & (members != BASE)[None, :]
    alone = (w[:, members == BASE] >= 1.0 - 1e-9).any(axis=1)
    alphas = np.where(alone, alpha if base_alpha is None else base_alpha, alpha)
    return qs.score(policy.members, w, alphas, how), float(used.sum(axis=1).mean())


def candidate_grid(
    rule: Rule, normalisations: Sequence[Normalisation] = ("minmax",)
) -> list[Candidate]:
    """Every candidate system, with each lexical weight in :data:`ALPHAS` and each of
    ``normalisations`` (``alpha = 1`` needs none, so it is listed once)."""
    return [
        c
        for a in ALPHAS
        for how in (normalisations if a < 1.0 else normalisations[:1])
        for c in _candidates(rule, a, how)
    ]


def corpus_gated_grid(
    rule: Rule, base_alpha: float, normalisations: Sequence[Normalisation] = ("minmax",)
) -> list[Candidate]:
    """The router gated per corpus (:func:`gated_maker` with ``base_alpha``), with each expert
    weight in :data:`ALPHAS` and each of ``normalisations``: a query whose expert is declined on
    the searched corpus gets base + BM25 at ``base_alpha``, the base family's dev choice."""
    out = []
    for a in ALPHAS:
        for how in normalisations if a < 1.0 else normalisations[:1]:
            norm = "" if how == "minmax" else f", {how}-normalised"
            for beta in (0.0, 0.3):
                mix = f", base mix {beta}" if beta else ""
                out.append(
                    Candidate(
                        f"RouterRetriever ({rule}), gated per corpus{mix} + BM25 "
                        f"(α {a}; base α {base_alpha}{norm})",
                        f"pilot-gated-corpus{mix.replace(', base mix ', '-mix-')}",
                        gated_maker(rule, a, beta, how, base_alpha),
                        a,
                        how=how,
                        fits_dev=True,
                        base_alpha=base_alpha,
                    )
                )
    return out


def _candidates(rule: Rule, a: float, how: Normalisation) -> list[Candidate]:
    """Every family at dense weight ``a``, its lists normalised ``how``."""
    if a == 1.0:
        lex = ""
    else:
        lex = f" + BM25 (α {a})" if how == "minmax" else f" + BM25 (α {a}, {how}-normalised)"
    out = [
        Candidate(f"Base model{lex}", "base", pilot_maker(rule, 1.0), a, how=how),
        Candidate(f"RouterRetriever ({rule}){lex}", "pilot", pilot_maker(rule), a, how=how),
    ]
    for beta in (0.0, 0.3):
        mix = f", base mix {beta}" if beta else ""
        out.append(
            Candidate(
                f"RouterRetriever ({rule}), gated{mix}{lex}",
                f"pilot-gated{mix.replace(', base mix ', '-mix-')}",
                gated_maker(rule, a, beta, how),
                a,
                how=how,
                fits_dev=True,
            )
        )
    for beta in (0.3, 0.5):
        out.append(
            Candidate(
                f"RouterRetriever ({rule}), base mix {beta}{lex}",
                f"pilot-mix-{beta}",
                pilot_maker(rule, beta),
                a,
                how=how,
            )
        )
    for k in (20, 80):
        for temp in (0.02, 0.05):
            for top in (1, 2, None):
                label = {1: "expected-gain routing", 2: "top-2 mixture"}.get(top or 0, "mixture")
                out.append(
                    Candidate(
                        f"k-NN {label} (K {k}, T {temp}){lex}",
                        f"knn-{k}-{temp}-{top or 'all'}",
                        neighbour_maker(k, temp, top),
                        a,
                        how=how,
                    )
                )
    return out


FOLDS = 10  # cross-fitting folds: each fit sees 90% of the dev instances (docs/results.md)


def cross_fitted(
    c: Candidate, lib: Library, dev: dict[str, QuerySet], folds: int = FOLDS
) -> dict[str, tuple[np.ndarray, float]]:
    """``c`` on each dev set of ``dev`` (sets of ``lib.dev``), per query, and its cost: every
    ``folds``-th instance of every dev set (fold ``f``: positions ``i % folds == f``) scored
    by ``c`` as fitted with that fold held out of every dev set, so no instance's own score
    decides its system. Many folds, not two halves: each fit then sees nearly the evidence
    the saved system's fit sees, and so decides as it does (with halves, a gate near its
    threshold declined on both halves an expert the whole dev set keeps)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    scores = {d: np.zeros(len(qs.qids)) for d, qs in dev.items()}
    passes = dict.fromkeys(dev, 0.0)
    for fold in range(folds):
        held = [s.subset(np.flatnonzero(np.arange(len(s.qids)) % folds != fold)) for s in lib.dev]
        policy = c.make(Library(lib.sets, lib.instances, lib.experts, held))
        for d, qs in dev.items():
            part = np.flatnonzero(np.arange(len(qs.qids)) % folds == fold)
            if len(part):
                s, cost = run_policy(policy, c.alpha, qs.subset(part), c.how, c.base_alpha)
                scores[d][part] = s
                passes[d] += cost * len(part)
    return {d: (scores[d], passes[d] / max(len(qs.qids), 1)) for d, qs in dev.items()}


def evaluate_candidates(
    cands: Sequence[Candidate],
    lib: Library,
    dev: dict[str, QuerySet],
    test: dict[str, QuerySet],
) -> None:
    """Fill each candidate's dev and test scores (and its cost, on dev). A candidate fitted on
    dev instances too is cross-fitted on them (:func:`cross_fitted`)."""
    for c in cands:
        policy = c.make(lib)
        if c.fits_dev:
            fitted = cross_fitted(c, lib, dev)
        else:
            fitted = {
                d: run_policy(policy, c.alpha, qs, c.how, c.base_alpha) for d, qs in dev.items()
            }
        for d, (s, _) in fitted.items():
            c.dev_scores[d], c.dev[d] = s, float(s.mean())
        c.cost = float(np.mean([cost for _, cost in fitted.values()]))
        for d, qs in test.items():
            c.test[d] = float(run_policy(policy, c.alpha, qs, c.how, c.base_alpha)[0].mean())
        test_mean = float(np.mean(list(c.test.values()))) if c.test else float("nan")
        logger.info("%s: dev %.4f test %.4f", c.name, c.dev_mean(), test_mean)


def _fusion_label(c: Candidate) -> str:
    return f"{c.alpha}" if c.how == "minmax" else f"{c.alpha} ({c.how}-normalised)"


def run_pool(
    exp: Experiment, train_inst: list, rule: Rule
) -> tuple[dict[str, Any], dict[str, tuple[Policy, float, Normalisation, float | None]]]:
    """Every candidate's dev and test rows, the chosen default, and its zero-shot and growth rows;
    also each family's chosen policy (over every expert), dense weight, normalisation and base
    queries' dense weight, to save; the default's family is ``report["default"]["family"]``."""
    cfg = exp.cfg
    experts = exp.experts
    members = [BASE, *experts]
    seen = [d.name for d in cfg.expert_domains]
    unseen = [d.name for d in cfg.domains if d.train == "none"]
    labelled = [d.name for d in cfg.expert_domains if d.train != "corpus"]
    train = query_sets(exp, "train", seen, members)
    exp.instances("choice")  # held-out queries the experts never saw, where a domain has them
    dev = query_sets(exp, "choice", seen, members)
    test = query_sets(exp, "test", [*seen, *unseen], [*members])

    def library(pool: Sequence[str], domains: Sequence[str]) -> Library:
        insts = [i for i in train_inst if i.domain in domains]
        return Library([train[d] for d in domains], insts, list(pool), [dev[d] for d in domains])

    lib = library(experts, seen)
    cands = candidate_grid(rule, cfg.normalisations)
    evaluate_candidates(cands, lib, dev, {d: test[d] for d in seen})
    # Gated per corpus: declined queries get base + BM25 exactly as dev chose it.
    base_choice = choose([c for c in cands if c.family == "base"], labelled)[0]
    scoped = corpus_gated_grid(rule, base_choice.alpha, cfg.normalisations)
    evaluate_candidates(scoped, lib, dev, {d: test[d] for d in seen})
    cands += scoped
    best, per_family = choose(cands, labelled)
    default, margin = lead_or_base(best, per_family["base"], labelled or seen, cfg.min_lead_se)
    declines_all = set(experts) <= set(getattr(default.make(lib), "decline", ()))
    rows = {
        "BM25 alone": (
            {d: float(dev[d].ndcg(dev[d].lexical).mean()) for d in seen},
            {d: float(test[d].ndcg(test[d].lexical).mean()) for d in seen},
        ),
    }
    for name, lexical in (("RRF over all members", False), ("RRF over all members + BM25", True)):
        rows[name] = (
            {d: float(rrf_run(dev[d], members, lexical).mean()) for d in seen},
            {d: float(rrf_run(test[d], members, lexical).mean()) for d in seen},
        )
    # What choosing alpha on every domain's dev instances (pseudo-queries too) would pick.
    alpha_all = {
        fam: _fusion_label(max((c for c in cands if c.family == fam), key=lambda c: c.dev_mean()))
        for fam in per_family
    }

    def zero_shot(c: Candidate) -> dict[str, float]:
        out = {}
        for d in [*seen, *unseen]:
            pool = [e for e in experts if e != d]
            zpolicy = c.make(library(pool, [x for x in seen if x != d]))
            out[d] = float(run_policy(zpolicy, c.alpha, test[d], c.how, c.base_alpha)[0].mean())
        return out

    zero = zero_shot(default)
    gates = []
    for c in per_family.values():
        if c.fits_dev:
            fitted = c.make(lib)
            scope = getattr(fitted, "scope", None)
            gates.append(
                {
                    "name": c.name,
                    "declined": list(getattr(fitted, "decline", ())),
                    "kept_on": None
                    if scope is None
                    else {e: list(v) for e, v in scope.experts.items()},
                    "zero_shot": zero if c is default else zero_shot(c),
                }
            )
    growth = []
    for m in range(1, len(experts) + 1):
        gpolicy = default.make(library(experts[:m], seen[:m]))
        per = {
            d: float(
                run_policy(gpolicy, default.alpha, test[d], default.how, default.base_alpha)[
                    0
                ].mean()
            )
            for d in seen
        }
        growth.append({"experts": experts[:m], "average": float(np.mean(list(per.values())))})
    unseen_default = {d: zero[d] for d in unseen}
    base_fused = per_family["base"]
    base_policy = base_fused.make(lib)
    base_all = {
        d: float(run_policy(base_policy, base_fused.alpha, test[d], base_fused.how)[0].mean())
        for d in [*seen, *unseen]
    }
    report = {
        "candidates": [
            {
                "name": c.name,
                "family": c.family,
                "alpha": c.alpha,
                "base_alpha": c.base_alpha,
                "normalise": c.how,
                "cost": c.cost,
                "dev": c.dev,
                "test": c.test,
            }
            for c in cands
        ],
        "baselines": {n: {"dev": dv, "test": ts} for n, (dv, ts) in rows.items()},
        "family_choice": {f: c.name for f, c in per_family.items()},
        "alpha_if_chosen_on_all_dev": alpha_all,
        "labelled_dev_domains": labelled,
        "dev_sets": dict(exp.choice_source),
        "max_passes": MAX_PASSES,
        "folds": FOLDS,
        "default": {
            "name": default.name,
            "family": default.family,
            "alpha": default.alpha,
            "base_alpha": default.base_alpha,
            "normalise": default.how,
            "per_domain": default.test,
            "average": float(np.mean(list(default.test.values()))),
            "zero_shot": zero,
            "zero_shot_average": float(np.mean(list(zero.values()))),
            "unseen": unseen_default,
            "dev_margin": asdict(margin) | {"within_noise": margin.within_noise},
            "best_on_dev": best.name,  # the default unless min_lead_se kept base + BM25
            "min_lead_se": cfg.min_lead_se,
            "declines_every_expert": declines_all,  # as fitted on all dev: base + BM25 then
        },
        "growth": growth,
        "gates": gates,
        "base_fused": {"name": base_fused.name, "per_domain": base_all},
    }
    return report, {f: (c.make(lib), c.alpha, c.how, c.base_alpha) for f, c in per_family.items()}
