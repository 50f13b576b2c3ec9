"""`llmservice-server`: parse settings from flags and env, then run uvicorn.

One worker: the app is built here and served in this process. More workers: uvicorn's process
supervisor starts each worker with the `app_from_env` factory; the settings travel as
LLMSERVICE_* env vars. Whenever more than one process serves (workers, or the engine's own child
process), Prometheus multiprocess mode gets a fresh directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from types import FrameType

import uvicorn
from uvicorn.supervisors import Multiprocess

from .connections import ConnectionLimits, GuardedConfig
from .logs import configure_logging
from .placement import available_cores, plan_placement
from .settings import Settings, parse_settings

# After the drain, uvicorn's remaining connections get this long before they are closed.
GRACEFUL_SHUTDOWN_SECONDS = 5
# An idle keep-alive connection is closed after this long (uvicorn's default, stated here because
# docs/limits.md tells proxies in front of the server to keep their own idle timeout below it).
KEEP_ALIVE_SECONDS = 5


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
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(settings: Settings) -> None:
    from .app import create_app  # noqa: PLC0415  # torch/transformers: only where a model is served

    # The engine process decides once its model is loaded; then this process moves to its core.
    placement = plan_placement(settings, available_cores())
    config = _config(settings, create_app(settings, placement=placement))
    signal.signal(signal.SIGTERM, _after_shutdown)
    uvicorn.Server(config).run()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_settings(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
