"""Routed query embedding (route + expert pass) against plain base-model embedding.

Same queries, same batch size, same run, alternating, median of several rounds. Prints queries/s
of both and the ratio routed / plain (the paper pays two forward passes per query: 0.5), for each
pilot library and routing precision, with the share of queries routed as float32 routing does,
and for each saved routed system (``--router``, e.g. the experiment's ``results/routers/*``):
its mixture members are embedded too, and a system that fuses BM25 also pays its BM25 search
(top 100 over the SciFact corpus, or ``--bm25-corpus``) inside the timed part.

    python benchmarks/route_speed.py --store runs/paper/experts --pilots runs/paper/results/pilots \
        --router runs/paper/results/routers/* --data ../shared/data --queries 1000
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["beir/scifact", "beir/nfcorpus", "classic/cranfield", "classic/cisi", "classic/med"]


def main() -> None:
    from routerretriever import Encoder, load_corpus, load_queries
    from routerretriever.corpora import CorpusSketch
    from routerretriever.experts import load_expert
    from routerretriever.lexical import BM25Index
    from routerretriever.pilots import PilotLibrary
    from routerretriever.retriever import RouterRetriever

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument(
        "--pilots",
        type=Path,
        action="append",
        default=[],
        help="pilot library folder (repeat to compare several, e.g. with base)",
    )
    parser.add_argument(
        "--router",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        help="saved routed system folder(s) (RouterRetriever.save), timed with their own settings",
    )
    parser.add_argument("--bm25-corpus", type=Path, default=None, help="default: DATA/beir/scifact")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rule", default="weighted")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--precision",
        action="append",
        choices=["float32", "bfloat16", "auto"],
        help="routing pass precision (repeat; default: float32 and bfloat16)",
    )
    args = parser.parse_args()

    pools = [list(load_queries(args.data / src).values()) for src in SOURCES]
    texts: list[str] = []
    for i in range(max(map(len, pools))):  # round-robin over the sources until enough
        texts += [pool[i] for pool in pools if i < len(pool)]
    texts = texts[: args.queries]
    enc = Encoder.load()
    libs = {p: PilotLibrary.load(p) for p in args.pilots}
    for name in sorted({e for lib in libs.values() for e in lib.experts if e != "__base__"}):
        load_expert(enc, args.store / name)
    routers = {
        f"{p.name}, {prec}": RouterRetriever(
            enc,
            lib,
            rule=args.rule,
            batch_size=args.batch_size,
            show_progress=False,
            routing_precision=prec,
        )
        for p, lib in libs.items()
        for prec in args.precision or ["float32", "bfloat16"]
    }
    saved = {}
    for folder in args.router:
        rr = RouterRetriever.load(folder, batch_size=args.batch_size, show_progress=False)
        saved[f"{folder.name} (saved)"] = rr
    lexical = {}  # each saved system's own BM25 settings (feedback, say)
    if any(rr.alpha < 1 for rr in saved.values()):
        bm25_corpus = load_corpus(args.bm25_corpus or args.data / "beir/scifact")
        for rr in saved.values():
            if rr.alpha < 1 and rr.bm25 not in lexical:
                lexical[rr.bm25] = BM25Index.build(bm25_corpus, rr.bm25)
            on_corpus = getattr(rr.policy, "on_corpus", None)
            if on_corpus is not None:  # a router scoped to corpora routes as on the searched one
                rr.active_policy = on_corpus(CorpusSketch.of(bm25_corpus))
    enc.encode(texts[:64], batch_size=args.batch_size, show_progress=False)  # warm-up

    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        start = time.perf_counter()
        enc.encode(texts, batch_size=args.batch_size, show_progress=False)
        times["plain"].append(time.perf_counter() - start)
        for name, rr in routers.items():
            start = time.perf_counter()
            rr.encode_queries(texts)
            times[name].append(time.perf_counter() - start)
        for name, rr in saved.items():
            start = time.perf_counter()
            rr.encode_queries(texts)
            if rr.alpha < 1:
                if rr.normalise == "zscore":  # also each query's score moments over the corpus
                    lexical[rr.bm25].search_with_stats(texts, 100)
                else:
                    lexical[rr.bm25].search(texts, 100)
            times[name].append(time.perf_counter() - start)
    plain = len(texts) / statistics.median(times["plain"])
    print(
        f"{len(texts)} queries from {', '.join(SOURCES)}; batch size {args.batch_size}; "
        f"rule {args.rule}; median of {args.rounds} rounds"
    )
    print("| system | queries/s | ratio to plain | same route as float32 | routed to |")
    print("|---|---|---|---|---|")
    print(f"| plain base model | {plain:.1f} | 1.00 | | |")
    exact = {}
    for name, rr in routers.items():
        qps = len(texts) / statistics.median(times[name])
        routes = [d.expert for d in rr.route(texts)]
        exact.setdefault(name.split(",")[0], routes)  # float32 comes first when asked for
        ref = exact[name.split(",")[0]]
        same = sum(a == b for a, b in zip(routes, ref, strict=True)) / len(texts)
        shares = collections.Counter(routes)
        mix = ", ".join(f"{e} {100 * c / len(texts):.0f}%" for e, c in shares.most_common())
        print(
            f"| routed, pilots {name} | {qps:.1f} | {qps / plain:.2f} | {100 * same:.1f}% | {mix} |"
        )
    for name, rr in saved.items():
        qps = len(texts) / statistics.median(times[name])
        decisions = rr.route(texts)
        members = sum(len(d.members) for d in decisions) / len(texts)
        shares = collections.Counter(d.expert for d in decisions)
        mix = ", ".join(f"{e} {100 * c / len(texts):.0f}%" for e, c in shares.most_common(4))
        print(
            f"| {name}, dense weight {rr.alpha} | {qps:.1f} | {qps / plain:.2f} | "
            f"{members:.2f} members per query | {mix} |"
        )


if __name__ == "__main__":
    main()
