"""The ``routerretriever`` command: thin shells over the library API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routerretriever.errors import RouterRetrieverError
from routerretriever.experts_cli import add_experts_parser, add_router_parser, warn_caveat
from routerretriever.serve_cli import add_backend_arg, add_device_arg, add_serve_parser
from routerretriever.tables import format_table

logger = logging.getLogger("routerretriever")


def _write_json(path: Path, payload: object) -> None:
    from routerretriever.files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def _log_phases() -> None:
    """A long command says what it is doing, phase by phase, even without -v (on a terminal
    its bars show too; elsewhere the encoder logs its progress every 15 s)."""
    logging.getLogger("routerretriever").setLevel(logging.INFO)


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
    _log_phases()
    datasets = [load_beir(folder, args.split) for folder in args.datasets]  # fail before the model
    common = dict(
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        backend=args.backend,
    )
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

            loaded = load_expert(encoder, args.expert)
            expert = loaded.name
            warn_caveat(loaded)
        retriever = DenseRetriever(encoder, expert=expert, **common)
    rows: list[list[Any]] = []
    report: dict[str, Any] = {}
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
            "corpus_runtime": retriever.corpus_runtime,  # e.g. bfloat16: the numbers' provenance
            "device": str(encoder.device),
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
    _log_phases()
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
    common = dict(
        dev_split=args.dev_split,
        cache_dir=args.cache_dir,
        seed=args.seed,
        pseudo=pseudo,
        backend=args.backend,
    )
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
    warn_caveat(info)
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from routerretriever.datasets import BEIR_MD5, BEIR_URL

    print(f"BEIR collections (routerretriever data get NAME), from {BEIR_URL.format(name='NAME')}:")
    print("  " + ", ".join(sorted(BEIR_MD5)))
    return 0


def cmd_data_get(args: argparse.Namespace) -> int:
    from routerretriever.datasets import fetch

    last = [0.0, -1]  # time of the last line, last tenth shown

    def progress(done: int, total: int | None) -> None:
        tenth = -1 if not total else done * 10 // total
        if tenth != last[1] or time.monotonic() - last[0] > 5:
            size = f"{done / 1e6:.1f}" + (f" of {total / 1e6:.1f}" if total else "")
            print(f"downloading {args.name}.zip: {size} MB", file=sys.stderr)
            last[:] = [time.monotonic(), tenth]

    path = fetch(args.name, args.to, source=getattr(args, "from"), progress=progress)
    print(f"{args.name} -> {path} (md5 checked; evaluate it: routerretriever evaluate {path})")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from routerretriever.pipeline import run_experiment

    if not args.config.is_file():
        raise RouterRetrieverError(f"{args.config}: no such config file")
    _log_phases()
    path = run_experiment(args.config, rule=args.rule)
    print(path.read_text())
    default = json.loads((path.parent / "results.json").read_text()).get("default", {})
    print(f"wrote {path} (and results.json, growth.png, routing.png beside it)")
    if default:
        print(
            f"default system: {default['name']}, test average {100 * default['average']:.1f}; "
            f"saved as {path.parent / 'router'} (use it: routerretriever evaluate DIR --router "
            f"{path.parent / 'router'}); read results.md first, then docs/results.md"
        )
    return 0


class TrainDefaults:
    """The library's defaults, shown in --help (imported lazily to keep start-up fast)."""

    def __init__(self) -> None:
        from routerretriever.config import ExpertConfig, TrainConfig

        self.train, self.lora = TrainConfig(), ExpertConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routerretriever",
        description="Routed mixture-of-expert retrieval: evaluate, train experts, run the "
        "paper's experiments, serve over HTTP.",
    )
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
    add_backend_arg(ev, "the corpus side's runtime")
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
    add_backend_arg(tr, "what embeds the corpus for hard negatives and early stopping")
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

    add_experts_parser(sub)

    add_router_parser(sub)

    da = sub.add_parser("data", help="fetch public BEIR collections (md5-checked)")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    dl = da_sub.add_parser("list", help="the collections 'data get' knows")
    dl.set_defaults(func=cmd_data_list)
    dg = da_sub.add_parser("get", help="download, check and unpack one collection")
    dg.add_argument("name", help="e.g. scifact, nfcorpus, arguana (see: data list)")
    dg.add_argument("--to", type=Path, default=Path("data/beir"), help="parent folder")
    dg.add_argument(
        "--from",
        type=Path,
        default=None,
        metavar="FILE",
        help="the collection's zip already on disk (no download), checked the same way",
    )
    dg.set_defaults(func=cmd_data_get)

    xp = sub.add_parser("experiment", help="run the paper's experiments from a TOML config")
    xp.add_argument("config", type=Path)
    xp.add_argument(
        "--rule",
        choices=["mean", "weighted", "nearest"],
        default=None,
        help="routing rule (default: the best on the dev instances)",
    )
    add_device_arg(xp)
    xp.set_defaults(func=cmd_experiment)

    add_serve_parser(sub)
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
        if getattr(args, "device", "auto") != "auto":  # for every model this run loads, Ray's too
            from routerretriever.devices import DEVICE_ENV, resolve_device

            os.environ[DEVICE_ENV] = str(resolve_device(args.device))
        return args.func(args)
    except (RouterRetrieverError, ValueError) as e:
        if args.verbose and not isinstance(e, RouterRetrieverError):
            raise  # with -v, a ValueError from deep inside keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
