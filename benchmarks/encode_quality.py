"""Retrieval quality of each corpus runtime: nDCG@10 of the base model with the corpus embedded
by torch float32 (the reference) and by ONNX Runtime, queries by torch, on BEIR folders.

Each side goes through ``DenseRetriever(backend=...)`` and the on-disk cache, as a user's run
does (each runtime has its own cache files); the table gives both scores, their difference and
the lowest cosine between the two runtimes' vectors of one document.

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/encode_quality.py [--data FOLDER ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from routerretriever import DenseRetriever, Encoder, embed_corpus, evaluate_retriever, load_beir

ROOT = Path(__file__).resolve().parents[1]
DATA = ["beir/scifact", "beir/nfcorpus", "beir/arguana"]
DATA += ["classic/cranfield", "classic/cisi", "classic/med"]
BACKENDS = ("torch", "onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", help="BEIR folder (repeat)")
    args = parser.parse_args()
    folders = args.data or [ROOT.parent / "shared/data" / d for d in DATA]
    enc = Encoder.load()
    print("| collection | torch float32 | ONNX Runtime | difference | lowest cosine |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for folder in folders:
        ds = load_beir(folder)
        score, emb = {}, {}
        for backend in BACKENDS:
            retriever = DenseRetriever(enc, backend=backend)
            score[backend] = evaluate_retriever(retriever, ds, ["ndcg@10"]).scores["ndcg@10"]
            emb[backend] = embed_corpus(enc, ds.corpus, backend=backend).embeddings
        diff = score["onnx"] - score["torch"]
        worst = max(worst, abs(diff))
        cos = float((emb["torch"] * emb["onnx"]).sum(axis=1).min())
        print(
            f"| {folder.name} | {score['torch']:.4f} | {score['onnx']:.4f} | {diff:+.4f} "
            f"| {cos:.6f} |",
            flush=True,
        )
    print(f"largest |difference| {worst:.4f}")


if __name__ == "__main__":
    main()
