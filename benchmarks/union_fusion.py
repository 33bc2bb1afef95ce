"""Fusion with exact scores over the union of both lists, against today's fill-in, on dev only.

Today a document in one list's top 100 but not the other's gets that other list's lowest
normalised score (:func:`routerretriever.fusion.fuse_scores`). Its exact score is known: the
dense side from its vector in the flat index, BM25's from the scores bm25s computes for every
document anyway. This scores the fast families (base, router, gated, base mix 0.3) at every
lexical weight and normalisation both ways on the experiment's choice instances (labelled dev
where a domain has one), as the experiment scores its candidates (gates cross-fitted). It
patches :meth:`routerretriever.hybrid_eval.QuerySet.score` for the exact variant; nothing is
written. Test sets are not scored.

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/union_fusion.py CONFIG.toml > rows.jsonl
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict

import numpy as np

from routerretriever import hybrid_eval as he
from routerretriever.encoder import BASE
from routerretriever.experiment import Experiment, ExperimentConfig
from routerretriever.fusion import mix_queries

FAMILIES = {"base", "pilot", "pilot-gated", "pilot-gated-mix-0.3", "pilot-mix-0.3"}
EXACT = {"on": False}
_score, _subset = he.QuerySet.score, he.QuerySet.subset


def affine(scores: list[float], how: str, stats: np.ndarray | None) -> tuple[float, float | None]:
    """``(offset, scale)`` of :func:`routerretriever.fusion.normalise` for one list."""
    s = np.array(scores, dtype=np.float64)
    if how == "zscore":
        if stats is not None and np.isfinite(stats).all() and stats[1] > 0:
            return float(stats[0]), float(stats[1])
        return float(s.mean()), (float(s.std()) if s.std() > 0 else None)
    hi = s.max()
    lo = 0.0 if how == "max" and hi > 0 and s.min() >= -hi else s.min()
    return float(lo), (float(hi - lo) if hi - lo > 0 else None)


def exact_score(self, members, weights, alpha, how="minmax"):
    if not EXACT["on"]:
        return _score(self, members, weights, alpha, how)
    q = mix_queries(np.stack([self.emb[m] for m in members]), weights)  # (n, d)
    dense = self.index.search(q, he.DEPTH, self.qids)
    dstats = self.index.score_stats(q) if how == "zscore" else None
    ext, runs = self._exact, []
    for i in range(len(self.qids)):
        a, dh, lh = float(alpha[i]), dense[i], self.lexical[i]
        if a == 1.0 or not lh:
            runs.append(dh[:10])
            continue
        ds, ls = dict(dh), dict(lh)
        d_off, d_sc = affine([v for _, v in dh], how, None if dstats is None else dstats[i])
        lstats = None if self.lexical_stats is None else self.lexical_stats[i]
        l_off, l_sc = affine([v for _, v in lh], how, lstats)
        fused = {}
        for d in ds.keys() | ls.keys():
            dv = ds[d] if d in ds else float(q[i] @ ext["doc"][ext["dpos"][d]])
            lv = ls[d] if d in ls else float(ext["bm25"][i, ext["lpos"][d]])
            dn = 0.0 if d_sc is None else (dv - d_off) / d_sc
            ln = 0.0 if l_sc is None else (lv - l_off) / l_sc
            fused[d] = a * dn + (1 - a) * ln
        runs.append(sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:10])
    return self.ndcg(runs)


def subset(self, idx):
    out = _subset(self, idx)
    if hasattr(self, "_exact"):
        out._exact = dict(self._exact, bm25=self._exact["bm25"][idx])
    return out


def attach(exp: Experiment, qs: he.QuerySet, texts: dict[str, str]) -> None:
    """What exact scores need: the corpus vectors and every query's BM25 score of every doc."""
    lex, index = exp.lexical[qs.domain], qs.index
    qs._exact = {  # type: ignore[attr-defined]
        "doc": index._index.reconstruct_n(0, index._index.ntotal),
        "dpos": {d: j for j, d in enumerate(index._ids)},
        "lpos": {d: j for j, d in enumerate(lex.ids)},
        "bm25": np.stack([lex.scores(texts[q]) for q in qs.qids]),
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    he.QuerySet.score, he.QuerySet.subset = exact_score, subset
    cfg = ExperimentConfig.load(sys.argv[1])
    exp = Experiment(cfg)
    members = [BASE, *exp.experts]
    seen = [d.name for d in cfg.expert_domains]
    labelled = [d.name for d in cfg.expert_domains if d.train != "corpus"]
    train_inst = exp.instances("train")
    train = he.query_sets(exp, "train", seen, members)
    exp.instances("choice")
    dev = he.query_sets(exp, "choice", seen, members)
    for d, qs in dev.items():
        attach(exp, qs, exp.instance_queries[("choice", d)][0])
    lib = he.Library([train[d] for d in seen], train_inst, exp.experts, [dev[d] for d in seen])
    grid = he.candidate_grid("weighted", ["minmax", "max", "zscore"])
    best: dict[tuple[bool, str], tuple[float, str]] = {}
    gain = defaultdict(list)
    for c in (c for c in grid if c.family in FAMILIES):
        row = {}
        for exact in (False, True):
            EXACT["on"] = exact
            c2 = he.Candidate(c.name, c.family, c.make, c.alpha, how=c.how, fits_dev=c.fits_dev)
            he.evaluate_candidates([c2], lib, dev, {})
            row[exact] = c2.dev_mean(labelled)
            print(json.dumps({"exact": exact, "name": c.name, "dev": c2.dev}), flush=True)
            if (exact, c.family) not in best or row[exact] > best[(exact, c.family)][0]:
                best[(exact, c.family)] = (row[exact], c.name)
        if c.alpha < 1.0:
            gain[c.how].append(100 * (row[True] - row[False]))
    for how, g in gain.items():
        print(
            f"# {how}: exact - today, labelled dev, mean {np.mean(g):+.2f} "
            f"(min {min(g):+.2f}, max {max(g):+.2f}, {len(g)} candidates)"
        )
    for (exact, fam), (score, name) in sorted(best.items(), key=lambda x: (x[0][1], x[0][0])):
        print(f"# best {fam} {'exact' if exact else 'today'}: {100 * score:.2f} {name}")


if __name__ == "__main__":
    main()
