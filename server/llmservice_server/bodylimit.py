"""Request body limit: 413 for a body over `--max-request-mib`, before the app holds it in memory.

A body that declares its length is judged by `Content-Length` before a byte of it is read (the
HTTP parser never delivers more than it declared). A chunked body is read here, up to the limit,
before the app sees any of it; one chunk past the limit and the app is never called.

The 413 leaves the connection open: uvicorn reads and drops the rest of the body (at most until
the request read timeout closes the connection; `connections` does the same for a client that
asked to close), so the client, which is usually still sending, gets to read the answer instead
of a reset.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the parser has already refused a malformed length
    return None


def _chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"transfer-encoding" for name, _ in headers)


class BodyLimit:
    """Pure ASGI middleware; `max_bytes` is the largest body the app will be given."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        length = _content_length(headers)
        if length is not None and length > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        if length is not None or not _chunked(headers):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending; nobody to answer
            body: bytes = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        mib = self.max_bytes / 2**20
        message = f"Request body is larger than the server's limit of {mib:g} MiB (--max-request-mib)."
        await APIError(413, message, code="request_too_large").response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then whatever the connection says next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
