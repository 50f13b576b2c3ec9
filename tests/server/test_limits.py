"""Hostile or careless input against a real server: bodies too large, prompts that cannot fit,
slow clients, too many connections, a burst of large prompts (issue 27).

Memory is the server process's peak resident set (`VmHWM`, reset through `/proc/PID/clear_refs`
before each step), so a spike that is freed again before the answer still counts.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import statistics
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

CONTEXT = 512
READ_TIMEOUT = 2.0
MAX_CONNECTIONS = 150  # above the burst of 100 below, below the 200 slow clients
MIB = 2**20
# "At once": the 1 s, with room for a loaded 2-core machine (a 50 MB upload alone took
# 1.4 s at load 5). Before the limits these took 2.6 s (2 MB) and ~36 s (50 MB); the memory
# bounds beside them are what tell the two apart. bench/hostile_input.py measures the times.
AT_ONCE = 3.0
TIMER_SLACK = 0.05  # the event loop's timers fire to the millisecond, not to the microsecond
PROMPT_OF_400_TOKENS = "Hello world, " * 66  # ~400 tokens of the tiny model: large but valid, with 32 to generate


@pytest.fixture(scope="module")
def limited(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("limits") / "server.log",
        max_model_len=CONTEXT,
        max_num_seqs=4,
        max_queue=8,
        request_read_timeout_seconds=READ_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class PeakMemory:
    """How far the server process's resident set peaked above where it stood at the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = _status_kib(pid, "VmRSS")

    @property
    def growth_mib(self) -> float:
        return (_status_kib(self.pid, "VmHWM") - self.start) / 1024


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, object] = body["error"]
    return error


# --- bodies and prompts ---------------------------------------------------------------------


def test_a_50_mb_body_is_refused_with_413_from_its_length(limited: ServerProcess) -> None:
    body = b'{"model": "tiny", "prompt": "' + b"x" * (50 * MIB) + b'"}'
    memory = PeakMemory(limited.proc.pid)
    with httpx.Client(base_url=limited.url, timeout=30) as client:
        started = time.perf_counter()
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - started
        assert response.status_code == 413
        assert _error(response)["code"] == "request_too_large"
        assert elapsed < AT_ONCE, f"413 after {elapsed:.2f} s"
        assert memory.growth_mib < 50, f"server RSS grew {memory.growth_mib:.0f} MiB"
        # The rest of the body was read and dropped, so the same connection serves the next request.
        assert client.get("/v1/models").status_code == 200


def test_a_client_that_asks_to_close_still_reads_its_413(limited: ServerProcess) -> None:
    # Closing with the body unread would reset the connection and lose the answer (as urllib,
    # which sends Connection: close, would see).
    size = 50 * MIB
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n"
        sock.sendall(head.encode())
        chunk = b"x" * MIB
        for _ in range(50):
            sock.sendall(chunk)
        received = b""
        while data := sock.recv(65536):
            received += data
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert b'"code":"request_too_large"' in received


def test_a_client_that_asks_to_close_is_served_then_closed(limited: ServerProcess) -> None:
    body = b'{"model": "tiny", "prompt": "Hello", "max_tokens": 2}'
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
        received = b""
        while data := sock.recv(65536):  # ends only when the server closes
            received += data
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]
    assert b'"completion_tokens":2' in received


def test_a_chunked_body_is_refused_once_it_passes_the_limit(limited: ServerProcess) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(50):  # 50 MiB, without a Content-Length
            sent += MIB
            yield b"x" * MIB
        yield b'"}'

    memory = PeakMemory(limited.proc.pid)
    started = time.perf_counter()
    response = httpx.post(limited.url + "/v1/completions", content=chunks(), timeout=30)
    elapsed = time.perf_counter() - started
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"
    assert elapsed < AT_ONCE, f"413 after {elapsed:.2f} s"
    assert memory.growth_mib < 50, f"server RSS grew {memory.growth_mib:.0f} MiB"


def test_a_small_chunked_body_is_served(limited: ServerProcess) -> None:
    parts = [b'{"model": "tiny", ', b'"prompt": "Hello", ', b'"max_tokens": 2}']
    headers = {"content-type": "application/json"}
    response = httpx.post(limited.url + "/v1/completions", content=iter(parts), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_a_2_mb_prompt_is_refused_before_it_is_tokenised(limited: ServerProcess) -> None:
    prompt = "Hello world " * (2 * MIB // 12)
    memory = PeakMemory(limited.proc.pid)
    started = time.perf_counter()
    response = httpx.post(limited.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=30)
    elapsed = time.perf_counter() - started
    assert response.status_code == 400
    error = _error(response)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert f"maximum context length is {CONTEXT} tokens" in str(error["message"])
    assert elapsed < AT_ONCE, f"400 after {elapsed:.2f} s"
    assert memory.growth_mib < 50, f"server RSS grew {memory.growth_mib:.0f} MiB"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "Hello world " * 200_000}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}] * (CONTEXT + 1)}, "messages"),
    ],
    ids=["text", "count"],
)
def test_chat_messages_that_cannot_fit_are_refused_at_once(limited: ServerProcess, body: dict[str, object], param: str) -> None:
    started = time.perf_counter()
    response = httpx.post(limited.url + "/v1/chat/completions", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == 400
    assert (_error(response)["code"], _error(response)["param"]) == ("context_length_exceeded", param)
    assert time.perf_counter() - started < AT_ONCE


def test_a_prompt_of_short_tokens_is_refused_with_the_context_error(limited: ServerProcess) -> None:
    # Under the character bound (a few characters a token), but far more tokens than the context.
    response = httpx.post(limited.url + "/v1/completions", json={"model": "tiny", "prompt": "a " * 3000, "max_tokens": 1}, timeout=30)
    assert response.status_code == 400
    assert _error(response)["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"stop": ["x" * 200_000]}, "stop"), ({"prompt": list(range(CONTEXT + 1))}, "prompt")],
    ids=["stop", "token-ids"],
)
def test_other_fields_are_bounded_by_the_context(limited: ServerProcess, extra: dict[str, object], param: str) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1, **extra}
    response = httpx.post(limited.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert _error(response)["param"] == param


def test_more_than_128_tools_are_refused(limited: ServerProcess) -> None:
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    response = httpx.post(limited.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert _error(response)["param"] == "tools"


def test_a_prompt_that_fits_is_still_served(limited: ServerProcess) -> None:
    response = httpx.post(limited.url + "/v1/completions", json={"model": "tiny", "prompt": "Hello " * 100, "max_tokens": 2}, timeout=30)
    assert response.status_code == 200, response.text


# --- a burst against admission ----------------------------------------------------------------


async def _burst(url: str, prompt: str, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 32, "temperature": 0}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)))
    return [r.status_code for r in responses]


def test_a_burst_of_large_prompts_gets_429s_without_growing_memory(limited: ServerProcess) -> None:
    prompt = PROMPT_OF_400_TOKENS
    asyncio.run(_burst(limited.url, prompt, 12))  # settle allocations that any traffic makes
    memory = PeakMemory(limited.proc.pid)
    statuses = asyncio.run(_burst(limited.url, prompt, 100))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    # 12 admitted prompts of a few kB each: what grows is bounded by admission, not by the burst.
    assert memory.growth_mib < 50, f"server RSS grew {memory.growth_mib:.0f} MiB"


# --- slow clients and too many connections -------------------------------------------------------


async def _slow_client(port: int, closed_after: list[float]) -> None:
    started = time.monotonic()  # before connecting: the server's clock starts when it accepts
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.5)
            except TimeoutError:
                writer.write(b"X-Slow: 1\r\n")  # one header at a time, never the blank line
                await writer.drain()
                continue
            if not data:
                break
    except ConnectionError:
        pass
    closed_after.append(time.monotonic() - started)
    writer.close()


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"", b""),  # connected, then nothing
        (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"HTTP/1.1 408 "),  # half a head
        (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{", b""),  # half a body
    ],
    ids=["silent", "head", "body"],
)
def test_a_request_that_stops_arriving_is_closed_after_the_read_timeout(limited: ServerProcess, sent: bytes, answer: bytes) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=READ_TIMEOUT + 5) as sock:
        sock.sendall(sent)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    elapsed = time.monotonic() - started
    assert received.startswith(answer), received
    assert READ_TIMEOUT - TIMER_SLACK <= elapsed < READ_TIMEOUT + 2, f"closed after {elapsed:.2f} s"
    if answer:
        assert b'"code": "request_read_timeout"' in received
    assert "Traceback" not in limited.logs()


def _hold_slow_clients(port: int, count: int, results: Connection) -> None:
    """In a process of its own, so the prober's measurements do not wait on this one's GIL."""

    async def hold() -> list[float]:
        closed_after: list[float] = []
        await asyncio.wait_for(asyncio.gather(*(_slow_client(port, closed_after) for _ in range(count))), READ_TIMEOUT + 10)
        return closed_after

    results.send(asyncio.run(hold()))


def test_slow_clients_are_closed_after_the_read_timeout_while_probes_stay_fast(limited: ServerProcess) -> None:
    receiving, sending = multiprocessing.get_context("fork").Pipe(duplex=False)
    holder = multiprocessing.get_context("fork").Process(target=_hold_slow_clients, args=(limited.port, 200, sending))
    latencies: list[float] = []
    holder.start()
    try:
        while holder.is_alive() and not receiving.poll():
            started = time.perf_counter()
            # A fresh connection each time, as the kubelet probes (so beyond --max-connections too);
            # a bare socket, so the latency is the server's and not a client library's set-up.
            assert _request(limited.port, "/livez").startswith(b"HTTP/1.1 200")
            latencies.append(time.perf_counter() - started)
            time.sleep(0.002)
        assert receiving.poll(READ_TIMEOUT + 15), "the slow clients did not report"
        closed_after: list[float] = receiving.recv()
    finally:
        holder.join(30)
    assert len(closed_after) == 200
    assert min(closed_after) >= READ_TIMEOUT - TIMER_SLACK, f"closed early: {min(closed_after):.3f} s"
    assert max(closed_after) < READ_TIMEOUT + 3, f"held for {max(closed_after):.2f} s"
    assert len(latencies) > 100
    p99 = statistics.quantiles(latencies, n=100)[98]
    # Held clients that blocked the loop would cost probes seconds; the 20 ms p99 is a
    # speed target, measured by bench/hostile_input.py (docs/limits.md), with headroom here for
    # a machine whose two cores other work shares.
    assert p99 < 0.050, f"/livez p99 {p99 * 1000:.1f} ms while 200 slow clients were held"


def _request(port: int, path: str) -> bytes:
    """The head of the response to one GET on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return head


@pytest.fixture
def held_connections(limited: ServerProcess) -> Iterator[list[socket.socket]]:
    """MAX_CONNECTIONS + 8 idle keep-alive connections, each after a served /livez."""
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS + 8):
            sock = socket.create_connection(("127.0.0.1", limited.port), timeout=5)
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            held.append(sock)
        yield held
    finally:
        for sock in held:
            sock.close()


def test_connections_beyond_the_limit_get_503_but_probes_are_answered(
    limited: ServerProcess, held_connections: list[socket.socket]
) -> None:
    # The held connections idle within uvicorn's 5 s keep-alive; everything below happens in it.
    refused = _request(limited.port, "/v1/models")
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert b"retry-after: 1" in refused.lower()
    for path in ("/livez", "/readyz", "/startupz"):
        assert _request(limited.port, path).startswith(b"HTTP/1.1 200"), path
    for sock in held_connections:
        sock.close()
    deadline = time.monotonic() + 5
    while not _request(limited.port, "/v1/models").startswith(b"HTTP/1.1 200"):
        assert time.monotonic() < deadline, "connections were not counted down after closing"
        time.sleep(0.05)


def test_an_overflow_503_is_openai_shaped(limited: ServerProcess, held_connections: list[socket.socket]) -> None:
    response = httpx.get(limited.url + "/v1/models", timeout=5)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert _error(response)["code"] == "too_many_connections"
