"""Thin HTTP routes: parse, delegate to Serving / health state, return. Nothing else here."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import Serving

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_router(serving: Serving, metrics: Metrics, api_key: str | None, started_at: float) -> APIRouter:
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Invalid or missing API key.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    health = APIRouter()
    engine = serving.engine
    admission = serving.admission

    @api.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @api.get("/models")
    async def models() -> ModelList:
        context = engine.loaded.max_model_len if engine.ready else 0
        return ModelList(data=[ModelCard(id=serving.model_name, created=int(started_at), max_model_len=context)])

    @health.get("/livez")
    async def livez() -> JSONResponse:
        alive = engine.alive()
        return JSONResponse({"status": "alive" if alive else "dead", "stage": engine.stage}, status_code=200 if alive else 503)

    @health.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = engine.ready and not admission.draining
        stage = "draining" if admission.draining else engine.stage
        body: dict[str, object] = {"status": "ready" if ready else "not ready", "stage": stage}
        if engine.error:
            body["error"] = engine.error
        return JSONResponse(body, status_code=200 if ready else 503)

    @health.get("/startupz")
    async def startupz() -> JSONResponse:
        started = engine.load_seconds is not None
        body = {"status": "started" if started else "starting", "stage": engine.stage, "uptime_seconds": round(time.time() - started_at, 3)}
        return JSONResponse(body, status_code=200 if started else 503)

    @health.get("/metrics")
    async def prometheus() -> Response:
        # Multiprocess mode reads files: keep that off the event loop.
        return Response(await asyncio.to_thread(metrics.exposition), media_type=PROMETHEUS_CONTENT_TYPE)

    router = APIRouter()
    router.include_router(api)
    router.include_router(health)
    return router
