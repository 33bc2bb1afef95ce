"""The ``routerretriever`` command: thin shells over the library API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from routerretriever.errors import RouterRetrieverError

logger = logging.getLogger("routerretriever")


def _write_json(path: Path, payload: object) -> None:
    from routerretriever.store import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(r: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in cells)])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from routerretriever.data import load_beir
    from routerretriever.encoder import Encoder
    from routerretriever.evaluation import parse_metric
    from routerretriever.retriever import DenseRetriever, evaluate_retriever

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in metrics:
        parse_metric(m)  # fail before loading anything
    if args.json and args.json.is_dir():
        raise RouterRetrieverError(f"--json {args.json}: is a folder; give a file path")
    datasets = [load_beir(folder, args.split) for folder in args.datasets]  # fail before the model
    encoder = Encoder.load(args.model, max_length=args.max_length)
    retriever = DenseRetriever(
        encoder, batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache
    )
    rows, report = [], {}
    for folder, dataset in zip(args.datasets, datasets, strict=True):
        start = time.perf_counter()
        result = evaluate_retriever(retriever, dataset, metrics)
        seconds = time.perf_counter() - start
        rows.append(
            [
                dataset.name,
                len(dataset.corpus),
                result.num_queries,
                *(result.scores[m] for m in metrics),
            ]
        )
        report[dataset.name] = {
            "path": str(folder),
            "split": args.split,
            "model": str(encoder.model_path),
            "encoder": encoder.fingerprint,
            "docs": len(dataset.corpus),
            "queries": result.num_queries,
            "scores": result.scores,
            "seconds": round(seconds, 2),
            "corpus_from_cache": retriever.corpus_from_cache,
            "per_query": result.per_query,
        }
    if len(rows) > 1:
        rows.append(
            [
                "average",
                "",
                "",
                *(sum(r[3 + i] for r in rows) / len(rows) for i in range(len(metrics))),
            ]
        )
    print(format_table(["dataset", "docs", "queries", *metrics], rows))
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routerretriever", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate retrieval on BEIR-format folders")
    ev.add_argument("datasets", nargs="+", type=Path, metavar="DATASET_DIR")
    ev.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    ev.add_argument(
        "--model",
        default=None,
        help="base model folder or hub id (default: packaged all-MiniLM-L6-v2)",
    )
    ev.add_argument(
        "--metrics",
        default="ndcg@10,recall@100,mrr@10",
        help="comma-separated metrics (default: ndcg@10,recall@100,mrr@10)",
    )
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument(
        "--max-length", type=int, default=None, help="max tokens per text (default: the model's)"
    )
    ev.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="corpus embedding cache (default: $ROUTERRETRIEVER_CACHE or ~/.cache/routerretriever)",
    )
    ev.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ev.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write scores (with per-query values) to this JSON file",
    )
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar is noise at every start
        return args.func(args)
    except (RouterRetrieverError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
