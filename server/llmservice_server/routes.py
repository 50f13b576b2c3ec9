"""Thin HTTP routes: parse, delegate to Serving / health state, return. Nothing else here."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .errors import APIError
from .metrics import Metrics
from .model_cache import read_progress
from .openapi import Responses, errors, generation
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatStreamEvent,
    Completion,
    CompletionRequest,
    CompletionStreamEvent,
    Health,
    ModelCard,
    ModelList,
)
from .serving import Serving
from .source import hub_layout

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROBE: Responses = {200: {"model": Health, "description": "The probe passes."}, 503: {"model": Health, "description": "The probe fails."}}


def probe(health: Health, passed: bool) -> JSONResponse:
    return JSONResponse(health.model_dump(exclude_none=True), status_code=200 if passed else 503)


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
    fetch_layout = hub_layout(serving.settings)  # where a download reports progress

    @api.post("/chat/completions", responses=generation(ChatCompletion, ChatStreamEvent))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @api.post("/completions", responses=generation(Completion, CompletionStreamEvent))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @api.get("/models", responses=errors(401))
    async def models() -> ModelList:
        context = engine.loaded.max_model_len if engine.ready else 0
        return ModelList(data=[ModelCard(id=serving.model_name, created=int(started_at), max_model_len=context)])

    @health.get("/livez", responses=PROBE)
    async def livez() -> JSONResponse:
        alive = engine.alive()
        return probe(Health(status="alive" if alive else "dead", stage=engine.stage), alive)

    @health.get("/readyz", responses=PROBE)
    async def readyz() -> JSONResponse:
        ready = engine.ready and not admission.draining
        stage = "draining" if admission.draining else engine.stage
        return probe(Health(status="ready" if ready else "not ready", stage=stage, error=engine.error or None), ready)

    @health.get("/startupz", responses=PROBE)
    async def startupz() -> JSONResponse:
        started = engine.load_seconds is not None
        uptime = round(time.time() - started_at, 3)
        progress = None
        if engine.stage == "fetching" and fetch_layout is not None:
            progress = await asyncio.to_thread(read_progress, fetch_layout.progress)
        health_ = Health(status="started" if started else "starting", stage=engine.stage, uptime_seconds=uptime,
                         stages=engine.stages.seconds(), progress=progress)
        return probe(health_, started)

    @health.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        # Multiprocess mode reads files: keep that off the event loop.
        return Response(await asyncio.to_thread(metrics.exposition), media_type=PROMETHEUS_CONTENT_TYPE)

    router = APIRouter()
    router.include_router(api)
    router.include_router(health)
    return router
