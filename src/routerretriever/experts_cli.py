"""``routerretriever experts`` (list, show and remove the experts of a store) and ``router build``
(a routed model bundled from experts and the domains they know)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from routerretriever.errors import RouterRetrieverError
from routerretriever.serve_cli import add_backend_arg, unit_float
from routerretriever.tables import format_table


def warn_caveat(info: Any) -> None:
    """Print an expert's caveat (step 0, below the base) as a warning on stderr."""
    from routerretriever.experts import caveat

    note = caveat(info)
    if note:
        print(f"warning: {note}", file=sys.stderr)


def _short_source(source: str, width: int = 48) -> str:
    """An expert's training source without folder paths (``/a/b/scifact`` -> ``scifact``)."""
    text = " ".join(Path(w).name if "/" in w else w for w in source.split(" "))
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_experts_list(args: argparse.Namespace) -> int:
    from routerretriever.experts import caveat, list_experts

    rows = []
    for e in list_experts(args.store):
        dev, base = e.dev.get("ndcg@10", float("nan")), e.dev.get("base_ndcg@10", float("nan"))
        note = caveat(e)
        rows.append(
            [
                e.name,
                f"{dev:.4f}",
                f"{dev - base:+.4f}",
                f"{e.training.get('best_step', '?')}/{e.training.get('steps_run', '?')}",
                f"{e.seconds:.0f}",
                _short_source(e.source),
                "" if note is None else ("= base" if "step 0" in note else "below base"),
            ]
        )
    if not rows:
        print(f"no experts in {args.store} (an expert is a folder holding expert.json)")
        return 0
    header = ["expert", "dev nDCG@10", "vs base", "best step", "train s", "trained on", "note"]
    print(format_table(header, rows))
    return 0


def _expert_folder(store: Path, name: str) -> Path:
    from routerretriever.experts import METADATA, check_name

    check_name(name)
    folder = store / name
    if not (folder / METADATA).is_file():
        raise RouterRetrieverError(f"no expert {name!r} in {store} (see: experts list {store})")
    return folder


def cmd_experts_show(args: argparse.Namespace) -> int:
    from routerretriever.experts import ExpertInfo

    info = ExpertInfo.read(_expert_folder(args.store, args.name))
    t, d = info.training, info.dev
    lines = [
        f"expert      {info.name}",
        f"folder      {args.store / info.name}",
        f"base model  {info.base_model} (fingerprint {info.base_fingerprint})",
        f"trained on  {info.source}",
        "lora        " + ", ".join(f"{k} {v}" for k, v in info.lora.items()),
        f"training    lr {t.get('lr')}, batch {t.get('batch_size')}, best step "
        f"{t.get('best_step')} of {t.get('steps_run')} (max {t.get('max_steps')}), "
        f"{info.seconds:.0f} s, peak RSS {info.peak_rss_mb:.0f} MB"
        + (f", corpus by {t['corpus_runtime']}" if t.get("corpus_runtime") else ""),
        f"dev         nDCG@10 {d.get('ndcg@10', float('nan')):.4f} against the base model's "
        f"{d.get('base_ndcg@10', float('nan')):.4f} on {d.get('queries', '?')} queries",
    ]
    history = d.get("history") or []
    if history:
        lines.append(
            "dev history " + ", ".join(f"{h['step']}: {h['dev_ndcg@10']:.3f}" for h in history[:12])
        )
    print("\n".join(lines))
    warn_caveat(info)
    return 0


def cmd_experts_remove(args: argparse.Namespace) -> int:
    import json
    import shutil

    folder = _expert_folder(args.store, args.name)
    served = args.store / ".served.json"
    if served.is_file():
        try:
            names = json.loads(served.read_text()).get("experts", {})
        except (json.JSONDecodeError, AttributeError):
            names = {}
        if args.name in names:
            raise RouterRetrieverError(
                f"expert {args.name!r} is in the served set ({served}); stop serving it first "
                f"(DELETE /experts/{args.name})"
            )
    if not args.yes:
        raise RouterRetrieverError(f"this deletes {folder}; add --yes to confirm")
    trash = folder.with_name(f".{folder.name}.removing")
    folder.rename(trash)  # one step: the store never holds half an expert
    shutil.rmtree(trash)
    print(f"removed expert {args.name} ({folder})")
    return 0


def add_experts_parser(sub: Any) -> None:
    """The ``experts`` subcommand on ``sub`` (argparse subparsers)."""
    ex = sub.add_parser("experts", help="inspect an expert store")
    ex_sub = ex.add_subparsers(dest="experts_command", required=True)
    ls = ex_sub.add_parser("list", help="list the experts in a store")
    ls.add_argument("store", type=Path)
    ls.set_defaults(func=cmd_experts_list)
    sh = ex_sub.add_parser("show", help="one expert's training, settings and dev scores")
    sh.add_argument("store", type=Path)
    sh.add_argument("name")
    sh.set_defaults(func=cmd_experts_show)
    rm = ex_sub.add_parser("remove", help="delete an expert from a store (not while served)")
    rm.add_argument("store", type=Path)
    rm.add_argument("name")
    rm.add_argument("--yes", action="store_true", help="confirm the deletion")
    rm.set_defaults(func=cmd_experts_remove)


def cmd_router_build(args: argparse.Namespace) -> int:
    from routerretriever.encoder import Encoder
    from routerretriever.experts import load_expert
    from routerretriever.instances import Domain, build_pilot_library
    from routerretriever.lexical import BM25Config
    from routerretriever.policy import PilotPolicy
    from routerretriever.retriever import RouterRetriever

    domains = [Domain.parse(d) for d in args.domain]  # fail before loading anything
    if not domains:
        raise RouterRetrieverError(
            "give at least one --domain NAME=DIR[:SPLIT] (Algorithm 1's instances)"
        )
    if not args.expert:
        raise RouterRetrieverError("give at least one --expert FOLDER")
    encoder = Encoder.load(args.model)
    for folder in args.expert:
        warn_caveat(load_expert(encoder, folder))
    print(
        f"scoring {len(args.expert)} experts on {len(domains)} domains' instances", file=sys.stderr
    )
    pilots = build_pilot_library(encoder, domains, cache_dir=args.cache_dir, backend=args.backend)
    policy = PilotPolicy(pilots, args.rule, args.base_mix)
    rr = RouterRetriever(
        encoder, policy=policy, alpha=args.alpha, bm25=BM25Config(), normalise=args.normalise
    )
    out = rr.save(args.out)
    print(
        f"routed model -> {out} (experts {encoder.experts}, {len(pilots.pilots)} pilots); "
        f"use it: routerretriever evaluate DIR --router {out}"
    )
    return 0


def add_router_parser(sub: Any) -> None:
    """The ``router build`` subcommand on ``sub`` (argparse subparsers)."""
    rb = sub.add_parser(
        "router", help="bundle a routed model (experts, pilots, fusion settings) as one folder"
    )
    rb_sub = rb.add_subparsers(dest="router_command", required=True)
    bu = rb_sub.add_parser("build", help="pilots from domains' instances, saved with the experts")
    bu.add_argument("--expert", action="append", default=[], metavar="FOLDER", help="repeat")
    bu.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=DIR[:SPLIT]",
        help="a domain whose instances build the pilots: a BEIR folder's labelled split "
        "(default train) or 'corpus' for pseudo-queries; repeat",
    )
    bu.add_argument("--out", type=Path, required=True, help="the folder to write")
    bu.add_argument("--rule", choices=["mean", "weighted", "nearest"], default="weighted")
    bu.add_argument(
        "--alpha", type=unit_float("--alpha"), default=0.5, help="dense weight in BM25 fusion"
    )
    bu.add_argument(
        "--normalise",
        choices=["minmax", "max", "zscore"],  # routerretriever.fusion.NORMALISATIONS
        default="minmax",
        help="each side's scores before fusion: minmax (default), max (divided by the best) or "
        "zscore (against the query's scores over the whole corpus)",
    )
    bu.add_argument(
        "--base-mix", type=unit_float("--base-mix"), default=0.0, help="base vector share"
    )
    bu.add_argument("--model", default=None, help="base model folder or hub id")
    bu.add_argument("--cache-dir", type=Path, default=None)
    add_backend_arg(bu, "what embeds each domain's corpus to score the instances")
    bu.set_defaults(func=cmd_router_build)
