"""``routerretriever serve``: its options and the command (a thin shell over
:class:`routerretriever.serving.Engine` and :func:`routerretriever.service.create_app`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routerretriever.errors import RouterRetrieverError

if TYPE_CHECKING:
    from routerretriever.serving import Engine

API_KEY_ENV = "ROUTERRETRIEVER_API_KEY"


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device``, where the models run (:mod:`routerretriever.devices`)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="where the models run: auto (a CUDA GPU where torch sees one, else the CPU; "
        "$ROUTERRETRIEVER_DEVICE overrides), cpu, cuda or cuda:N (default: auto)",
    )


def add_backend_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--backend``, the corpus side's runtime (:mod:`routerretriever.runtime`), and
    ``--device``, alike on every command that embeds documents."""
    add_device_arg(parser)
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx", "bfloat16"],  # runtime.BACKENDS, without importing torch
        default="auto",
        help=f"{what}: auto (bfloat16 where the hardware does it natively, else ONNX Runtime on "
        "a CPU where installed), torch (the exact float32 reference), onnx or bfloat16 "
        "(default: auto)",
    )


def unit_float(flag: str) -> Callable[[str], float]:
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


def add_serve_parser(sub: Any) -> None:
    """The ``serve`` subcommand on ``sub`` (argparse subparsers)."""
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
    sv.add_argument(
        "--router",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="serve as a saved system was chosen: take --alpha, --base-mix, --normalise, --rule, "
        "--decline and BM25's settings from its router.json (the experiment's results/router); "
        "those flags are then not given",
    )
    sv.add_argument("--rule", choices=["mean", "weighted", "nearest"], default=None)
    sv.add_argument(
        "--alpha",
        type=unit_float("--alpha"),
        default=None,
        help="the dense side's weight when fused with BM25 (1: dense only; default 0.5, the "
        "experiment's dev choice, docs/results.md); with --index milvus, Milvus's own BM25",
    )
    sv.add_argument(
        "--base-mix",
        type=unit_float("--base-mix"),
        default=None,
        help="share of the base model's query vector mixed into the routed expert's (0: the "
        "paper's hard routing; default 0.3: a hedge against a routed expert that does not help, "
        "as the served engine fits no gate itself; costs no extra pass)",
    )
    sv.add_argument(
        "--normalise",
        choices=["minmax", "max", "zscore"],  # routerretriever.fusion.NORMALISATIONS
        default=None,
        help="how each side's scores are normalised before fusion: 'minmax' (a list's lowest and "
        "highest hit to 0 and 1, the default), 'max' (divided by the highest) or 'zscore' "
        "(against the query's scores over the whole corpus; a Milvus BM25 list uses its own)",
    )
    sv.add_argument(
        "--decline",
        action="append",
        default=None,
        metavar="NAME",
        help="an expert whose routed queries get the base model instead (no expert pass): the "
        "experiment's gate, as a saved router.json's 'decline' lists it; repeat per expert",
    )
    sv.add_argument("--routing-precision", choices=["auto", "float32", "bfloat16"], default="auto")
    add_backend_arg(sv, "what embeds the documents")
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
    sv.add_argument(
        "--model-workers",
        type=int,
        default=None,
        help="batches run at once, each on its share of the cores (default: 2 on a machine with "
        "2 or more cores, which keeps them busier under load, docs/results.md; 1: one batch on "
        "all cores)",
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
    sv.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log one line per request (method, path, status); --no-access-log for none",
    )
    sv.set_defaults(func=cmd_serve)


def _check_port(host: str, port: int) -> None:
    """Fail now, with a hint, when ``host:port`` cannot be listened on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise RouterRetrieverError(
                f"cannot listen on {host}:{port} ({e.strerror or e}): is another server using "
                "it? Stop it or choose another --port"
            ) from None


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
    if args.model_workers not in (None, 1):
        raise RouterRetrieverError("--model-workers goes with a single server, not --replicas")
    if args.device not in ("auto", "cpu"):
        raise RouterRetrieverError(
            "--replicas runs its engines on the CPU (Ray gives them no GPU); --device "
            f"{args.device[:20]} goes with a single server"
        )
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
        normalise=args.normalise,
        decline=list(args.decline),
        base_alpha=args.base_alpha,
        scope=args.scope,
        runtime=args.backend,
        bm25=args.bm25,
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


#: ``serve``'s routing and fusion settings without ``--router`` (the experiment's dev choices of
#: dense weight and normalisation; a base-model hedge, as the served engine fits no gate)
SERVE_DEFAULTS: dict[str, Any] = {
    "alpha": 0.5,
    "base_mix": 0.3,
    "normalise": "minmax",
    "rule": "weighted",
    "decline": [],
}


def resolve_settings(args: argparse.Namespace) -> None:
    """Fill ``args``'s routing and fusion settings (and ``args.bm25``): from ``--router``'s
    router.json, which may not be combined with them, else :data:`SERVE_DEFAULTS`."""
    from routerretriever.lexical import BM25Config
    from routerretriever.retriever import RouterRetriever

    if getattr(args, "bm25", None) is not None:
        return  # resolved already
    given = [k for k in SERVE_DEFAULTS if getattr(args, k) is not None]
    if args.router is not None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise RouterRetrieverError(f"--router sets {flags} from its router.json; drop {flags}")
        saved = RouterRetriever.serving_settings(args.router)
        args.bm25 = saved.pop("bm25")
        for k, v in saved.items():
            setattr(args, k, v)
        return
    args.base_alpha = args.scope = None  # only a saved router sets them
    for k, v in SERVE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, list(v) if isinstance(v, list) else v)
    args.bm25 = BM25Config()


def open_engine(args: argparse.Namespace) -> Engine:
    """The engine ``serve ARGS`` serves: the corpus indexed (cached), the experts and pilot
    library loaded, BM25 beside the dense index where ``--alpha`` < 1. The load benchmark
    builds its offline peer with it, so both measure one engine."""
    resolve_settings(args)
    from routerretriever.data import load_corpus
    from routerretriever.encoder import Encoder
    from routerretriever.indexes import corpus_index
    from routerretriever.instances import Domain
    from routerretriever.serving import Engine

    domains = [Domain.parse(d) for d in args.domain]
    corpus = load_corpus(args.corpus)
    encoder = Encoder.load(args.model)
    embedder = None
    if args.ray_actors:
        import ray

        from routerretriever.distributed import ray_embedder

        ray.init(
            address=args.ray_address,
            include_dashboard=False,
            log_to_driver=False,  # the actors' logs would flood the terminal
            logging_level=logging.WARNING,
        )
        embedder = ray_embedder(encoder, actors=args.ray_actors)
    index = corpus_index(
        encoder,
        corpus,
        backend=args.index,
        milvus_uri=args.milvus_uri,
        cache_dir=args.cache_dir,
        embedder=embedder,
        bm25=args.bm25 if args.alpha < 1 else None,
        runtime=args.backend,
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
        normalise=args.normalise,
        decline=args.decline,
        base_alpha=args.base_alpha,
        scope=args.scope,
        runtime=args.backend,
        bm25=args.bm25,
    )
    return engine


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from routerretriever.batching import Limits
    from routerretriever.experts import check_name
    from routerretriever.instances import Domain
    from routerretriever.service import create_app, guarded_http_protocol

    for d in args.domain:  # fail before loading anything
        Domain.parse(d)
    resolve_settings(args)
    for name in args.decline:
        try:
            check_name(name)
        except ValueError as e:
            raise RouterRetrieverError(f"--decline: {e}") from None
    if args.model_workers is not None and args.model_workers < 1:
        raise RouterRetrieverError(f"--model-workers must be at least 1, got {args.model_workers}")
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
    _check_port(args.host, args.port)  # before minutes of loading, not after
    if args.replicas:
        return _serve_replicas(args, api_key, admin)
    engine = open_engine(args)
    import torch

    workers = args.model_workers or min(2, torch.get_num_threads())
    if workers > 1:  # loaded on every core; now each worker's batch gets its share
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    app = create_app(
        engine,
        limits=Limits(args.max_queries, args.max_query_chars, args.max_k),
        batch_window_ms=args.batch_window_ms,
        max_batch_queries=args.max_batch_queries,
        api_key=api_key,
        admin=admin,
        max_body_bytes=args.max_body_bytes,
        model_workers=workers,
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
            log_level="info" if args.access_log else "warning",
            access_log=args.access_log,
            lifespan="off",
            limit_concurrency=args.max_connections,  # more: 503 at once, not a stall
            timeout_keep_alive=5,
            http=guarded_http_protocol(args.header_timeout),
        )
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    return 0
