"""Load on the HTTP service: p50/p99 latency and queries/s at 1, 8 and 32 concurrent clients,
with micro-batching and with one request at a time (``--max-batch-queries 0``), same run.

Starts ``routerretriever serve`` on loopback once per mode (micro-batching as by default, with a
5 ms window, and off), then in interleaved rounds sends one-query requests from N client threads
to each for a fixed time, and prints a markdown table (rounds pooled) and the micro-batching
speed-up. Client threads share the machine's cores with the servers; idle servers wait.
``--vs-offline``: one server, the load from ``--processes`` separate client processes, and the
server-side queries/s (its own ``/metrics``) against the same engine searched offline in the
same run (``serve_cli.open_engine``, batches of the top client level, measured around every
round), the share of time the model was busy (the server's ``routerretriever_batch_seconds``),
and the engine offline in batches of the size the server formed; prints a ``ratio`` line.

    python benchmarks/service_load.py --store runs/paper/experts --expert scifact --expert nfcorpus \
        --expert arguana --expert cranfield --expert cisi --expert med --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


HOSTILE = [  # (body, content type): each must get a 4xx and harm no one else
    ('{"queries": ["x \\ud800 lone surrogate"], "k": 3}', "application/json"),
    ('{"queries": ["ok"], "k": 1e400}', "application/json"),
    ('{"queries": ["ok"], "k": 100000000}', "application/json"),
    ('{"queries": [' + ",".join(["1"] * 400_000) + '], "k": 3}', "application/json"),  # 800 KB
    ("x" * 1_500_000, "application/json"),  # over the body cap
]


def run_load(
    url: str,
    queries: list[str],
    clients: int,
    seconds: float,
    k: int = 10,
    hostile_every: int = 0,
) -> dict:
    """``clients`` threads send one-query ``/search`` requests for ``seconds``; the stats of the
    valid requests answered within that time (errors: any non-200 answer to a valid request, or
    a failed one). With ``hostile_every = n``, every n-th request of each client is one of
    :data:`HOSTILE` instead; ``hostile_wrong`` counts those not answered 4xx."""
    import httpx

    latencies: list[float] = []
    errors, hostile, wrong = [0], [0], [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i, n = offset, 0
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop_at:
                n += 1
                if hostile_every and (n + offset) % hostile_every == 0:  # spread over clients
                    body, ctype = HOSTILE[(n // hostile_every + offset) % len(HOSTILE)]
                    try:
                        status = http.post(
                            url + "/search", content=body, headers={"content-type": ctype}
                        ).status_code
                    except httpx.HTTPError:
                        status = 0
                    with lock:
                        hostile[0] += 1
                        wrong[0] += not 400 <= status < 500
                    continue
                q = queries[i % len(queries)]
                i += clients
                start = time.perf_counter()
                try:
                    ok = http.post(url + "/search", json={"queries": [q], "k": k}).status_code
                    ok = ok == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                with lock:
                    if not ok:
                        errors[0] += 1
                    elif done <= stop_at:  # requests still running at the end do not count
                        latencies.append(done - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        **summarise(latencies, errors[0], seconds),
        "hostile": hostile[0],
        "hostile_wrong": wrong[0],
    }


def _load_process(job: tuple) -> dict:
    """One load-generator process: its share of the clients, from the agreed start time."""
    url, queries, clients, seconds, k, start_at = job
    time.sleep(max(0.0, start_at - time.time()))
    return run_load(url, queries, clients, seconds, k)


def run_load_processes(
    pool: Any, processes: int, url: str, queries: list[str], clients: int, seconds: float, k: int
) -> dict:
    """:func:`run_load` with the ``clients`` spread over ``processes`` worker processes of
    ``pool`` (a spawn pool): the load generator shares neither the server's interpreter nor
    this one's; all start together at an agreed time."""
    n = max(1, min(processes, clients))
    share = [clients // n + (p < clients % n) for p in range(n)]
    start_at = time.time() + 1.0
    jobs = [(url, queries[p::n], share[p], seconds, k, start_at) for p in range(n)]
    parts = pool.map(_load_process, jobs)
    return summarise(
        [x for r in parts for x in r["latencies"]], sum(r["errors"] for r in parts), seconds
    )


def server_counts(url: str) -> tuple[float, float, float, float]:
    """From the server's ``/metrics``: queries run by the model, the micro-batch histogram's
    sum and count (queries per batch), and the model's seconds on batches (busy time)."""
    import httpx

    routed = batch_sum = batch_count = busy = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("routerretriever_queries_routed_total"):
            routed += float(line.rsplit(" ", 1)[1])
        elif line.startswith("routerretriever_batch_queries_sum"):
            batch_sum = float(line.rsplit(" ", 1)[1])
        elif line.startswith("routerretriever_batch_queries_count"):
            batch_count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("routerretriever_batch_seconds_sum"):
            busy = float(line.rsplit(" ", 1)[1])
    return routed, batch_sum, batch_count, busy


def offline_worker(job: Path) -> None:
    """The offline peer: the engine ``serve`` builds (:func:`serve_cli.open_engine`, same
    arguments), searched directly in batches; prints its queries/s as JSON."""
    from routerretriever.cli import build_parser
    from routerretriever.serve_cli import open_engine

    spec = json.loads(job.read_text())
    engine = open_engine(build_parser().parse_args(["serve", *spec["serve"]]))
    queries, batch, k = spec["queries"], spec["batch"], spec["k"]
    engine.search(queries[:batch], k)  # warm-up
    done, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < spec["seconds"]:
        chunk = [queries[(i + j) % len(queries)] for j in range(batch)]
        engine.search(chunk, k)
        done, i = done + batch, i + batch
    print(json.dumps({"qps": done / (time.perf_counter() - start)}))


def offline_qps(serve: list[str], queries: list[str], seconds: float, batch: int, k: int) -> float:
    """Queries/s of :func:`offline_worker` in a fresh subprocess (the server idle meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        spec = {"serve": serve, "queries": queries, "seconds": seconds, "batch": batch, "k": k}
        job.write_text(json.dumps(spec))
        run = subprocess.run(
            [sys.executable, __file__, "--offline-worker", str(job)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    if run.returncode != 0:
        raise RuntimeError(f"offline peer failed: {run.stderr[-4000:]}")
    return float(json.loads(run.stdout.strip().splitlines()[-1])["qps"])


def summarise(latencies: list[float], errors: int, seconds: float) -> dict:
    """Requests, errors, queries/s and latency percentiles (ms) of one or several runs."""
    lat = sorted(latencies)
    pick = (lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: 0.0)
    return {
        "requests": len(lat),
        "errors": errors,
        "seconds": seconds,
        "qps": len(lat) / seconds,
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else 0.0,
        "latencies": latencies,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    serve_args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 900,
    log: IO[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``routerretriever serve SERVE_ARGS`` on a free loopback port, once ``/health`` answers;
    its output (the access log included) goes to ``log`` (a temporary file if None), shown if
    it fails to start."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "routerretriever.cli", "serve", "--port", str(port), *serve_args]
    log = log if log is not None else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in time")


def main() -> None:
    from routerretriever import load_queries

    if sys.argv[1:2] == ["--offline-worker"]:  # offline_qps's subprocess
        return offline_worker(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="expert store (copied)")
    parser.add_argument("--expert", action="append", help="expert folders to serve")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument(
        "--corpus", type=Path, default=None, help="documents (default: DATA/beir/scifact)"
    )
    parser.add_argument(
        "--domain",
        action="append",
        default=None,
        help="NAME=DIR[:SPLIT] (default: the six domains of experiments/paper.toml)",
    )
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="instead: one server, clean load against load with one request in ten hostile",
    )
    parser.add_argument(
        "--vs-offline",
        action="store_true",
        help="instead: one server under load from --processes client processes, its server-side "
        "queries/s against the same engine searched offline, same run",
    )
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="with --vs-offline or --hostile: an argument passed on to `routerretriever serve` "
        "(repeat), e.g. --serve-arg=--batch-window-ms --serve-arg=20",
    )
    args = parser.parse_args()
    d = args.data
    args.corpus = args.corpus or d / "beir/scifact"
    args.domain = args.domain or [
        f"scifact={d}/beir/scifact:train",
        f"nfcorpus={d}/beir/nfcorpus:train",
        f"arguana={d}/beir/arguana:corpus",
        f"cranfield={d}/classic/cranfield:corpus",
        f"cisi={d}/classic/cisi:corpus",
        f"med={d}/classic/med:corpus",
    ]
    sources = ["beir/scifact", "beir/nfcorpus", "classic/cranfield", "classic/cisi", "classic/med"]
    pools = [list(load_queries(d / s).values()) for s in sources]
    queries = [q for i in range(max(map(len, pools))) for p in pools if i < len(p) for q in [p[i]]]
    queries = [q for q in queries if len(q) <= 2000]  # the server's default limit (one CISI query)
    levels = [int(c) for c in args.clients.split(",")]

    if args.hostile:
        return hostile_run(args, queries, levels)
    if args.vs_offline:
        return vs_offline_run(args, queries, levels)
    modes = {
        "micro-batched": [],
        "micro-batched, 5 ms window": ["--batch-window-ms", "5"],
        "one at a time": ["--max-batch-queries", "0"],
    }
    runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in levels}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for mode, extra in modes.items():  # one server per mode, each with its own store
                store = Path(tmp) / f"store-{len(servers)}"
                shutil.copytree(args.store, store, ignore=shutil.ignore_patterns(".served.json"))
                serve = ["--store", str(store), "--corpus", str(args.corpus), *extra]
                serve += [x for d in args.domain for x in ("--domain", d)]
                serve += [x for e in args.expert or [] for x in ("--expert", e)]
                serve += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
                servers[mode] = start_server(serve, timeout=args.start_timeout)
            for _, url in servers.values():
                run_load(url, queries, 4, 3.0, args.k)  # warm-up
            # Interleaved rounds, so a slow spell of the machine hits every mode alike.
            for _ in range(args.rounds):
                for c in levels:
                    for mode, (_, url) in servers.items():
                        runs[(mode, c)].append(run_load(url, queries, c, args.seconds, args.k))
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    rows = {
        key: summarise(
            [x for r in rs for x in r["latencies"]],
            sum(r["errors"] for r in rs),
            sum(r["seconds"] for r in rs),
        )
        for key, rs in runs.items()
    }

    print(
        f"{len(args.expert or [])} experts; corpus {args.corpus.name}; one query per request, "
        f"k={args.k}; {args.rounds} interleaved rounds of {args.seconds:.0f} s per mode and "
        "level; routing precision auto"
    )
    print("| mode | clients | queries/s | p50 ms | p99 ms | requests | errors |")
    print("|---|---|---|---|---|---|---|")
    for (mode, c), r in rows.items():
        print(
            f"| {mode} | {c} | {r['qps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['requests']} | {r['errors']} |"
        )
    print()
    print("| clients | micro-batching speed-up (queries/s) | with a 5 ms window |")
    print("|---|---|---|")
    for c in levels:
        one = rows[("one at a time", c)]["qps"]
        print(
            f"| {c} | {rows[('micro-batched', c)]['qps'] / one:.2f} "
            f"| {rows[('micro-batched, 5 ms window', c)]['qps'] / one:.2f} |"
        )


def hostile_run(args: argparse.Namespace, queries: list[str], levels: list[int]) -> None:
    """Valid requests' throughput with one request in ten hostile, against the same load with
    none, on one server, in interleaved rounds."""
    runs: dict[tuple[str, int], list[dict]] = {
        (m, c): [] for m in ("clean", "hostile") for c in levels
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(args.store, store, ignore=shutil.ignore_patterns(".served.json"))
        serve = ["--store", str(store), "--corpus", str(args.corpus), *args.serve_arg]
        serve += [x for d in args.domain for x in ("--domain", d)]
        serve += [x for e in args.expert or [] for x in ("--expert", e)]
        serve += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
        proc, url = start_server(serve, timeout=args.start_timeout)
        try:
            run_load(url, queries, 4, 3.0, args.k)  # warm-up
            for _ in range(args.rounds):
                for c in levels:
                    for mode, every in (("clean", 0), ("hostile", 10)):
                        runs[(mode, c)].append(
                            run_load(url, queries, c, args.seconds, args.k, hostile_every=every)
                        )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print(
        f"{len(args.expert or [])} experts; corpus {args.corpus.name}; one query per request, "
        f"k={args.k}; {args.rounds} interleaved rounds of {args.seconds:.0f} s; hostile: one "
        "request in ten is a lone surrogate, k=1e400, k=10^8, 400k non-string queries or a "
        "1.5 MB body"
    )
    print(
        "| load | clients | valid queries/s | p50 ms | p99 ms | valid failed | hostile sent | hostile not 4xx |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (mode, c), rs in runs.items():
        r = summarise(
            [x for r in rs for x in r["latencies"]],
            sum(r["errors"] for r in rs),
            sum(r["seconds"] for r in rs),
        )
        print(
            f"| {mode} | {c} | {r['qps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['errors']} | {sum(x['hostile'] for x in rs)} | "
            f"{sum(x['hostile_wrong'] for x in rs)} |"
        )
    for c in levels:
        clean = sum(r["requests"] for r in runs[("clean", c)])
        hostile = sum(r["requests"] for r in runs[("hostile", c)])
        print(f"ratio valid throughput hostile/clean at {c} clients: {hostile / clean:.2f}")


def vs_offline_run(args: argparse.Namespace, queries: list[str], levels: list[int]) -> None:
    """Server-side queries/s at each client level (load from separate processes) against the
    offline queries/s of the same engine, measured before every round and after the last (the
    server idle meanwhile): each round's share is over the mean of the offline runs around it,
    and the table gives the median share, as this machine's speed drifts by minutes."""
    import multiprocessing

    rows: dict[int, list[tuple[dict, float, float]]] = {c: [] for c in levels}
    offline: list[float] = []
    batch = max(levels)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(args.store, store, ignore=shutil.ignore_patterns(".served.json"))
        serve = ["--store", str(store), "--corpus", str(args.corpus), *args.serve_arg]
        serve += [x for d in args.domain for x in ("--domain", d)]
        serve += [x for e in args.expert or [] for x in ("--expert", e)]
        serve += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
        proc, url = start_server(serve, timeout=args.start_timeout)
        try:
            with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
                run_load_processes(pool, args.processes, url, queries, 4, 3.0, args.k)  # warm-up
                for _ in range(args.rounds):
                    offline.append(offline_qps(serve, queries, args.seconds, batch, args.k))
                    for c in levels:
                        before = server_counts(url)
                        r = run_load_processes(
                            pool, args.processes, url, queries, c, args.seconds, args.k
                        )
                        after = server_counts(url)
                        batches = max(1.0, after[2] - before[2])
                        per_batch = (after[1] - before[1]) / batches
                        busy = (after[3] - before[3]) / r["seconds"]
                        rows[c].append((r, after[0] - before[0], per_batch, busy))
                offline.append(offline_qps(serve, queries, args.seconds, batch, args.k))
                # The same engine in batches the size the server formed at the top level.
                formed = max(1, round(statistics.fmean(b for _, _, b, _ in rows[max(levels)])))
                at_formed = offline_qps(serve, queries, args.seconds, formed, args.k)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print(
        f"{len(args.expert or [])} experts; corpus {args.corpus.name}; one query per request, "
        f"k={args.k}; load from {args.processes} client processes; {args.rounds} rounds of "
        f"{args.seconds:.0f} s per level; offline peer: the same engine (serve_cli.open_engine), "
        f"batches of {batch}: {', '.join(f'{q:.1f}' for q in offline)} queries/s around the rounds"
    )
    print(
        "| clients | server-side queries/s | client-side queries/s | of offline (median of "
        "rounds) | p50 ms | p99 ms | queries per model batch | model busy | requests | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    share: dict[int, float] = {}
    for c, rs in rows.items():
        r = summarise(
            [x for q, *_ in rs for x in q["latencies"]],
            sum(q["errors"] for q, *_ in rs),
            sum(q["seconds"] for q, *_ in rs),
        )
        served = sum(n for _, n, *_ in rs) / r["seconds"]
        share[c] = statistics.median(
            n / q["seconds"] / statistics.fmean(offline[i : i + 2])
            for i, (q, n, *_) in enumerate(rs)
        )
        per_batch = statistics.fmean(b for _, _, b, _ in rs)
        busy = statistics.fmean(u for *_, u in rs)
        print(
            f"| {c} | {served:.1f} | {r['qps']:.1f} | {share[c]:.0%} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {per_batch:.1f} | {busy:.0%} | {r['requests']} | {r['errors']} |"
        )
    top = max(levels)
    served_top = sum(n for _, n, *_ in rows[top]) / sum(q["seconds"] for q, *_ in rows[top])
    print(
        f"offline in batches of {formed} (what the server formed at {top} clients), measured "
        f"last: {at_formed:.1f} queries/s; the server at {top} clients is at "
        f"{served_top / at_formed:.0%} of it"
    )
    print(f"ratio {share[top]:.2f} (server-side queries/s at {top} clients over offline)")


if __name__ == "__main__":
    main()
