"""Corpus encoding speed: routerretriever's Encoder against sentence-transformers' ``encode``.

Same model (all-MiniLM-L6-v2), same documents, same batch size and max length, in the same run.
Each side runs in its own fresh subprocess (so peak RSS is its own), alternating, several rounds;
the table gives the median docs/s of each, the ratio ours / theirs, and each side's peak RSS.

    python benchmarks/encode_speed.py [--data ../shared/data/beir/scifact] [--docs 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(side: str, data: Path, docs: int, batch_size: int, max_length: int) -> None:
    from routerretriever import load_corpus
    from routerretriever.encoder import Encoder, default_model_path

    texts = [d.full_text for d in list(load_corpus(data).values())[:docs]]
    if side == "ours":
        enc = Encoder.load(max_length=max_length)
        run = lambda t: enc.encode(t, batch_size=batch_size, show_progress=False)  # noqa: E731
    else:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(default_model_path(), device="cpu")
        st.max_seq_length = max_length
        run = lambda t: st.encode(t, batch_size=batch_size, show_progress_bar=False)  # noqa: E731
    run(texts[:batch_size])  # warm-up: page in weights and kernels on both sides alike
    start = time.perf_counter()
    emb = run(texts)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"docs_per_s": len(texts) / seconds, "peak_rss_mb": peak_mb, "shape": list(emb.shape)}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/beir/scifact")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["ours", "st"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.docs, args.batch_size, args.max_length)
        return

    results: dict[str, list[dict]] = {"ours": [], "st": []}
    for r in range(args.rounds):
        for side in ("ours", "st") if r % 2 == 0 else ("st", "ours"):
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        side,
                        "--data",
                        str(args.data),
                        "--docs",
                        str(args.docs),
                        "--batch-size",
                        str(args.batch_size),
                        "--max-length",
                        str(args.max_length),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            results[side].append(json.loads(out))
    speed = {s: statistics.median(x["docs_per_s"] for x in v) for s, v in results.items()}
    peak = {s: max(x["peak_rss_mb"] for x in v) for s, v in results.items()}
    print(
        f"data: {args.data} (first {args.docs} docs), batch size {args.batch_size}, "
        f"max length {args.max_length}, {args.rounds} rounds, median"
    )
    print("| encoder | docs/s | peak RSS (MB) |")
    print("|---|---|---|")
    print(f"| routerretriever Encoder.encode | {speed['ours']:.1f} | {peak['ours']:.0f} |")
    print(f"| sentence-transformers encode | {speed['st']:.1f} | {peak['st']:.0f} |")
    print(f"\nratio ours / sentence-transformers: {speed['ours'] / speed['st']:.2f}")
    print(
        "per round docs/s: "
        + json.dumps({s: [round(x["docs_per_s"], 1) for x in v] for s, v in results.items()})
    )


if __name__ == "__main__":
    main()
