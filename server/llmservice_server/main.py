"""`llmservice-server`: parse settings from flags and env, then run uvicorn.

One worker: the app is built here and served in this process. More workers: uvicorn's process
supervisor starts each worker with the `app_from_env` factory; the settings travel as
LLMSERVICE_* env vars. Whenever more than one process serves (workers, or the engine's own child
process), Prometheus multiprocess mode gets a fresh directory.

The exit status says whether the server gave up: 1 when the model failed to load or the engine
failed (the reason is in `--termination-log`), 0 after a drain.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from .connections import ConnectionLimits, GuardedConfig
from .logs import configure_logging
from .placement import available_cores, plan_placement
from .settings import Settings, parse_settings
from .source import resolve_source
from .termination import write_termination_log

log = logging.getLogger(__name__)

# After the drain, uvicorn's remaining connections get this long before they are closed.
GRACEFUL_SHUTDOWN_SECONDS = 5
# An idle keep-alive connection is closed after this long (uvicorn's default, stated here because
# docs/limits.md tells proxies in front of the server to keep their own idle timeout below it).
KEEP_ALIVE_SECONDS = 5
FATAL_EXIT = 1  # the model failed to load or the engine failed: the reason is in the termination log


def _after_shutdown(sig: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with this handler in place
    # that ends `main()` normally, so a drained server exits 0 instead of dying by the signal.
    return None


def _config(settings: Settings, app: object) -> uvicorn.Config:
    # Each worker counts its own connections; the kernel spreads new ones about evenly.
    per_worker = -(-settings.max_connections // settings.workers)
    return GuardedConfig(
        app,
        limits=ConnectionLimits(read_timeout=settings.request_read_timeout_seconds, max_connections=per_worker),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        factory=isinstance(app, str),
        log_config=None,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def run(settings: Settings) -> None:
    configure_logging(settings.log_level)
    try:
        resolve_source(settings)  # a model path that is not there fails now, before any process imports torch
    except (OSError, RuntimeError) as exc:
        _fail(settings, f"model failed to load: {type(exc).__name__}: {exc}")
    if settings.workers == 1 and not settings.engine_process:
        _serve(settings)
        return
    # Several processes write metrics: prometheus-client reads this variable when it is first
    # imported, which is below (and in every process started from here), never before.
    metrics_dir = tempfile.mkdtemp(prefix="llmservice-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        if settings.workers == 1:
            _serve(settings)
            return
        os.environ.update(settings.to_env())
        config = _config(settings, "llmservice_server.app:app_from_env")
        # SIGTERM: the supervisor passes it to every worker (each drains) and joins them.
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        # A worker whose model failed to load (it wrote the reason to the termination log) exits as a
        # startup failure and the supervisor stops the rest; the server's exit says so too.
        if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
            sys.exit(FATAL_EXIT)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _fail(settings: Settings, reason: str) -> NoReturn:
    log.error("Fatal: %s", reason)
    write_termination_log(settings.termination_log, reason)
    sys.exit(FATAL_EXIT)


def _serve(settings: Settings) -> None:
    from .app import create_app  # noqa: PLC0415  # torch/transformers: only where a model is served

    # The engine process decides once its model is loaded; then this process moves to its core.
    placement = plan_placement(settings, available_cores())
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        # The model failed to load or the engine died: exit (non-zero, below) so the kubelet restarts
        # the container now, instead of a pod that answers 503 until a probe gives up on it.
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    config = _config(settings, create_app(settings, placement=placement, on_fatal=on_fatal))
    signal.signal(signal.SIGTERM, _after_shutdown)
    server = uvicorn.Server(config)
    server.run()
    if fatal:
        sys.exit(FATAL_EXIT)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_settings(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
