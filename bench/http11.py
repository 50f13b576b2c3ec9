"""A keep-alive HTTP/1.1 transport for httpx over asyncio streams: the load generator's wire.

The load generator shares the machine with the server it measures, so every microsecond of CPU it
spends per streamed token is taken from the server under test. httpx's default transport (httpcore
on anyio) cost about 170 us of CPU per SSE event at 16 streams of the tiny model on 2 cores
(docs/benchmarks.md): a cancel scope and a timeout per socket read, an h11 state machine per event.
This transport reads a chunk with two buffered `StreamReader` calls and does nothing else per event.

What it leaves out, on purpose (loopback benchmark traffic only): TLS, proxies, HTTP/2, request
bodies that stream, and per-read timeouts - the load generator bounds every run with a hard
deadline that cancels whatever is still in flight. Connecting has a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

CONNECT_TIMEOUT_SECONDS = 10.0

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LoopbackTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self.opened = 0  # connections made: more than the in-flight peak means answers were not read whole

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = (request.url.host, request.url.port or 80)
        idle = self._idle.setdefault(origin, [])
        body = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        head += [b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw]
        if body and "content-length" not in request.headers:
            head.append(b"content-length: %d\r\n" % len(body))
        message = b"".join(head) + b"\r\n" + body
        while True:
            reused = bool(idle)
            reader, writer = idle.pop() if reused else await self._connect(*origin)
            try:
                writer.write(message)
                status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                if not reused:
                    raise httpx.RemoteProtocolError(f"the server closed the connection before answering: {exc!r}") from exc
                # A kept-alive connection the server had closed while idle: send it again on a new one.
            except BaseException:
                writer.close()
                raise
        reusable = headers.get("connection", "").lower() != "close"
        stream = _Body((reader, writer), headers, request.method == "HEAD" or status in (204, 304), idle if reusable else None)
        return httpx.Response(status, headers=headers.multi_items(), stream=stream, extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for _, writer in connections:
                writer.close()
        self._idle.clear()

    async def _connect(self, host: str, port: int) -> _Connection:
        self.opened += 1
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc


def _parse_head(raw: bytes) -> tuple[int, httpx.Headers]:
    status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1."):
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x response: {status_line!r}")
    headers = httpx.Headers([(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)])
    return int(rest.split(" ", 1)[0]), headers


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives: chunked, sized by Content-Length, or up to the connection's end."""

    def __init__(self, connection: _Connection, headers: httpx.Headers, empty: bool, pool: list[_Connection] | None) -> None:
        (self._reader, self._writer), self._pool = connection, pool
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = 0 if empty else int(length) if length is not None else None
        self._complete = False
        self._closed = False
        if self._length is None and not self._chunked:
            self._pool = None  # the body ends when the server closes the connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._chunked:
                async for chunk in self._chunks():
                    yield chunk
            elif self._length is not None:
                if self._length:
                    yield await self._reader.readexactly(self._length)
            else:
                while data := await self._reader.read(65536):
                    yield data
        except asyncio.IncompleteReadError as exc:
            raise httpx.RemoteProtocolError("the server closed the connection mid-response") from exc
        self._complete = True

    async def _chunks(self) -> AsyncIterator[bytes]:
        reader = self._reader
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent to us: the empty line that ends them
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._complete and self._pool is not None:
            self._pool.append((self._reader, self._writer))  # a whole answer read: ready for the next request
        else:
            self._writer.close()
