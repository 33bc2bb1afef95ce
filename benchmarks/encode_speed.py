"""Corpus encoding speed: routerretriever's Encoder (each precision, and on ONNX Runtime) against
sentence-transformers (torch, and its ONNX Runtime backend where it loads offline).

Same model (all-MiniLM-L6-v2), same documents, same batch size and max length, in the same run,
on a long-document corpus (SciFact) and a short one (MED). Each side runs in its own fresh
subprocess (so peak RSS is its own), alternating, several rounds; the table gives the median
docs/s of each, its peak RSS, and the lowest cosine of its embeddings to ours in float32. The
``ratio`` lines give our default corpus path (what ``embed_corpus`` uses,
:func:`routerretriever.runtime.planned_runtime`: bfloat16 autocast where the CPU does bfloat16
natively, else ONNX Runtime in float32 where it is installed, else torch float32) over
sentence-transformers torch. The graph is exported once, before any timing.

    python benchmarks/encode_speed.py [--data ../shared/data/beir/scifact --data ...] [--docs 1000]
        [--sides ours-float32,ours-onnx,st-torch,st-onnx] [--st-onnx-python VENV/bin/python]

sentence-transformers' ONNX backend needs ``optimum``, whose transformers pin conflicts with
ours; ``--st-onnx-python`` runs that side under another Python (the torch side stays on this
one's sentence-transformers), e.g. a venv made with
``pip install torch==2.13.0 "sentence-transformers<6" "optimum[onnxruntime]"``.

Where the CPU lacks native bfloat16 that side is emulated (about 6x slower than float32 here),
so by default it runs only where bfloat16 is native; ``--sides`` names it to run it anyway.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "ours-float32": "routerretriever Encoder.encode, float32",
    "ours-bfloat16": "routerretriever Encoder.encode, bfloat16 autocast",
    "ours-onnx": "routerretriever Encoder.encode on ONNX Runtime, float32",
    "st-torch": "sentence-transformers encode (torch)",
    "st-onnx": "sentence-transformers encode (backend='onnx')",
}

RUNTIMES = {"ours-float32": "torch", "ours-bfloat16": "bfloat16", "ours-onnx": "onnx"}


def worker(
    side: str, texts_file: Path, model_path: str, batch_size: int, max_length: int, out: Path
) -> None:
    """One side's timed run over the texts in ``texts_file``. The sentence-transformers sides
    import nothing of ours, so they may run under another Python (``--st-onnx-python``)."""
    texts = json.loads(texts_file.read_text())
    if side.startswith("ours"):
        from routerretriever.encoder import Encoder
        from routerretriever.runtime import corpus_runtime

        enc = Encoder.load(model_path, max_length=max_length)
        runtime = corpus_runtime(enc, out.parent, RUNTIMES[side])  # as embed_corpus does
        run = lambda t: runtime.encode(  # noqa: E731
            enc, t, batch_size=batch_size, show_progress=False
        )
    else:
        from sentence_transformers import SentenceTransformer

        backend = "onnx" if side == "st-onnx" else "torch"
        try:  # backend="onnx" exports the graph in memory (optimum) when the folder has none
            st = SentenceTransformer(model_path, device="cpu", backend=backend)
        except Exception as e:  # e.g. optimum missing
            print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:200]}"}))
            return
        st.max_seq_length = max_length
        run = lambda t: st.encode(t, batch_size=batch_size, show_progress_bar=False)  # noqa: E731
    run(texts[:batch_size])  # warm-up: page in weights and kernels on every side alike
    start = time.perf_counter()
    emb = np.asarray(run(texts), dtype=np.float32)
    seconds = time.perf_counter() - start
    np.save(out, emb)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"docs_per_s": len(texts) / seconds, "peak_rss_mb": peak_mb}))


def measure(args: argparse.Namespace, data: Path, tmp: Path) -> None:
    from routerretriever import load_corpus
    from routerretriever.encoder import Encoder, default_model_path
    from routerretriever.runtime import planned_runtime

    texts = tmp / "texts.json"
    texts.write_text(
        json.dumps([d.full_text for d in list(load_corpus(data).values())[: args.docs]])
    )
    model_path = str(default_model_path())
    sides = [s for s in SIDES if s in args.sides.split(",")]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    errors: dict[str, str] = {}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            if side in errors:
                continue
            python = args.st_onnx_python if side == "st-onnx" else sys.executable
            cmd = [python, __file__, "--worker", side, "--texts", str(texts)]
            cmd += ["--model", model_path, "--batch-size", str(args.batch_size)]
            cmd += ["--max-length", str(args.max_length), "--out", str(tmp / f"{side}.npy")]
            run = subprocess.run(cmd, capture_output=True, text=True)
            lines = run.stdout.strip().splitlines()
            got = json.loads(lines[-1]) if run.returncode == 0 and lines else None
            if got is None or "error" in got:
                errors[side] = (
                    got["error"] if got else f"exit {run.returncode}: {run.stderr[-300:]}"
                )
                continue
            results[side].append(got)
    ref = np.load(tmp / "ours-float32.npy")
    print(
        f"\n{data.name}: first {args.docs} docs, batch size {args.batch_size}, max length "
        f"{args.max_length}, {args.rounds} rounds, median"
    )
    print("| encoder | docs/s | peak RSS (MB) | lowest cosine to ours float32 |")
    print("|---|---|---|---|")
    speed: dict[str, float] = {}
    for side in sides:
        label = SIDES[side]
        if side in errors:
            print(f"| {label} | not measured: {errors[side]} | | |")
            continue
        speed[side] = statistics.median(x["docs_per_s"] for x in results[side])
        peak = max(x["peak_rss_mb"] for x in results[side])
        cos = float((ref * np.load(tmp / f"{side}.npy")).sum(1).min())
        print(f"| {label} | {speed[side]:.1f} | {peak:.0f} | {cos:.5f} |")
    plan = planned_runtime(Encoder.load())
    fast = next(side for side, runtime in RUNTIMES.items() if runtime == plan)
    if fast not in speed or "st-torch" not in speed:
        return
    print(
        f"ratio {speed[fast] / speed['st-torch']:.2f} ({data.name}: our default fast path, "
        f"{fast}, over sentence-transformers torch)"
    )
    if "st-onnx" in speed:
        print(f"against sentence-transformers ONNX: {speed[fast] / speed['st-onnx']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", help="BEIR folder (repeat)")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sides",
        default=None,
        help="comma-separated, of " + ", ".join(SIDES) + " (default: all; ours-bfloat16 only "
        "where the CPU does bfloat16 natively)",
    )
    parser.add_argument(
        "--st-onnx-python",
        default=sys.executable,
        help="the Python that runs sentence-transformers' ONNX side (default: this one), e.g. a "
        "venv with sentence-transformers and optimum, whose transformers pin ours cannot share",
    )
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(
            args.worker, args.texts, args.model, args.batch_size, args.max_length, args.out
        )
    data = args.data or [
        ROOT.parent / "shared/data/beir/scifact",
        ROOT.parent / "shared/data/classic/med",
    ]
    from routerretriever.devices import has_fast_bfloat16

    native = has_fast_bfloat16()
    print(f"bfloat16 native on this CPU: {native}")
    if args.sides is None:
        args.sides = ",".join(s for s in SIDES if native or s != "ours-bfloat16")
    for folder in data:
        with tempfile.TemporaryDirectory() as tmp:
            measure(args, folder, Path(tmp))


if __name__ == "__main__":
    main()
