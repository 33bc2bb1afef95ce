"""GPU check: each pass on a CUDA GPU against the same pass on the CPU, in one run, and the GPU's
corpus speed against sentence-transformers on the same GPU.

    python benchmarks/gpu_check.py [--labelled ../shared/data/beir/scifact]
        [--corpus-only ../shared/data/classic/med] [--model DIR] [--steps 300] [--json FILE]

1. Corpus vectors: float32 and bfloat16 autocast on the GPU against float32 on the CPU (lowest
   cosine over ``--docs`` documents).
2. Expert training: one batch's loss and LoRA gradients in eval mode (exact), then the same
   20 steps (in-batch negatives only, so both see the same batches and the same initial LoRA;
   the base model's dropout draws from each device's own generator) on each: dev nDCG@10 and
   the two adapters' query vectors.
   Then a full expert (``--steps``) on the GPU alone, with its time.
3. Routed search with BM25: pilots built (Algorithm 1) and both domains' test queries searched
   on each device, routing pass in float32 on both; nDCG@10 and routes must agree.
4. Speed, median of ``--rounds``: our corpus path against sentence-transformers on the GPU, both
   in float32 and bfloat16, same texts, batch size and max length; routed/plain query
   throughput on the GPU with the routing pass as ``"auto"`` picks it there (bfloat16).

Exits 1 when a parity check fails. Needs a GPU torch can see (``--device`` names it).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS: list[tuple[str, bool, str]] = []  # (what, held, numbers)


def check(what: str, held: bool, numbers: str) -> None:
    CHECKS.append((what, bool(held), numbers))
    print(f"{'ok  ' if held else 'FAIL'} {what}: {numbers}", flush=True)


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def timed(fn: Callable[[], Any], rounds: int, sync: bool) -> float:
    """Median seconds of ``fn`` over ``rounds`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(rounds):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def corpus_parity(encs: dict[str, Any], texts: list[str]) -> dict[str, float]:
    from routerretriever.runtime import BFLOAT16, TORCH

    ref = TORCH.encode(encs["cpu"], texts, show_progress=False)
    got32 = TORCH.encode(encs["gpu"], texts, show_progress=False)
    got16 = BFLOAT16.encode(encs["gpu"], texts, show_progress=False)
    out = {"float32": lowest_cosine(ref, got32), "bfloat16": lowest_cosine(ref, got16)}
    check("corpus float32, GPU against CPU", out["float32"] > 0.99999, f"{out['float32']:.7f}")
    check(
        "corpus bfloat16 on the GPU against CPU float32",
        out["bfloat16"] > 0.999,
        f"{out['bfloat16']:.5f}",
    )
    return out


def training_parity(encs: dict[str, Any], labelled: Path, tmp: Path) -> dict[str, Any]:
    """One step's loss and LoRA gradients, exactly (eval mode: no dropout anywhere), then 20
    training steps, where the base model's own dropout draws from each device's generator."""
    from peft import get_peft_model

    from routerretriever.config import ExpertConfig, TrainConfig
    from routerretriever.encoder import load_base_weights
    from routerretriever.losses import contrastive_loss
    from routerretriever.training import fit_expert, load_training_set

    sets = {
        side: load_training_set(enc, labelled, cache_dir=tmp / side, backend="torch")
        for side, enc in encs.items()
    }
    ts = sets["cpu"]
    qids = sorted(ts.positives)[:32]
    rows = [ts.doc_ids.index(ts.positives[q][0]) for q in qids]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = get_peft_model(
            load_base_weights(encs["cpu"].model_path), ExpertConfig().lora_config()
        )
    for name, p in lora.named_parameters():  # B starts at zero: give both factors gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01, generator=torch.Generator().manual_seed(1))
    loss, grads = {}, {}
    for side, enc in encs.items():
        model = copy.deepcopy(lora).to(enc.device).eval()
        q = enc.forward(enc.collate(enc.tokenize([ts.queries[x] for x in qids], 128)), model)
        docs = torch.from_numpy(ts.doc_emb[rows]).to(enc.device)
        out = contrastive_loss(q, docs, torch.arange(len(qids), device=enc.device))
        out.backward()
        loss[side] = float(out.detach())
        grads[side] = torch.cat(
            [p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None]
        )
    gcos = float(torch.nn.functional.cosine_similarity(grads["cpu"], grads["gpu"], dim=0))
    check(
        "one step's loss, GPU against CPU",
        abs(loss["cpu"] - loss["gpu"]) < 1e-5,
        f"{loss['cpu']:.7f} against {loss['gpu']:.7f}",
    )
    check("one step's LoRA gradients", gcos > 0.99999, f"cosine {gcos:.7f}")

    train = TrainConfig(max_steps=20, eval_every=10, patience=10, hard_negatives=0)
    models, infos = {}, {}
    for side, enc in encs.items():
        start = time.perf_counter()
        models[side], info = fit_expert(enc, [sets[side]], "p", ExpertConfig(dropout=0.0), train)
        infos[side] = {
            "seconds": time.perf_counter() - start,
            "losses": [info.training["first_loss"], info.training["last_loss"]],
            "dev": [h["dev_ndcg@10"] for h in info.dev["history"]],
        }
    queries = list(ts.dev_queries.values())[:100]
    vecs = [
        encs["cpu"].encode(queries, model=models[s].to("cpu"), show_progress=False) for s in encs
    ]
    cos = lowest_cosine(*vecs)
    dev_gap = max(abs(a - b) for a, b in zip(*(infos[s]["dev"] for s in encs), strict=True))
    check(
        "20 steps: dev nDCG@10 at steps 0, 10, 20 (dropout noise)",
        dev_gap < 0.01,
        f"largest gap {dev_gap:.4f}",
    )
    check("20 steps: the two adapters' query vectors", cos > 0.999, f"lowest cosine {cos:.6f}")
    return {
        "one_step": {"loss": loss, "gradient_cosine": gcos},
        "sides": infos,
        "adapter_cosine": cos,
        "seconds_ratio_cpu_over_gpu": infos["cpu"]["seconds"] / infos["gpu"]["seconds"],
    }


def full_experts(enc: Any, folders: list[Path], tmp: Path, steps: int) -> dict[str, Any]:
    """An expert per domain on the GPU alone (the corpus-only one from pseudo-queries)."""
    from routerretriever.config import TrainConfig
    from routerretriever.training import load_training_set, train_expert

    out = {}
    for folder, from_corpus in zip(folders, (False, True), strict=True):
        ts = load_training_set(
            enc,
            folder,
            split=None if from_corpus else "train",
            from_corpus=from_corpus,
            cache_dir=tmp / "gpu",
        )
        start = time.perf_counter()
        info = train_expert(
            enc, [ts], folder.name, tmp / "experts", train=TrainConfig(max_steps=steps)
        )
        out[folder.name] = {
            "seconds": time.perf_counter() - start,
            "dev_ndcg@10": info.dev["ndcg@10"],
            "base_dev_ndcg@10": info.dev["base_ndcg@10"],
            "steps_run": info.training["steps_run"],
        }
        print(f"     expert {folder.name} trained on the GPU: {out[folder.name]}", flush=True)
    return out


def routed_parity(encs: dict[str, Any], folders: list[Path], tmp: Path) -> dict[str, Any]:
    from routerretriever import RouterRetriever, evaluate_retriever, load_beir
    from routerretriever.experts import load_expert
    from routerretriever.instances import Domain, build_pilot_library
    from routerretriever.lexical import BM25Config

    labelled, corpus_only = folders
    domains = [Domain(labelled.name, labelled), Domain(corpus_only.name, corpus_only, "corpus")]
    datasets = [load_beir(f, "test") for f in folders]
    scores: dict[str, dict[str, float]] = {}
    routes: dict[str, list[str]] = {}
    pilots = None
    for side, enc in encs.items():
        for f in folders:
            if f.name not in enc.experts:
                load_expert(enc, tmp / "experts" / f.name)
        pilots = build_pilot_library(enc, domains, cache_dir=tmp / side, backend="torch")
        rr = RouterRetriever(
            enc,
            pilots,
            alpha=0.5,
            bm25=BM25Config(),
            routing_precision="float32",
            cache_dir=tmp / side,
            backend="torch",
        )
        scores[side], routes[side] = {}, []
        for ds in datasets:
            scores[side][ds.name] = evaluate_retriever(rr, ds, ["ndcg@10"]).scores["ndcg@10"]
            routes[side] += [d.expert or "" for d in rr.route(list(ds.queries.values()))]
    gap = max(abs(scores["cpu"][d] - scores["gpu"][d]) for d in scores["cpu"])
    same = np.mean([a == b for a, b in zip(routes["cpu"], routes["gpu"], strict=True)])
    check("routed + BM25 nDCG@10, GPU against CPU", gap < 2e-3, f"{scores}; largest gap {gap:.5f}")
    check("routes, GPU against CPU", same >= 0.99, f"{100 * same:.1f}% the same")
    return {"ndcg@10": scores, "routes_agree": float(same), "pilots": pilots}


def speed(
    enc: Any,
    model_path: str,
    texts: list[str],
    queries: dict[str, str],
    pilots: Any,
    rounds: int,
    tmp: Path,
) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from routerretriever import DenseRetriever, RouterRetriever
    from routerretriever.data import Document
    from routerretriever.runtime import BFLOAT16, TORCH, planned_runtime

    out: dict[str, Any] = {"docs": len(texts)}
    plan = planned_runtime(enc)  # what embed_corpus takes on this device
    sync = enc.device.type == "cuda"
    print(f"\n| encoder on {enc.device} | batch | docs/s |\n|---|---|---|")
    for batch in (32, 128):
        sides: dict[str, Callable[[], Any]] = {
            "ours float32": lambda b=batch: TORCH.encode(
                enc, texts, batch_size=b, show_progress=False
            ),
            "ours bfloat16 autocast": lambda b=batch: BFLOAT16.encode(
                enc, texts, batch_size=b, show_progress=False
            ),
        }
        for label, dtype in (("float32", torch.float32), ("bfloat16 weights", torch.bfloat16)):
            st = SentenceTransformer(
                model_path, device=str(enc.device), model_kwargs={"torch_dtype": dtype}
            )
            st.max_seq_length = enc.settings.max_length
            sides[f"sentence-transformers {label}"] = lambda m=st, b=batch: m.encode(
                texts, batch_size=b, show_progress_bar=False
            )
        rate = {k: len(texts) / timed(fn, rounds, sync) for k, fn in sides.items()}
        for label, docs_per_s in rate.items():
            print(f"| {label} | {batch} | {docs_per_s:.0f} |")
        ours = rate["ours bfloat16 autocast" if plan == "bfloat16" else "ours float32"]
        ratios = {
            "default_over_st_float32": ours / rate["sentence-transformers float32"],
            "bfloat16_over_st_bfloat16": rate["ours bfloat16 autocast"]
            / rate["sentence-transformers bfloat16 weights"],
        }
        out[f"batch_{batch}"] = {**rate, **ratios}
        print(
            f"ratio {ratios['default_over_st_float32']:.2f} (batch {batch}: our default corpus "
            f"path here, {plan}, over sentence-transformers float32); bfloat16 against "
            f"bfloat16: {ratios['bfloat16_over_st_bfloat16']:.2f}"
        )
    corpus = {str(i): Document(text=t) for i, t in enumerate(texts)}
    plain = DenseRetriever(enc, cache_dir=tmp / "gpu")
    plain.index_corpus(corpus)
    routed = RouterRetriever(enc, pilots, cache_dir=tmp / "gpu")  # routing pass: "auto"
    routed.index_corpus(corpus)
    t_plain = timed(lambda: plain.search(queries, k=10), rounds, sync)
    t_routed = timed(lambda: routed.search(queries, k=10), rounds, sync)
    out["queries_per_s"] = {"plain": len(queries) / t_plain, "routed": len(queries) / t_routed}
    out["routed_over_plain"] = t_plain / t_routed
    print(
        f"queries/s on {enc.device}: plain {len(queries) / t_plain:.0f}, routed {len(queries) / t_routed:.0f}; "
        f"routed/plain {t_plain / t_routed:.2f}"
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=Path, default=ROOT.parent / "shared/data/beir/scifact")
    parser.add_argument("--corpus-only", type=Path, default=ROOT.parent / "shared/data/classic/med")
    parser.add_argument("--model", default=None, help="base model folder (default: packaged)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sections", default="corpus,training,experts,routed,speed")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from routerretriever import Encoder, load_beir, load_corpus
    from routerretriever.model_folder import default_model_path

    hf_logging.disable_progress_bar()
    model_path = args.model or default_model_path()
    encs = {
        "cpu": Encoder.load(model_path, device="cpu"),
        "gpu": Encoder.load(model_path, device=args.device),
    }
    gpu = encs["gpu"].device
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else str(gpu)
    print(f"GPU: {name}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    texts = [d.full_text for d in list(load_corpus(args.labelled).values())[: args.docs]]
    report: dict[str, Any] = {}
    folders = [args.labelled, args.corpus_only]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        sections: dict[str, Callable[[], Any]] = {
            "corpus": lambda: corpus_parity(encs, texts),
            "training": lambda: training_parity(encs, args.labelled, tmp),
            "experts": lambda: full_experts(encs["gpu"], folders, tmp, args.steps),
            "routed": lambda: routed_parity(encs, folders, tmp),
            "speed": lambda: speed(
                encs["gpu"],
                model_path,
                texts,
                load_beir(args.labelled, "test").queries,
                report["routed"]["pilots"],
                args.rounds,
                tmp,
            ),
        }
        for section, run in sections.items():
            if section not in args.sections.split(","):
                continue
            try:  # one section's crash is a failed check; the others still run
                report[section] = run()
            except Exception as e:
                where = traceback.extract_tb(e.__traceback__)[-3:]
                trail = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(where))
                check(f"section {section} ran", False, f"{type(e).__name__}: {e} ({trail})")
        report.get("routed", {}).pop("pilots", None)
    report["checks"] = [{"what": w, "held": h, "numbers": n} for w, h, n in CHECKS]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [w for w, h, _ in CHECKS if not h]
    print(
        f"\n{len(CHECKS) - len(failed)} of {len(CHECKS)} checks held"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
