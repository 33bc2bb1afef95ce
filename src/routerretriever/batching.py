"""Request limits and micro-batching: concurrent searches merged into one routed batch.

:class:`MicroBatcher` runs a search function on a worker thread; the requests that queue while
one batch runs form the next, so batches grow with load and a lone request waits for nothing. A
batch that fails is rerun request by request, so only the request the model cannot take fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from routerretriever.errors import RouterRetrieverError
from routerretriever.index import Hits


@dataclass
class SearchResult:
    """One query's hits, best first, and why it went where it went."""

    hits: Hits
    expert: str
    scores: dict[str, float] = field(default_factory=dict)
    members: dict[str, float] = field(default_factory=dict)
    lexical_weight: float = 0.0


logger = logging.getLogger(__name__)


class RequestError(RouterRetrieverError):
    """A request the engine refuses; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Per-request limits; requests beyond them are refused with a clear message."""

    max_queries: int = 64
    max_query_chars: int = 2000
    max_k: int = 100

    def check(self, queries: Sequence[str], k: int) -> None:
        if not queries:
            raise RequestError("queries must hold at least one query")
        if len(queries) > self.max_queries:
            raise RequestError(
                f"too many queries: {len(queries)} > {self.max_queries} per request", 413
            )
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise RequestError(f"queries[{i}] must be a string, got {type(q).__name__}", 422)
            if not q.strip():
                raise RequestError(f"queries[{i}] is empty")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    f"queries[{i}] is not valid text: it holds a lone surrogate"
                ) from None
            if len(q) > self.max_query_chars:
                raise RequestError(
                    f"queries[{i}] is too long: {len(q)} > {self.max_query_chars} characters", 413
                )
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k must be between 1 and {self.max_k}, got {k}")


class MicroBatcher:
    """Merges concurrent ``submit`` calls into one :meth:`Engine.search`.

    When the model frees up, every request queued meanwhile joins the next batch (up to
    ``max_queries`` queries), so batches grow with load and a lone request waits for nothing.
    ``window_s > 0`` also holds a batch's first request that long for others to arrive;
    ``max_queries=0`` runs each request alone. ``workers`` threads each take the next batch,
    so that many batches run at once (``search`` must then be thread-safe).
    """

    def __init__(
        self,
        search: Callable[[Sequence[str], int], list[SearchResult]],
        *,
        window_s: float = 0.0,
        max_queries: int = 256,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._search = search
        self.window_s = window_s
        self.max_queries = max_queries
        self._queue: queue.Queue[tuple[list[str], int, Future] | None] = queue.Queue()
        self._count = threading.Lock()
        self.batches = 0  # batches run so far (for tests and metrics)
        self._threads = [
            threading.Thread(target=self._run, name=f"micro-batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()
        #: told each batch's query count and the seconds the model spent on it
        self.on_batch: Callable[[int, float], None] | None = None

    def pending(self) -> int:
        """Requests waiting for the model."""
        return self._queue.qsize()

    def submit(self, queries: Sequence[str], k: int) -> Future:
        """A future of the queries' :class:`SearchResult` list."""
        fut: Future = Future()
        self._queue.put((list(queries), k, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)  # each worker passes it on as it stops
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)
                return
            batch = [item]
            size = len(item[0])
            deadline = time.perf_counter() + self.window_s
            while self.max_queries and size < self.max_queries:
                left = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                size += len(nxt[0])
            self._serve(batch)

    def _serve(self, batch: list[tuple[list[str], int, Future]]) -> None:
        with self._count:
            self.batches += 1
        texts = [q for queries, _, _ in batch for q in queries]
        start = time.perf_counter()
        try:
            results = self._search(texts, max(k for _, k, _ in batch))
        except Exception as e:
            self._observe(len(texts), start)
            if len(batch) == 1:
                batch[0][2].set_exception(e)
                return
            # One request's failure must not fail the others: run each alone, so only the
            # request at fault fails.
            logger.warning("a batch of %d requests failed (%s); retrying each alone", len(batch), e)
            for item in batch:
                self._serve([item])
            return
        self._observe(len(texts), start)  # before any answer: a client then reads it counted
        first = 0
        for queries, k, fut in batch:
            part = results[first : first + len(queries)]
            first += len(queries)
            fut.set_result([replace(r, hits=r.hits[:k]) for r in part])

    def _observe(self, queries: int, start: float) -> None:
        if self.on_batch is not None:
            self.on_batch(queries, time.perf_counter() - start)
