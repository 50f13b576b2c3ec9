"""Thin HTTP routes: parse, delegate to Serving / health state, return. Nothing else here."""

from __future__ import annotations

import asyncio
import hmac
import time
from importlib.metadata import PackageNotFoundError, version

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
    Detokenized,
    DetokenizeRequest,
    Health,
    ModelCard,
    ModelList,
    TokenizeChat,
    TokenizeCompletion,
    Tokenized,
    Version,
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
    tokens = APIRouter(dependencies=[Depends(authorize)])  # vLLM's paths, outside /v1
    engine = serving.engine

    @api.post("/chat/completions", responses=generation(ChatCompletion, ChatStreamEvent))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @api.post("/completions", responses=generation(Completion, CompletionStreamEvent))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    def card() -> ModelCard:
        context = engine.loaded.max_model_len if engine.ready else 0
        return ModelCard(id=serving.model_name, created=int(started_at), max_model_len=context)

    @api.get("/models", responses=errors(401))
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @api.get("/models/{model_id:path}", responses=errors(401, 404))
    async def model(model_id: str) -> ModelCard:
        if model_id != serving.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return card()

    @tokens.post("/tokenize", responses=errors(400, 401, 404, 503))
    async def tokenize(body: TokenizeCompletion | TokenizeChat) -> Tokenized:
        return await serving.tokenize(body)

    @tokens.post("/detokenize", responses=errors(400, 401, 404, 503))
    async def detokenize(body: DetokenizeRequest) -> Detokenized:
        return await serving.detokenize(body)

    router = APIRouter()
    router.include_router(api)
    router.include_router(tokens)
    router.include_router(health_router(serving, metrics, started_at))
    return router


def health_router(serving: Serving, metrics: Metrics, started_at: float) -> APIRouter:
    """The probes, the version and /metrics: no API key, answered while loading and draining."""
    health = APIRouter()
    engine = serving.engine
    admission = serving.admission
    fetch_layout = hub_layout(serving.settings)  # where a download reports progress
    try:
        package_version = version("llmservice")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package_version = "0.0.0+unknown"

    @health.get(
        "/health", response_class=Response, responses={200: {"description": "Serving: the model is loaded (empty body)."}, **errors(503)}
    )
    async def health_check() -> Response:
        # vLLM's health check: an empty 200 once serving, 503 before (and while draining).
        if not engine.ready or admission.draining:
            raise APIError(503, f"not ready: {'draining' if admission.draining else engine.stage}", code="not_ready")
        return Response(status_code=200)

    @health.get("/version")
    async def server_version() -> Version:
        return Version(version=package_version)

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
        health_ = Health(
            status="started" if started else "starting",
            stage=engine.stage,
            uptime_seconds=uptime,
            stages=engine.stages.seconds(),
            progress=progress,
        )
        return probe(health_, started)

    @health.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        # Multiprocess mode reads files: keep that off the event loop.
        return Response(await asyncio.to_thread(metrics.exposition), media_type=PROMETHEUS_CONTENT_TYPE)

    return health
