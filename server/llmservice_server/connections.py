"""The HTTP connection guard: read deadlines and a bound on connections, below the ASGI app.

uvicorn (0.54, httptools) leaves two gaps a hostile or broken client can use to hold a pod:

- it times out only *idle* keep-alive connections, and only after a first response: a connection
  that sends nothing, or half a request line and then a header a minute, is held forever;
- its `limit_concurrency` answers 503 to every request beyond the limit, probes included, so a
  flood of connections would fail the kubelet's liveness probe and restart a healthy pod.

`GuardedHttpProtocol` is uvicorn's httptools protocol with both filled in, using the parser's own
callbacks to know where a request is:

- from its first byte (or from the moment the connection opens) a request must be read whole -
  head and body - within `read_timeout`; otherwise the connection is closed (with a 408 when only
  part of the head had come, so no response of the app can be interleaved);
- a connection accepted while `max_connections` are already open is served only for the probe
  paths; any other request on it gets 503 with `Retry-After` and the connection is closed;
- a request with a body from a client that asked to close (`Connection: close`, HTTP/1.0) has its
  body read to the end before the connection is closed, so an answer written early (413) is not
  lost to a connection reset.

uvicorn builds the protocol from its `Config`, which it also pickles into worker processes, so the
limits travel on `GuardedConfig`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PROBE_PATHS = frozenset({"/livez", "/readyz", "/startupz"})
OVERFLOW_RETRY_AFTER_SECONDS = 1


def _error_json(message: str, kind: str, code: str) -> bytes:
    # The server's one error shape (errors.APIError), spelled here without FastAPI: these answers
    # are written below the app.
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


_OVERFLOW_BODY = _error_json("server has too many open connections; retry shortly", "service_unavailable_error", "too_many_connections")
_TIMEOUT_BODY = _error_json("request was not received in time", "timeout_error", "request_read_timeout")
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + b"content-length: "
    + str(len(_TIMEOUT_BODY)).encode()
    + b"\r\n\r\n"
    + _TIMEOUT_BODY
)


@dataclass(frozen=True)
class ConnectionLimits:
    read_timeout: float  # seconds from a request's first byte (or the connection's start) to its last
    max_connections: int  # open connections per process beyond which new ones serve only probes


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config, carrying the limits to the protocol (in this process or a worker's)."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedHttpProtocol, **kwargs)
        self.connection_limits = limits


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any((name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding" for name, value in headers)


async def _too_many_connections(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_OVERFLOW_BODY)).encode()),
        (b"retry-after", str(OVERFLOW_RETRY_AFTER_SECONDS).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _OVERFLOW_BODY, "more_body": False})


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if not isinstance(config, GuardedConfig):
            raise TypeError("GuardedHttpProtocol needs a GuardedConfig")
        self._limits = config.connection_limits
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_head = False
        self._overflow = False
        self._message_done = False
        self._close_when_done = False

    # --- the connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn has just added this connection to the process's set.
        self._overflow = len(self.connections) > self._limits.max_connections
        self._arm()  # the first request has as long as any other to arrive whole

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- parser callbacks (httptools calls them from data_received) ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._message_done = False
        self._close_when_done = False
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._overflow and httptools.parse_url(self.url).path.decode("latin-1") not in PROBE_PATHS:
            self.app = _too_many_connections
        super().on_headers_complete()
        if self.cycle is not None and not self.cycle.keep_alive and _has_body(self.headers):
            # The client closes after this request, but may still be sending its body when an early
            # answer (413) is written; closing then would reset the connection and lose the answer.
            # So the rest of the body is read (and dropped) first, within the read deadline.
            self.cycle.keep_alive = True
            self._close_when_done = True

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        self._message_done = True
        if self._close_when_done and self.cycle.response_complete:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._close_when_done and self._message_done:
            self.transport.close()

    # --- the read deadline ---

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._limits.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._reading_head and (self.cycle is None or self.cycle.response_complete):
            # No app has seen this request, and none is answering an earlier one on this
            # connection: nothing else can be writing to it.
            self.transport.write(_TIMEOUT_RESPONSE)
        self.logger.debug("Closed a connection whose request was not read within %s s", self._limits.read_timeout)
        self.transport.close()
