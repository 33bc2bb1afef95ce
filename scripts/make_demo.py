"""Cut the demo collections in examples/demo/ from the full ones in ../shared/data.

Run from the repository root: python scripts/make_demo.py [SHARED_DATA_DIR]
Deterministic (fixed seed; the base model's corpus embeddings come from the usual cache).

Each cut is *pooled*, as TREC pools its judgements: a test query keeps its judged relevant
documents and the top ``POOL`` documents of both the base model and BM25 over the *whole*
collection, so the cut keeps the full collection's hard distractors and neither retriever is
favoured (random distractors made the task so easy that nothing could beat the base model).
Training queries keep their judged documents only; SciFact keeps most of its labelled training
split, which is what makes its expert a real one (a few dozen training queries left it at step 0).
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np

from routerretriever.data import load_corpus, load_qrels, load_queries
from routerretriever.encoder import Encoder
from routerretriever.lexical import BM25Index
from routerretriever.store import embed_corpus

# demo name -> (source folder, {split: number of queries})
SOURCES = {
    "scifact": ("beir/scifact", {"test": 50, "train": 450}),
    "nfcorpus": ("beir/nfcorpus", {"test": 30, "train": 60}),
    "med": ("classic/med", {"test": 30}),
}
POOL = 6  # top documents of each retriever kept per test query
JUDGED = {"test": 5, "train": 2}  # judged relevant documents kept per query (highest grade first)


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    rng = random.Random(13)
    encoder = Encoder.load()
    for name, (src, splits) in SOURCES.items():
        folder = shared / src
        corpus, queries = load_corpus(folder), load_queries(folder)
        dense = embed_corpus(encoder, corpus)
        lexical = BM25Index.cached(corpus)
        keep: set[str] = set()
        kept_queries: dict[str, str] = {}
        split_qrels: dict[str, dict[str, dict[str, int]]] = {}
        for split, n in splits.items():
            qrels = load_qrels(folder, split)
            qids = sorted(
                q for q in qrels if q in queries and any(s > 0 for s in qrels[q].values())
            )
            rng.shuffle(qids)
            qids = qids[:n]
            split_qrels[split] = {q: qrels[q] for q in qids}
            texts = [queries[q] for q in qids]
            if split == "test":
                sims = encoder.encode(texts) @ dense.embeddings.T
                top = np.argsort(-sims, axis=1, kind="stable")[:, :POOL]
                bm25 = lexical.search(texts, POOL)
            for i, q in enumerate(qids):
                kept_queries[q] = queries[q]
                rel = sorted(
                    (d for d, s in qrels[q].items() if s > 0 and d in corpus),
                    key=lambda d: -qrels[q][d],
                )
                keep.update(rel[: JUDGED[split]])
                if split == "test":
                    keep.update(dense.ids[j] for j in top[i])
                    keep.update(d for d, _ in bm25[i])
        out = Path("examples/demo") / name
        (out / "qrels").mkdir(parents=True, exist_ok=True)
        with gzip.GzipFile(out / "corpus.jsonl.gz", "wb", mtime=0) as f:
            for doc_id, doc in corpus.items():
                if doc_id in keep:
                    row = {"_id": doc_id, "title": doc.title, "text": doc.text}
                    f.write((json.dumps(row) + "\n").encode())
        with open(out / "queries.jsonl", "w") as f:
            for qid, text in kept_queries.items():
                f.write(json.dumps({"_id": qid, "text": text}) + "\n")
        for split, qrels in split_qrels.items():
            with open(out / "qrels" / f"{split}.tsv", "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for qid, rels in qrels.items():
                    for doc_id, score in rels.items():
                        if doc_id in keep:
                            f.write(f"{qid}\t{doc_id}\t{score}\n")
        print(f"{name}: {len(keep)} docs, {len(kept_queries)} queries, splits {list(splits)}")


if __name__ == "__main__":
    main()
