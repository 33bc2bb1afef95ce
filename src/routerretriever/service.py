"""The HTTP service: a thin FastAPI shell over :class:`routerretriever.serving.Engine`.

``routerretriever serve`` runs it with uvicorn; ``/docs`` and ``/openapi.json`` describe it.
Searches from concurrent requests are merged by a :class:`MicroBatcher`; expert changes run in a
worker thread while searches go on with the current library until the new one is swapped in.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr
from starlette.requests import Request  # at module level: FastAPI resolves annotations here

from routerretriever.batching import Limits, MicroBatcher, RequestError
from routerretriever.metrics import Metrics, endpoint_of
from routerretriever.serving import Engine


class SearchRequest(BaseModel):
    # Items are checked by Limits.check, count first: validating each item of a huge list here
    # would cost seconds of the event loop before the count could refuse it.
    queries: list[Any] = Field(
        description="the query texts (the server sets a maximum count and length)",
        json_schema_extra={"items": {"type": "string"}},
    )
    k: StrictInt = Field(10, description="hits per query (the server sets a maximum)")


class Hit(BaseModel):
    id: str
    score: float


class QueryResult(BaseModel):
    hits: list[Hit]
    expert: str = Field(description="the expert the query was routed to")
    routing_scores: dict[str, float] = Field(description="every expert's routing score")
    members: dict[str, float] = Field(
        default_factory=dict, description="weights of the dense members mixed for this query"
    )
    lexical_weight: float = Field(0.0, description="BM25's weight in the fused ranking")


class SearchResponse(BaseModel):
    results: list[QueryResult]


class AddExpert(BaseModel):
    path: StrictStr = Field(description="the expert's folder, relative to the store")
    name: StrictStr | None = Field(None, description="serve it under this name (default: its own)")


class EmbeddingsRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body, plus ``input_type`` (text-embeddings-inference and
    Infinity have the same idea): documents always get the base model."""

    input: StrictStr | list[Any] = Field(
        description="a text or a list of texts", json_schema_extra={"items": {"type": "string"}}
    )
    model: StrictStr = Field("auto", description="'auto' (routed), 'base', or an expert's name")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64': little-endian float32 bytes, base64-encoded"
    )
    input_type: Literal["query", "document"] = Field(
        "query", description="queries are routed; documents always get the base model"
    )
    dimensions: StrictInt | None = Field(None, description="must equal the model's, if given")
    user: StrictStr | None = None


MAX_BODY_BYTES = 1 << 20  # default cap on a request body, checked before it is parsed
MAX_ERRORS = 5  # validation errors listed in a 422 answer at most


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is parsed.

    The body is read here first (at most ``max_bytes`` of it, so memory stays bounded, and a
    Content-Length over the cap is refused without reading anything), then handed on whole.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"request body too large: over {self.max_bytes} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Measure:
    """ASGI middleware: each HTTP request's latency and status into the service's metrics.
    Plain ASGI, not ``@app.middleware("http")``: that wrapper streams every response through
    extra tasks and queues, and its event-loop time slowed the model thread under load."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:  # the router has put the matched route in this same scope
            self.metrics.observe_request(
                endpoint_of(scope), scope["method"], status, time.perf_counter() - start
            )


def create_app(
    engine: Engine,
    *,
    limits: Limits | None = None,
    batch_window_ms: float = 0.0,
    max_batch_queries: int = 256,
    api_key: str | None = None,
    admin: bool = True,
    max_body_bytes: int = MAX_BODY_BYTES,
    model_workers: int = 1,
) -> Any:
    """The FastAPI application serving ``engine`` (``max_batch_queries=0``: no micro-batching).

    ``model_workers`` batches run at once, each in its own thread; give each a share of the
    cores (``torch.set_num_threads``), as ``routerretriever serve --model-workers`` does.

    With ``api_key``, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``
    (compared in constant time). ``admin=False`` turns off adding and removing experts.
    """
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    from routerretriever import __version__

    limits = limits or Limits()
    batcher = MicroBatcher(
        engine.search,
        window_s=batch_window_ms / 1000,
        max_queries=max_batch_queries,
        workers=model_workers,
    )
    metrics = Metrics(batcher.pending)
    batcher.on_batch = metrics.observe_batch

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(
        title="routerretriever",
        version=__version__,
        description="Routed mixture-of-expert dense retrieval over one shared index.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Measure, metrics=metrics)  # outermost: it times the body limit too

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Where the body is wrong and why, never the input itself (it may be huge)."""
        errors = exc.errors()
        detail = [
            {
                "loc": list(e.get("loc", ()))[:6],
                "msg": str(e.get("msg", ""))[:200],
                "type": e.get("type"),
            }
            for e in errors[:MAX_ERRORS]
        ]
        if len(errors) > MAX_ERRORS:
            detail.append(
                {"loc": [], "msg": f"... and {len(errors) - MAX_ERRORS} more", "type": "more"}
            )
        return JSONResponse({"detail": detail}, status_code=422)

    expected = None if api_key is None else f"Bearer {api_key}".encode()

    # async: a plain def would cost every request a hop to a worker thread
    async def authorised(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"}
            )

    async def administrable(request: Request) -> None:
        await authorised(request)
        if not admin:
            raise HTTPException(
                403,
                "adding and removing experts is off: serve with --api-key, or "
                "--allow-unauthenticated-admin on a trusted network",
            )

    def refuse(e: RequestError) -> HTTPException:
        return HTTPException(status_code=e.status, detail=str(e))

    # response_model documents the answer (OpenAPI, schemathesis); the answer itself is
    # serialised here, built from plain types: validating our own output costs every request.
    @app.post("/search", response_model=SearchResponse, dependencies=[Depends(authorised)])
    async def search(req: SearchRequest) -> Response:
        """Top-k hits per query, with the chosen expert and every expert's routing score."""
        try:
            limits.check(req.queries, req.k)
        except RequestError as e:
            raise refuse(e) from None
        results = await asyncio.wrap_future(batcher.submit(req.queries, req.k))
        for r in results:
            metrics.routed.labels(r.expert).inc()
        body = {
            "results": [
                {
                    "hits": [{"id": d, "score": float(s)} for d, s in r.hits],
                    "expert": r.expert,
                    "routing_scores": {e: float(v) for e, v in r.scores.items()},
                    "members": {m: float(w) for m, w in r.members.items()},
                    "lexical_weight": float(r.lexical_weight),
                }
                for r in results
            ]
        }
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return Response(text, media_type="application/json")

    @app.get("/experts", dependencies=[Depends(authorised)])
    def list_experts() -> dict[str, Any]:
        """The served experts and their share of the pilot library."""
        return {"experts": engine.describe(), "rule": engine.rule}

    @app.post("/experts", status_code=201, dependencies=[Depends(administrable)])
    async def add_expert(req: AddExpert) -> dict[str, Any]:
        """Serve a trained expert from the store: live, no restart, no training."""
        try:
            with metrics.expert_change("add"):
                return await run_in_threadpool(engine.add_expert, req.path, req.name)
        except RequestError as e:
            raise refuse(e) from None

    @app.delete("/experts/{name}", dependencies=[Depends(administrable)])
    async def remove_expert(name: str) -> dict[str, Any]:
        """Stop serving an expert; the pilot library is regrouped without it."""
        try:
            with metrics.expert_change("remove"):
                await run_in_threadpool(engine.remove_expert, name)
        except RequestError as e:
            raise refuse(e) from None
        return {"removed": name, "experts": engine.experts}

    @app.post("/v1/embeddings", dependencies=[Depends(authorised)], response_model=None)
    async def embeddings(req: EmbeddingsRequest) -> Any:
        """OpenAI-compatible embeddings; ``routing`` (per input, for routed queries) says which
        members were mixed and why."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        try:
            limits.check(texts, 1)
            if req.dimensions is not None and req.dimensions != engine.encoder.dim:
                raise RequestError(
                    f"dimensions must be {engine.encoder.dim} (the model's), got {req.dimensions}"
                )
            emb, decisions, tokens = await run_in_threadpool(
                engine.embed, texts, req.model, req.input_type
            )
        except RequestError as e:  # in OpenAI's error shape, which its clients read
            error = {"message": str(e), "type": "invalid_request_error", "code": e.status}
            return JSONResponse({"error": error}, status_code=e.status)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else row.tolist(),
            }
            for i, row in enumerate(emb)
        ]
        return {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "routing": [
                None
                if d is None
                else {"expert": d.expert, "members": d.members, "scores": d.scores}
                for d in decisions
            ],
        }

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    def models() -> dict[str, Any]:
        """The models ``/v1/embeddings`` takes: ``auto`` (routed), ``base``, each served expert."""
        names = ["auto", "base", *engine.experts]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "routerretriever"}
                for n in names
            ],
        }

    @app.get("/metrics", dependencies=[Depends(authorised)], response_class=Response)
    def scrape() -> Any:
        """Prometheus text format: requests and latency per endpoint and status, queries routed
        per expert, batch sizes and the model's seconds per batch, queue depth, expert adds and
        removes with their durations."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "process": os.getpid(),  # which replica answered, behind a proxy
            "experts": engine.experts,
            "documents": len(engine.index),
            "batches": batcher.batches,
        }

    return app


HEADER_TIMEOUT_S = 5.0  # a connection that has not sent a whole request head by then is closed


def guarded_http_protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's HTTP protocol (httptools' C parser where installed, else h11), closing
    connections that send no complete request head within ``header_timeout`` seconds (uvicorn
    itself times out only idle keep-alive connections, so half-sent headers would hold a
    connection, and a file descriptor, forever)."""
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is an optional speed-up of uvicorn's
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class GuardedProtocol(base):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout, self._head_overdue)

        def _head_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()  # still no request: a slow or stalled client

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedProtocol
