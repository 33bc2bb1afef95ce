"""The HTTP service: a thin FastAPI shell over :class:`routerretriever.serving.Engine`.

``routerretriever serve`` runs it with uvicorn; ``/docs`` and ``/openapi.json`` describe it.
Searches from concurrent requests are merged by a :class:`MicroBatcher`; expert changes run in a
worker thread while searches go on with the current library until the new one is swapped in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, Field

from routerretriever.serving import Engine, Limits, MicroBatcher, RequestError


class SearchRequest(BaseModel):
    queries: list[str] = Field(
        description="the query texts (the server sets a maximum count and length)"
    )
    k: int = Field(10, description="hits per query (the server sets a maximum)")


class Hit(BaseModel):
    id: str
    score: float


class QueryResult(BaseModel):
    hits: list[Hit]
    expert: str = Field(description="the expert the query was routed to")
    routing_scores: dict[str, float] = Field(description="every expert's routing score")


class SearchResponse(BaseModel):
    results: list[QueryResult]


class AddExpert(BaseModel):
    path: str = Field(description="the expert's folder, relative to the store")
    name: str | None = Field(None, description="serve it under this name (default: its own)")


def create_app(
    engine: Engine,
    *,
    limits: Limits | None = None,
    batch_window_ms: float = 0.0,
    max_batch_queries: int = 256,
) -> Any:
    """The FastAPI application serving ``engine`` (``max_batch_queries=0``: no micro-batching)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.concurrency import run_in_threadpool

    from routerretriever import __version__

    limits = limits or Limits()
    batcher = MicroBatcher(
        engine.search, window_s=batch_window_ms / 1000, max_queries=max_batch_queries
    )

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

    def refuse(e: RequestError) -> HTTPException:
        return HTTPException(status_code=e.status, detail=str(e))

    @app.post("/search", response_model=SearchResponse)
    async def search(req: SearchRequest) -> dict[str, Any]:
        """Top-k hits per query, with the chosen expert and every expert's routing score."""
        try:
            limits.check(req.queries, req.k)
        except RequestError as e:
            raise refuse(e) from None
        results = await asyncio.wrap_future(batcher.submit(req.queries, req.k))
        return {
            "results": [
                {
                    "hits": [{"id": d, "score": s} for d, s in r.hits],
                    "expert": r.expert,
                    "routing_scores": r.scores,
                }
                for r in results
            ]
        }

    @app.get("/experts")
    def list_experts() -> dict[str, Any]:
        """The served experts and their share of the pilot library."""
        return {"experts": engine.describe(), "rule": engine.rule}

    @app.post("/experts", status_code=201)
    async def add_expert(req: AddExpert) -> dict[str, Any]:
        """Serve a trained expert from the store: live, no restart, no training."""
        try:
            return await run_in_threadpool(engine.add_expert, req.path, req.name)
        except RequestError as e:
            raise refuse(e) from None

    @app.delete("/experts/{name}")
    async def remove_expert(name: str) -> dict[str, Any]:
        """Stop serving an expert; the pilot library is regrouped without it."""
        try:
            await run_in_threadpool(engine.remove_expert, name)
        except RequestError as e:
            raise refuse(e) from None
        return {"removed": name, "experts": engine.experts}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "experts": engine.experts,
            "documents": len(engine.index),
            "batches": batcher.batches,
        }

    return app
