"""Retrieval quality of each corpus runtime: nDCG@10 of the base model with the corpus embedded
by torch float32 (the reference) and by each fast runtime, queries by torch, on BEIR folders.

Each side goes through ``DenseRetriever(backend=...)`` and the on-disk cache, as a user's run
does (each runtime has its own cache files); the table gives the scores, each fast runtime's
difference to float32 and the lowest cosine between its vectors and float32's of one document.
Where the CPU lacks native bfloat16 the bfloat16 side is emulated: the same arithmetic, slowly
(about 4 documents/s here).

    ROUTERRETRIEVER_CACHE=/work/cache python benchmarks/encode_quality.py [--data FOLDER ...]
        [--runtimes onnx,bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from routerretriever import DenseRetriever, Encoder, embed_corpus, evaluate_retriever, load_beir

ROOT = Path(__file__).resolve().parents[1]
DATA = ["classic/med", "classic/cranfield", "classic/cisi"]  # smallest first
DATA += ["beir/nfcorpus", "beir/scifact", "beir/arguana"]
NAMES = {"onnx": "ONNX Runtime", "bfloat16": "bfloat16 autocast"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", help="BEIR folder (repeat)")
    parser.add_argument(
        "--runtimes", default="onnx,bfloat16", help="comma-separated: onnx, bfloat16"
    )
    args = parser.parse_args()
    folders = args.data or [ROOT.parent / "shared/data" / d for d in DATA]
    fast = [r for r in args.runtimes.split(",") if r]
    if unknown := set(fast) - set(NAMES):
        parser.error(f"unknown runtime(s) {sorted(unknown)}; choose from {', '.join(NAMES)}")
    enc = Encoder.load()
    head = ["collection", "torch float32"]
    for r in fast:
        head += [NAMES[r], "difference", "lowest cosine"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    worst = dict.fromkeys(fast, 0.0)
    for folder in folders:
        ds = load_beir(folder)
        score, emb = {}, {}
        for backend in ["torch", *fast]:
            retriever = DenseRetriever(enc, backend=backend)  # type: ignore[arg-type]
            score[backend] = evaluate_retriever(retriever, ds, ["ndcg@10"]).scores["ndcg@10"]
            emb[backend] = embed_corpus(enc, ds.corpus, backend=backend).embeddings  # type: ignore[arg-type]
        cells = [folder.name, f"{score['torch']:.4f}"]
        for r in fast:
            diff = score[r] - score["torch"]
            worst[r] = max(worst[r], abs(diff))
            cos = float((emb["torch"] * emb[r]).sum(axis=1).min())
            cells += [f"{score[r]:.4f}", f"{diff:+.4f}", f"{cos:.6f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    for r in fast:
        print(f"largest |difference| {NAMES[r]}: {worst[r]:.4f}")


if __name__ == "__main__":
    main()
