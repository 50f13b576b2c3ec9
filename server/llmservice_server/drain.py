"""Graceful drain on SIGTERM: stop admitting, let in-flight requests finish, then let uvicorn exit.

uvicorn's own SIGTERM handling closes the listening socket and then waits for connections, so a
client would see refused connections instead of a 503, and a long stream could be cut off. Here
the first SIGTERM only flips the server to draining (readiness false, new requests 503); once no
request is in flight, or `drain_seconds` have passed (then the remaining ones are failed with one
error event and `[DONE]`), the signal is handed to the handler that was installed before ours -
uvicorn's - which shuts the server down. A second SIGTERM skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from .admission import Admission

log = logging.getLogger(__name__)

_GRACE_AFTER_ABORT = 5.0  # seconds for aborted streams to write their last event


class Drainer:
    def __init__(self, admission: Admission, idle: asyncio.Event, drain_seconds: float, abort: Callable[[str], None]) -> None:
        self._admission = admission
        self._idle = idle
        self._drain_seconds = drain_seconds
        self._abort = abort
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._handed_over = False
        self.requested = asyncio.Event()  # set by the first SIGTERM

    def install(self) -> None:
        """Take over SIGTERM (main thread only; elsewhere, e.g. in tests, do nothing)."""
        self._loop = asyncio.get_running_loop()
        try:
            previous = signal.getsignal(signal.SIGTERM)
            self._loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (RuntimeError, ValueError, NotImplementedError):
            self._loop = None
            return
        self._previous = previous

    def uninstall(self) -> None:
        if self._loop is None:
            return
        self._loop.remove_signal_handler(signal.SIGTERM)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        self._loop = None

    def _on_sigterm(self) -> None:
        if self._admission.draining:
            log.warning("Second SIGTERM: shutting down without waiting")
            self._hand_over()
            return
        log.info("SIGTERM: draining", extra={"in_flight": self._admission.requests, "drain_seconds": self._drain_seconds})
        self._admission.start_draining()
        self.requested.set()
        assert self._loop is not None
        self._task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self._drain_seconds)
            log.info("Drained: no request in flight")
        except TimeoutError:
            log.warning("Drain deadline passed: failing in-flight requests", extra={"in_flight": self._admission.requests})
            self._abort("server is shutting down (drain deadline passed)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), _GRACE_AFTER_ABORT)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._handed_over:
            return
        self._handed_over = True
        previous = self._previous
        self.uninstall()
        if callable(previous):
            previous(signal.SIGTERM, None)  # uvicorn's Server.handle_exit: a normal graceful shutdown
        else:
            signal.raise_signal(signal.SIGTERM)
