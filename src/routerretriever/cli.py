"""The ``routerretriever`` command: thin shells over the library API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from routerretriever.errors import RouterRetrieverError

logger = logging.getLogger("routerretriever")
API_KEY_ENV = "ROUTERRETRIEVER_API_KEY"


def _write_json(path: Path, payload: object) -> None:
    from routerretriever.files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max([len(str(h)), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

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
    if args.router and (args.expert or args.model or args.max_length):
        raise RouterRetrieverError(
            "--router brings its own base model and experts; drop --expert/--model/--max-length"
        )
    datasets = [load_beir(folder, args.split) for folder in args.datasets]  # fail before the model
    common = dict(batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    expert = None
    retriever: DenseRetriever
    if args.router:
        from routerretriever.retriever import RouterRetriever

        retriever = RouterRetriever.load(args.router, **common)
        encoder = retriever.encoder
    else:
        encoder = Encoder.load(args.model, max_length=args.max_length)
        if args.expert:
            from routerretriever.experts import load_expert

            expert = load_expert(encoder, args.expert).name
        retriever = DenseRetriever(encoder, expert=expert, **common)
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
            "expert": expert,
            "router": None if args.router is None else str(args.router),
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


def cmd_train_expert(args: argparse.Namespace) -> int:
    from routerretriever.config import ExpertConfig
    from routerretriever.encoder import Encoder
    from routerretriever.experts import check_name
    from routerretriever.pseudo import PseudoQueryConfig
    from routerretriever.training import TrainConfig, load_training_set, train_expert

    check_name(args.name)
    train = TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        hard_negatives=args.hard_negatives,
        mine_skip=args.mine_skip,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
    )
    lora = ExpertConfig(
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=tuple(args.target_modules.split(",")),
    )
    if not args.dataset and not args.corpus:
        raise RouterRetrieverError("give at least one --dataset DIR or --corpus DIR")
    encoder = Encoder.load(args.model)
    pseudo = PseudoQueryConfig(
        crops_per_doc=args.crops_per_doc,
        max_docs=args.max_docs,
        min_words=args.min_words,
        max_words=args.max_words,
    )
    common = dict(dev_split=args.dev_split, cache_dir=args.cache_dir, seed=args.seed, pseudo=pseudo)
    sets = [
        load_training_set(
            encoder,
            folder,
            split=None if args.from_corpus else args.split,
            from_corpus=args.from_corpus,
            **common,
        )
        for folder in args.dataset or []
    ] + [
        load_training_set(encoder, folder, from_corpus=True, **common)
        for folder in args.corpus or []
    ]
    info = train_expert(encoder, sets, args.name, args.out, lora, train)
    print(f"expert {info.name} -> {args.out / info.name}")
    print(
        f"dev nDCG@10 {info.dev['ndcg@10']:.4f} (base {info.dev['base_ndcg@10']:.4f}), "
        f"best step {info.training['best_step']} of {info.training['steps_run']}, "
        f"{info.seconds:.0f} s, peak RSS {info.peak_rss_mb:.0f} MB"
    )
    return 0


def cmd_experts_list(args: argparse.Namespace) -> int:
    from routerretriever.experts import list_experts

    rows = [
        [
            e.name,
            f"{e.dev.get('ndcg@10', float('nan')):.4f}",
            f"{e.dev.get('base_ndcg@10', float('nan')):.4f}",
            f"{e.seconds:.0f}",
            e.source,
        ]
        for e in list_experts(args.store)
    ]
    if not rows:
        print(f"no experts in {args.store} (an expert is a folder holding expert.json)")
        return 0
    print(format_table(["expert", "dev nDCG@10", "base dev", "train s", "trained on"], rows))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from routerretriever.experiment import run_experiment

    if not args.config.is_file():
        raise RouterRetrieverError(f"{args.config}: no such config file")
    path = run_experiment(args.config, rule=args.rule)
    print(path.read_text())
    print(f"wrote {path} (and results.json, growth.png, routing.png beside it)")
    return 0


class TrainDefaults:
    """The library's defaults, shown in --help (imported lazily to keep start-up fast)."""

    def __init__(self) -> None:
        from routerretriever.config import ExpertConfig, TrainConfig

        self.train, self.lora = TrainConfig(), ExpertConfig()


def _unit_float(flag: str) -> Callable[[str], float]:
    """argparse type: a number in [0, 1], or a message naming ``flag``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a number, got {text[:40]!r}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be in [0, 1], got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routerretriever", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    from routerretriever import __version__

    parser.add_argument("--version", action="version", version=f"routerretriever {__version__}")
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
    ev.add_argument(
        "--expert",
        type=Path,
        default=None,
        metavar="STORE/NAME",
        help="embed queries with this expert (documents stay on the base model)",
    )
    ev.add_argument(
        "--router",
        type=Path,
        default=None,
        metavar="DIR",
        help="a saved routed system (e.g. the experiment's results/router): its experts, routing "
        "and BM25 settings; the BM25 index is built for each corpus",
    )
    ev.set_defaults(func=cmd_evaluate)

    defaults = TrainDefaults()
    tr = sub.add_parser("train-expert", help="train a LoRA expert for one domain")
    tr.add_argument("name")
    tr.add_argument(
        "--dataset",
        type=Path,
        action="append",
        metavar="DIR",
        help="BEIR folder to train on; repeat for a multi-task LoRA over several",
    )
    tr.add_argument(
        "--corpus",
        type=Path,
        action="append",
        metavar="DIR",
        help="BEIR folder whose corpus gives pseudo-queries (repeatable; mixes with --dataset)",
    )
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--split", default="train", help="labelled split to train on (default: train)")
    src.add_argument(
        "--from-corpus",
        action="store_true",
        help="train on pseudo-queries made from the corpus (no labels needed)",
    )
    tr.add_argument(
        "--dev-split",
        default=None,
        help="split for early stopping (default: 'dev' if present, else held-out queries)",
    )
    tr.add_argument(
        "--out",
        type=Path,
        default=Path("experts"),
        metavar="STORE",
        help="expert store folder (default: ./experts)",
    )
    tr.add_argument("--model", default=None, help="base model folder or hub id")
    tr.add_argument("--cache-dir", type=Path, default=None)
    for flag, typ in (
        ("lr", float),
        ("batch_size", int),
        ("max_steps", int),
        ("hard_negatives", int),
        ("mine_skip", int),
        ("eval_every", int),
        ("patience", int),
        ("seed", int),
    ):
        default = getattr(defaults.train, flag)
        tr.add_argument(
            "--" + flag.replace("_", "-"), type=typ, default=default, help=f"default: {default}"
        )
    for flag, typ in (("r", int), ("alpha", int), ("dropout", float)):
        default = getattr(defaults.lora, flag)
        tr.add_argument(
            "--" + flag, type=typ, default=default, help=f"LoRA {flag} (default: {default})"
        )
    tr.add_argument("--target-modules", default=",".join(defaults.lora.target_modules))
    tr.add_argument(
        "--crops-per-doc",
        type=int,
        default=2,
        help="pseudo-queries: text crops per document (default: 2)",
    )
    tr.add_argument(
        "--min-words", type=int, default=5, help="pseudo-queries: shortest crop (default: 5)"
    )
    tr.add_argument(
        "--max-words", type=int, default=16, help="pseudo-queries: longest crop (default: 16)"
    )
    tr.add_argument(
        "--max-docs",
        type=int,
        default=None,
        help="pseudo-queries: sample at most this many documents (default: all)",
    )
    tr.set_defaults(func=cmd_train_expert)

    ex = sub.add_parser("experts", help="inspect an expert store")
    ex_sub = ex.add_subparsers(dest="experts_command", required=True)
    ls = ex_sub.add_parser("list", help="list the experts in a store")
    ls.add_argument("store", type=Path)
    ls.set_defaults(func=cmd_experts_list)

    xp = sub.add_parser("experiment", help="run the paper's experiments from a TOML config")
    xp.add_argument("config", type=Path)
    xp.add_argument(
        "--rule",
        choices=["mean", "weighted", "nearest"],
        default=None,
        help="routing rule (default: the best on the dev instances)",
    )
    xp.set_defaults(func=cmd_experiment)

    sv = sub.add_parser("serve", help="serve routed search over HTTP (FastAPI + uvicorn)")
    sv.add_argument("--store", type=Path, required=True, help="expert store folder")
    sv.add_argument("--corpus", type=Path, required=True, help="BEIR folder of the documents")
    sv.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=DIR[:SPLIT]",
        help="a domain whose instances build the pilot library: a BEIR folder and its labelled "
        "split (default train) or 'corpus' for pseudo-queries; repeat per domain",
    )
    sv.add_argument(
        "--expert",
        action="append",
        default=None,
        metavar="PATH",
        help="expert folder (relative to the store) to serve at the first start; later starts "
        "serve what the last run served (default: none)",
    )
    sv.add_argument("--index", choices=["faiss", "milvus"], default="faiss")
    sv.add_argument(
        "--milvus-uri",
        default="./routerretriever-milvus.db",
        help="Milvus Lite file or server URI, with --index milvus (a collection already holding "
        "this corpus is reused)",
    )
    sv.add_argument(
        "--ray-actors",
        type=int,
        default=0,
        help="embed a corpus missing from the cache with this many Ray actors (default: 0, "
        "in process)",
    )
    sv.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to use with --ray-actors, e.g. 'auto' (default: start a local Ray)",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--rule", choices=["mean", "weighted", "nearest"], default="weighted")
    sv.add_argument(
        "--alpha",
        type=_unit_float("--alpha"),
        default=0.5,
        help="the dense side's weight when fused with BM25 (1: dense only; default 0.5, the "
        "experiment's dev choice, docs/results.md); with --index milvus, Milvus's own BM25",
    )
    sv.add_argument(
        "--base-mix",
        type=_unit_float("--base-mix"),
        default=0.3,
        help="share of the base model's query vector mixed into the routed expert's (0: the "
        "paper's hard routing; default 0.3, the experiment's dev choice; costs no extra pass)",
    )
    sv.add_argument("--routing-precision", choices=["auto", "float32", "bfloat16"], default="auto")
    sv.add_argument("--model", default=None, help="base model folder or hub id")
    sv.add_argument("--cache-dir", type=Path, default=None)
    sv.add_argument(
        "--batch-window-ms",
        type=float,
        default=0.0,
        help="hold a batch's first request this long for others (default 0: take what is queued)",
    )
    sv.add_argument(
        "--max-batch-queries",
        type=int,
        default=256,
        help="queries merged into one batch at most (0: no micro-batching)",
    )
    sv.add_argument("--max-queries", type=int, default=64, help="queries per request at most")
    sv.add_argument("--max-query-chars", type=int, default=2000)
    sv.add_argument("--max-k", type=int, default=100)
    sv.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413"
    )
    sv.add_argument(
        "--max-connections",
        type=int,
        default=4096,
        help="open connections and requests at most; more are answered 503",
    )
    sv.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="serve N engine replicas behind Ray Serve (with --ray-address, on a cluster); "
        "experts added or removed through any replica reach all",
    )
    sv.add_argument(
        "--header-timeout",
        type=float,
        default=5.0,
        help="seconds a connection may take to send a whole request head (slow clients: closed)",
    )
    sv.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
        f"(default: ${API_KEY_ENV})",
    )
    sv.add_argument(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="keep POST/DELETE /experts on without an API key on a non-loopback host",
    )
    sv.set_defaults(func=cmd_serve)
    return parser


def _raise_open_files_limit() -> None:
    """Allow as many open files as the system lets this process have (the soft limit is often
    1,024, which a burst of idle connections exhausts)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not on this system: keep what there is
        pass


def _serve_replicas(args: argparse.Namespace, api_key: str | None, admin: bool) -> int:
    from routerretriever import replicas

    if args.ray_actors:
        raise RouterRetrieverError("--ray-actors goes with a single server, not --replicas")
    spec = replicas.ServeSpec(
        store=args.store.resolve(),
        corpus=args.corpus.resolve(),
        domains=list(args.domain),
        model=args.model,
        index=args.index,
        milvus_uri=args.milvus_uri,
        cache_dir=args.cache_dir.resolve() if args.cache_dir else None,
        rule=args.rule,
        routing_precision=args.routing_precision,
        alpha=args.alpha,
        base_mix=args.base_mix,
        limits=(args.max_queries, args.max_query_chars, args.max_k),
        batch_window_ms=args.batch_window_ms,
        max_batch_queries=args.max_batch_queries,
        api_key=api_key,
        admin=admin,
        max_body_bytes=args.max_body_bytes,
    )
    if args.expert:
        replicas.save_served(spec.store, list(args.expert))
    print(
        f"serving {args.replicas} replicas with Ray Serve at http://{args.host}:{args.port} "
        "(each loads the model and the index; Ctrl-C stops)",
        file=sys.stderr,
    )
    try:
        replicas.run(spec, args.replicas, args.host, args.port, address=args.ray_address)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from routerretriever.batching import Limits
    from routerretriever.data import load_corpus
    from routerretriever.encoder import Encoder
    from routerretriever.instances import Domain
    from routerretriever.lexical import BM25Config
    from routerretriever.service import create_app, guarded_http_protocol
    from routerretriever.serving import Engine
    from routerretriever.store import corpus_index

    domains = [Domain.parse(d) for d in args.domain]  # fail before loading anything
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    admin = bool(api_key) or loopback or args.allow_unauthenticated_admin
    if not api_key and not loopback:
        print(
            f"warning: serving on {args.host} without an API key: anyone who reaches this port "
            f"can search{'' if not admin else ' and add or remove experts'}. Set --api-key or "
            f"${API_KEY_ENV}"
            + ("" if admin else "; adding and removing experts is off without one"),
            file=sys.stderr,
        )
    if not args.store.is_dir():
        raise RouterRetrieverError(f"--store {args.store}: expert store does not exist")
    if args.replicas:
        return _serve_replicas(args, api_key, admin)
    corpus = load_corpus(args.corpus)
    encoder = Encoder.load(args.model)
    embedder = None
    if args.ray_actors:
        import ray

        from routerretriever.distributed import ray_embedder

        ray.init(address=args.ray_address, include_dashboard=False)
        embedder = ray_embedder(encoder, actors=args.ray_actors)
    index = corpus_index(
        encoder,
        corpus,
        backend=args.index,
        milvus_uri=args.milvus_uri,
        cache_dir=args.cache_dir,
        embedder=embedder,
        bm25=BM25Config() if args.alpha < 1 else None,
    )
    engine = Engine.open(
        encoder,
        args.store,
        corpus,
        domains,
        index=index,
        experts=args.expert,
        rule=args.rule,
        routing_precision=args.routing_precision,
        cache_dir=args.cache_dir,
        alpha=args.alpha,
        base_mix=args.base_mix,
    )
    app = create_app(
        engine,
        limits=Limits(args.max_queries, args.max_query_chars, args.max_k),
        batch_window_ms=args.batch_window_ms,
        max_batch_queries=args.max_batch_queries,
        api_key=api_key,
        admin=admin,
        max_body_bytes=args.max_body_bytes,
    )
    print(
        f"serving {len(engine.index)} documents with experts {engine.experts} at "
        f"http://{args.host}:{args.port} (API pages at /docs; Ctrl-C stops)",
        file=sys.stderr,
    )
    _raise_open_files_limit()
    try:
        # No lifespan: its only job, stopping the batcher thread (a daemon), ends with the process.
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            lifespan="off",
            limit_concurrency=args.max_connections,  # more: 503 at once, not a stall
            timeout_keep_alive=5,
            http=guarded_http_protocol(args.header_timeout),
        )
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    return 0


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
