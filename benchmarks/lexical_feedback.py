"""Lexical pseudo-relevance feedback: does expanding the BM25 query help the fusion? Dev only.

``BM25Config(feedback_docs=k, feedback_terms=m, feedback_weight=w)`` (RM3's expansion,
:mod:`routerretriever.lexical`): the query's ``k`` best BM25 documents lend it their ``m`` most
frequent words with ``w`` of the weight. Each setting's BM25 list is fused with the base model's
(min-max, ``alpha`` 0.5, top 100 each), as today's base + BM25, and compared with no feedback
(paired t-test over queries, one-sided). Base model only, on labelled dev queries the base
model never saw: SciFact's training split and NFCorpus's dev split. Nothing is written; test
sets are not scored.

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/lexical_feedback.py   # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import stats

from routerretriever.data import load_corpus, load_qrels, load_queries
from routerretriever.encoder import Encoder
from routerretriever.evaluation import evaluate
from routerretriever.fusion import Hits, fuse_scores
from routerretriever.lexical import BM25Config, BM25Index
from routerretriever.model_folder import default_model_path
from routerretriever.store import embed_corpus

SETS = (("beir/scifact", "train"), ("beir/nfcorpus", "dev"))
DEPTH = 100
GRID = [(k, m, w) for k in (3, 5, 10) for m in (5, 10, 20) for w in (0.05, 0.1, 0.2, 0.3)]


def run_set(enc: Encoder, folder: Path, split: str) -> None:
    """Print one row per feedback setting on one labelled dev set."""
    corpus = load_corpus(folder)
    docs = embed_corpus(enc, corpus, backend="torch")
    qrels = load_qrels(folder, split)
    queries = load_queries(folder)
    qids = [q for q in qrels if q in queries]
    texts = [queries[q] for q in qids]
    dense = []
    for row in enc.encode(texts, show_progress=False) @ docs.embeddings.T:
        t = np.argpartition(-row, DEPTH)[:DEPTH]
        t = t[np.argsort(-row[t], kind="stable")]
        dense.append([(docs.ids[j], float(row[j])) for j in t])

    def score(lexical: list[Hits]) -> tuple[float, np.ndarray]:
        """BM25's nDCG@10 (BEIR's mean, over queries with hits) and the fused run's per query."""
        fused = [fuse_scores(d, b, 0.5, DEPTH) for d, b in zip(dense, lexical, strict=True)]
        lex, fus = (
            evaluate(qrels, {q: dict(h) for q, h in zip(qids, run, strict=True)}, ["ndcg@10"])
            for run in (lexical, fused)
        )
        per = [fus.per_query[q]["ndcg@10"] for q in qids]  # every query has dense hits
        return 100 * lex.scores["ndcg@10"], 100 * np.array(per)

    bm25 = BM25Index.cached(corpus, BM25Config())
    plain, today = score(bm25.search(texts, DEPTH, exclude_ids=qids))
    label = f"{folder.name} ({split}, {len(qids)} queries)"
    print(f"| {label} | none (today) | | | {plain:.2f} | {today.mean():.2f} | |")
    for k, m, w in GRID:
        cfg = BM25Config(feedback_docs=k, feedback_terms=m, feedback_weight=w)
        lexical, fused = score(BM25Index.cached(corpus, cfg).search(texts, DEPTH, qids))
        p = stats.ttest_rel(fused, today, alternative="greater").pvalue
        print(
            f"| {label} | {k} | {m} | {w} | {lexical:.2f} | {fused.mean():.2f} | {p:.3f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = p.parse_args()
    enc = Encoder.load(default_model_path())
    print(
        "| collection (dev split) | feedback_docs | feedback_terms | feedback_weight | BM25 "
        "| base + BM25 (α 0.5) | p (fused gain > 0) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, split in SETS:
        run_set(enc, args.data / name, split)


if __name__ == "__main__":
    main()
