"""The FastAPI application: `create_app(settings, engine, registry)` wires the parts together.

Nothing here is module-global: each call builds its own metrics, admission and engine, so tests
can run several apps in one process and uvicorn workers each build their own (`app_from_env`).
The lifespan starts the engine (a child process, or a thread with `--no-engine-process`), which
loads the model in the background - the server answers health checks (503 with the loading stage)
while that happens - and stops it on exit.

When the engine fails for good (its model does not load, its process dies, its device is poisoned),
the reason goes to `--termination-log` and `on_fatal` is told: `main` then ends the server with a
non-zero exit, so a pod restarts instead of answering 503 until a probe gives up on it.

With more than one worker, a worker's lifespan startup waits for its model instead: uvicorn starts
accepting on the shared socket only after startup, so a loading worker takes no connection while
its siblings serve, and no request (nor readiness probe) meets a worker that cannot answer it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import Admission
from .backend import Backend
from .bodylimit import BodyLimit
from .drain import Drainer
from .engine_process import EngineProcess
from .errors import install_error_handlers
from .logs import configure_logging, request_id_var
from .metrics import Metrics, multiprocess_dir
from .openapi import DocumentedApp
from .placement import Placement
from .routes import build_router
from .serving import Serving
from .settings import BUNDLED, Settings
from .source import resolve_source
from .termination import write_termination_log

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_QUIET_PATHS = {"/livez", "/readyz", "/startupz", "/metrics"}


def served_model_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model == BUNDLED:
        return "SmolLM2-135M-Instruct"
    return resolve_source(settings).name


class RequestContext:
    """Pure ASGI middleware: request id in, request id out, one access log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            log.log(
                level,
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={"status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 1)},
            )
            request_id_var.reset(token)


async def _until_loaded(engine: Backend, drainer: Drainer, fatal: Callable[[str], None]) -> None:
    """Wait for the model (or a SIGTERM, which ends startup so uvicorn can exit); a failed load raises."""
    loaded = asyncio.ensure_future(asyncio.to_thread(engine.wait_settled))
    stopping = asyncio.ensure_future(drainer.requested.wait())
    try:
        await asyncio.wait({loaded, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not loaded.done():
        log.info("SIGTERM while loading the model: not serving")
        engine.stop(timeout=0)  # let the waiting thread go; do not wait for the load
        return
    if not engine.ready:
        # The worker exits as a startup failure and uvicorn stops the whole server: a pod that
        # crashes with the reason in its log, instead of one that answers 503 forever.
        reason = _failure(engine)
        fatal(reason)
        await asyncio.to_thread(engine.stop)  # an engine process left behind would hold the worker's exit
        raise RuntimeError(reason)


def _failure(engine: Backend) -> str:
    if engine.load_seconds is None:
        return f"model failed to load: {engine.error}"
    return f"the engine failed: {engine.error}"


async def _watch(engine: Backend, fatal: Callable[[str], None]) -> None:
    """Report the engine's failure (a failed load, a dead engine process, a poisoned device) once it happens."""
    await asyncio.to_thread(engine.wait_ended)
    if engine.stage == "failed":
        fatal(_failure(engine))


def _read_api_key(path: Path | None) -> str | None:
    if path is None:
        return None
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"API key file {path} is empty")
    return key


def create_app(
    settings: Settings,
    engine: Backend | None = None,
    registry: CollectorRegistry | None = None,
    placement: Placement | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The server's app; `placement`: where the server's two processes may run (`main` passes it);
    `on_fatal(reason)`: told once the engine has failed for good, after the reason is in the termination log
    (`main` ends the process with a non-zero exit; without it the server answers 503 on /livez)."""
    model_name = served_model_name(settings)
    metrics = Metrics(registry if registry is not None else CollectorRegistry(), model_name)
    if engine is None and settings.engine_process:
        engine = EngineProcess(settings, model_name, placement)  # this process never imports torch
    elif engine is None:
        from .engine import Engine  # noqa: PLC0415  # torch: only where the model runs

        engine = Engine(settings, metrics)
    admission = Admission(settings.max_num_seqs, settings.max_queue)
    serving = Serving(settings, engine, admission, metrics, model_name)
    drainer = Drainer(admission, serving.idle, settings.drain_seconds, engine.abort_all)
    api_key = _read_api_key(settings.api_key_file)

    def fatal(reason: str) -> None:
        log.error("Fatal: %s", reason)
        write_termination_log(settings.termination_log, reason)
        if on_fatal is not None:
            on_fatal(reason)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drainer.install()
        if not engine.alive():
            engine.start()  # loads the model on the engine thread; readiness follows its stage
        if settings.workers > 1:
            await _until_loaded(engine, drainer, fatal)
        watcher = asyncio.ensure_future(_watch(engine, fatal))
        log.info("Server started", extra={"model": model_name})
        try:
            yield
        finally:
            drainer.uninstall()
            watcher.cancel()
            await asyncio.to_thread(engine.stop)  # joins the engine: not on the event loop
            if multiprocess_dir() is not None:
                # Drop this worker's live gauges (untyped in prometheus-client).
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
            log.info("Server stopped")

    app = DocumentedApp(title="LLMService inference server", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(build_router(serving, metrics, api_key, time.time()))
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_request_mib * 2**20))
    app.add_middleware(RequestContext)  # outermost: a refused body is logged with its request id too
    app.state.serving = serving
    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers (`--workers` > 1): settings come from LLMSERVICE_* env."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
