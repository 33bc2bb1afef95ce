"""Cut the small demo collections in examples/demo/ from the full ones in ../shared/data.

Run from the repository root: python scripts/make_demo.py [SHARED_DATA_DIR]
Deterministic (fixed seed). Each demo keeps a few judged queries per split, their judged
documents, and random distractors, so the corpus stays small enough to encode in seconds.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from routerretriever.data import load_corpus, load_qrels, load_queries

SOURCES = {  # demo name -> (source folder, {split: number of queries})
    "scifact": ("beir/scifact", {"test": 40, "train": 60}),
    "nfcorpus": ("beir/nfcorpus", {"test": 40, "train": 60}),
    "cranfield": ("classic/cranfield", {"test": 40}),
    "med": ("classic/med", {"test": 30}),
}
MAX_JUDGED_PER_QUERY = 4
DOCS = 250


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    rng = random.Random(13)
    for name, (src, splits) in SOURCES.items():
        folder = shared / src
        corpus, queries = load_corpus(folder), load_queries(folder)
        out = Path("examples/demo") / name
        (out / "qrels").mkdir(parents=True, exist_ok=True)
        keep_docs: list[str] = []
        kept_queries: dict[str, str] = {}
        split_qrels: dict[str, dict[str, dict[str, int]]] = {}
        for split, n in splits.items():
            qrels = load_qrels(folder, split)
            qids = sorted(
                q for q in qrels if q in queries and any(s > 0 for s in qrels[q].values())
            )
            rng.shuffle(qids)
            split_qrels[split] = {}
            for qid in qids[:n]:
                rel = sorted(d for d, s in qrels[qid].items() if s > 0 and d in corpus)
                rel = rel[:MAX_JUDGED_PER_QUERY]
                if not rel:
                    continue
                split_qrels[split][qid] = {d: qrels[qid][d] for d in rel}
                kept_queries[qid] = queries[qid]
                keep_docs.extend(d for d in rel if d not in keep_docs)
        others = [d for d in corpus if d not in set(keep_docs)]
        rng.shuffle(others)
        keep_docs.extend(others[: max(0, DOCS - len(keep_docs))])
        keep = set(keep_docs)
        with open(out / "corpus.jsonl", "w") as f:
            for doc_id, doc in corpus.items():
                if doc_id in keep:
                    f.write(
                        json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n"
                    )
        with open(out / "queries.jsonl", "w") as f:
            for qid, text in kept_queries.items():
                f.write(json.dumps({"_id": qid, "text": text}) + "\n")
        for split, qrels in split_qrels.items():
            with open(out / "qrels" / f"{split}.tsv", "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for qid, rels in qrels.items():
                    for doc_id, score in rels.items():
                        f.write(f"{qid}\t{doc_id}\t{score}\n")
        print(f"{name}: {len(keep)} docs, {len(kept_queries)} queries, splits {list(splits)}")


if __name__ == "__main__":
    main()
