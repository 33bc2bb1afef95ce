"""Expert passes over queries routed to several experts: mixed batches (each row its own LoRA
term on the shared base weights) against batches of one expert each where an expert's queries
fill whole batches (what ``Encoder.encode`` does on a GPU, :mod:`routerretriever.batch_plan`),
and the plain base pass; same queries, same run, best of several rounds.

Two regimes: all-MiniLM-L6-v2 on this CPU, where a pass is bound by its matmuls, and the tests'
tiny random BERT, where a pass is a few cheap kernels and what each kernel costs to start
dominates, as for MiniLM on a GPU (where the routed/plain ratio came out 0.40 with mixed
batches, docs/results.md "On a CUDA GPU").

    python benchmarks/mixed_batches.py [--queries 2000] [--experts 3] [--rounds 3]

The experts are throwaway LoRAs (two training steps each, the experiment's LoRA settings): a
pass costs the same whatever the adapter learned.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest: the tiny model


def best_of(fn: Callable[[], Any], rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(label: str, model: str, experts: int, texts: list[str], rounds: int) -> None:
    from routerretriever import Encoder, batch_plan
    from routerretriever.experts import load_expert
    from routerretriever.training import TrainConfig, fit_expert, load_training_set, save_expert

    tmp = Path(tempfile.mkdtemp())
    enc = Encoder.load(model, device="cpu")
    corpus = ROOT / "tests/fixtures/tiny"
    ts = load_training_set(enc, corpus, from_corpus=True, cache_dir=tmp, backend="torch")
    names = [f"e{k}" for k in range(experts)]
    for seed, name in enumerate(names):
        cfg = TrainConfig(  # the last step, never step 0: an identity expert costs no LoRA term
            max_steps=2, eval_every=2, batch_size=8, hard_negatives=0, keep_best=False, seed=seed
        )
        model_k, info = fit_expert(enc, [ts], name, train=cfg, show_progress=False)
        save_expert(model_k, info, tmp / "store")
        load_expert(enc, tmp / "store" / name)
    ids = enc.tokenize(texts)
    rng = random.Random(0)
    routed: list[str | None] = [rng.choice([*names, None]) for _ in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    counts = {
        "mixed": len(batch_plan.length_batches(ids, order, 32)),
        "grouped": len(batch_plan.expert_batches(ids, order, routed, 32)),
    }
    plain = best_of(lambda: enc.encode_tokens(ids), rounds)
    one_expert = best_of(lambda: enc.encode_tokens(ids, experts=names[0]), rounds)
    mixed_s = best_of(lambda: enc.encode_tokens(ids, experts=routed), rounds)  # a CPU's plan
    batch_plan.BY_EXPERT["cpu"] = batch_plan.expert_batches  # a GPU's plan, on this CPU
    try:
        grouped_s = best_of(lambda: enc.encode_tokens(ids, experts=routed), rounds)
    finally:
        del batch_plan.BY_EXPERT["cpu"]
    print(
        f"| {label} | {len(texts) / plain:.0f} | {plain / one_expert:.2f} | "
        f"{plain / mixed_s:.2f} ({counts['mixed']} batches) | "
        f"{plain / grouped_s:.2f} ({counts['grouped']} batches) |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--experts", type=int, default=3, help="routed among these and the base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "examples/demo/scifact")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from routerretriever import load_queries
    from routerretriever.model_folder import default_model_path
    from tests.conftest import tiny_model_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    pool = list(load_queries(args.data).values())
    texts = [pool[i % len(pool)] for i in range(args.queries)]
    print(
        f"{args.queries} queries from {args.data.name}, routed at random among {args.experts} "
        f"experts and the base model; batch size 32; best of {args.rounds}; speed as a share of "
        "the plain base pass (1.00 = as fast)\n"
    )
    print("| model | plain queries/s | one expert | mixed batches | one expert per batch |")
    print("|---|---|---|---|---|")
    for label, model in (
        ("all-MiniLM-L6-v2", str(default_model_path())),
        ("tiny random BERT (cheap kernels)", str(tiny_model_path())),
    ):
        measure(label, model, args.experts, texts, args.rounds)


if __name__ == "__main__":
    main()
