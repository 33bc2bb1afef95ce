"""Long documents: does embedding the words past the model's 256 tokens help? Dev only.

The corpus side embeds each document's first 256 tokens (title first), as sentence-transformers
does; 71% of SciFact's and 79% of NFCorpus's documents are longer. This embeds every document
in consecutive 256-token windows with the base model (the first window is today's embedding),
then scores the base model, alone and fused with BM25 (min-max, ``alpha`` 0.5, top 100 each),
with each document's score taken from: the first window (today), the mean of all windows, the
first plus a share of the rest's mean, or the best window (MaxP). It still gives one vector per
document except MaxP, so every other part would stay as it is. Labelled dev queries only: SciFact's
training split (the base model never saw it) and NFCorpus's dev split. Nothing is written.

    python benchmarks/long_documents.py                    # ~12 min on 2 cores
    python benchmarks/long_documents.py --data ../shared/data --stride 192
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from routerretriever.data import load_corpus, load_qrels, load_queries
from routerretriever.encoder import Encoder
from routerretriever.evaluation import evaluate
from routerretriever.fusion import fuse_scores
from routerretriever.lexical import BM25Index
from routerretriever.model_folder import default_model_path

SETS = (("beir/scifact", "train"), ("beir/nfcorpus", "dev"))
DEPTH = 100


def windows(ids: list[int], width: int, stride: int) -> list[list[int]]:
    """``ids`` (with their first and last special tokens) cut into windows of ``width`` inner
    tokens, each wrapped in the same special tokens; the first is the truncated document."""
    head, inner, tail = ids[:1], ids[1:-1], ids[-1:]
    out, start = [], 0
    while True:
        out.append(head + inner[start : start + width] + tail)
        start += stride
        if start >= len(inner) or start + width - stride >= len(inner):
            return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top(scores: np.ndarray, doc_ids: Sequence[str]) -> list[list[tuple[str, float]]]:
    out = []
    for row in scores:
        t = np.argpartition(-row, DEPTH)[:DEPTH]
        t = t[np.argsort(-row[t], kind="stable")]
        out.append([(doc_ids[j], float(row[j])) for j in t])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--stride", type=int, default=254, help="tokens between window starts")
    args = p.parse_args()
    enc = Encoder.load(default_model_path())
    width = enc.settings.max_length - 2
    print(
        "| collection (dev split) | documents | windows | aggregation | base | base + BM25 (α 0.5) |"
    )
    print("|---|---|---|---|---|---|")
    for name, split in SETS:
        folder = args.data / name
        corpus = load_corpus(folder)
        doc_ids = list(corpus)
        full = enc.tokenize([corpus[d].full_text for d in doc_ids], max_length=1_000_000)
        cut = [windows(t, width, args.stride) for t in full]
        owner = np.repeat(np.arange(len(cut)), [len(c) for c in cut])  # (W,)
        emb = enc.encode_tokens([w for c in cut for w in c])  # (W, d)
        first = emb[np.searchsorted(owner, np.arange(len(cut)))]  # (N, d)
        total = np.zeros_like(first, dtype=np.float64)
        np.add.at(total, owner, emb)
        many = (np.bincount(owner) > 1)[:, None]
        rest = unit(np.where(many, total - first, first))
        docs = {
            "first window (today)": first,
            "mean of windows": unit(total),
            "first + 0.25 × rest": unit(first + 0.25 * rest),
            "first + 0.5 × rest": unit(first + 0.5 * rest),
        }
        qrels = load_qrels(folder, split)
        queries = load_queries(folder)
        qids = [q for q in qrels if q in queries]
        texts = [queries[q] for q in qids]
        q = enc.encode(texts, show_progress=False)  # (n, d)
        lexical = BM25Index.build(corpus).search(texts, DEPTH, exclude_ids=qids)
        runs = {k: top(q @ d.T, doc_ids) for k, d in docs.items()}
        best = np.full((len(qids), len(cut)), -np.inf)
        for i, row in enumerate(q @ emb.T):
            np.maximum.at(best[i], owner, row)
        runs["best window (MaxP)"] = top(best, doc_ids)
        for k, lists in runs.items():
            dense = {qid: dict(h) for qid, h in zip(qids, lists, strict=True)}
            fused = {
                qid: dict(fuse_scores(h, b, 0.5, DEPTH))
                for qid, h, b in zip(qids, lists, lexical, strict=True)
            }
            d10 = evaluate(qrels, dense, ["ndcg@10"]).scores["ndcg@10"]
            f10 = evaluate(qrels, fused, ["ndcg@10"]).scores["ndcg@10"]
            print(
                f"| {name.split('/')[-1]} ({split}) | {len(cut)} | {len(owner)} | {k} "
                f"| {100 * d10:.2f} | {100 * f10:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
