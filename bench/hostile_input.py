"""Hostile or careless input against one server (issue 27): what each costs it in time and memory.

Starts `python -m llmservice_server.main` on the tiny random model (context 512) from the sources
under `--src` (default: this checkout; point it at another checkout to measure that one), then:

- a 50 MB `/v1/completions` body, with a Content-Length and chunked;
- a 2 MB prompt;
- `--slow` slow clients (half a request line, then a header every 0.5 s), with /livez probed on
  fresh connections meanwhile, and how long the server held them;
- a burst of 100 near-context prompts against `--max-queue 8`.

Memory is the server process's peak resident set (VmHWM, reset through /proc/PID/clear_refs
before each step) above its resident set at the start of the step. Results: JSON on stdout.
Nothing here fails on a missed target; tests/server/test_limits.py holds the behaviour.

    .venv/bin/python -m bench.hostile_input
    .venv/bin/python -m bench.hostile_input --src /path/to/other/checkout --skip-50mb
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from devtools.ports import free_port
from devtools.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]

MIB = 2**20


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def _reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _kib(pid, "VmRSS")


def _step(pid: int, action: Any) -> dict[str, Any]:
    start = _reset_peak(pid)
    started = time.perf_counter()
    outcome = action()
    return {"seconds": round(time.perf_counter() - started, 3), "peak_growth_mib": round((_kib(pid, "VmHWM") - start) / 1024, 1), **outcome}


def _post(url: str, **kwargs: Any) -> dict[str, Any]:
    try:
        response = httpx.post(url + "/v1/completions", timeout=120, **kwargs)
    except httpx.TransportError as exc:
        return {"status": None, "error": repr(exc)}
    return {"status": response.status_code, "code": response.json().get("error", {}).get("code")}


async def _slow_client(port: int) -> float:
    started = time.monotonic()  # before connecting: the server's clock starts when it accepts
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        while True:
            try:
                if not await asyncio.wait_for(reader.read(4096), 0.5):
                    break
            except TimeoutError:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
    except ConnectionError:
        pass
    writer.close()
    return time.monotonic() - started


def _hold_slow_clients(port: int, count: int, hold: float, results: Connection) -> None:
    async def run() -> list[float]:
        clients = [asyncio.ensure_future(_slow_client(port)) for _ in range(count)]
        done, pending = await asyncio.wait(clients, timeout=hold)
        for task in pending:
            task.cancel()
        return sorted(task.result() for task in done)

    results.send(asyncio.run(run()))


def _probe_livez(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return time.perf_counter() - started


def _slow_clients(port: int, count: int, hold: float) -> dict[str, Any]:
    """The clients in a forked process; /livez probed from this one, on fresh connections."""
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    holder = context.Process(target=_hold_slow_clients, args=(port, count, hold, sending))
    holder.start()
    latencies: list[float] = []
    while not receiving.poll():
        latencies.append(_probe_livez(port))
        time.sleep(0.01)
    held: list[float] = receiving.recv()
    holder.join(30)
    q = statistics.quantiles(latencies, n=100)
    return {
        "clients": count,
        "closed_within_hold": len(held),
        "closed_after_s": {"min": round(held[0], 2), "max": round(held[-1], 2)} if held else None,
        "livez_ms": {
            "n": len(latencies),
            "p50": round(q[49] * 1000, 1),
            "p99": round(q[98] * 1000, 1),
            "max": round(max(latencies) * 1000, 1),
        },
    }


async def _burst(url: str, count: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        body = {"model": "tiny", "prompt": "Hello world, " * 66, "max_tokens": 32, "temperature": 0}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)), return_exceptions=True)
    statuses = [str(r.status_code) if isinstance(r, httpx.Response) else type(r).__name__ for r in responses]
    return {"statuses": {status: statuses.count(status) for status in sorted(set(statuses))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO, help="checkout whose server/ to run")
    parser.add_argument("--slow", type=int, default=1000, help="slow clients to hold")
    parser.add_argument("--read-timeout", type=float, default=5.0)
    parser.add_argument("--skip-50mb", action="store_true", help="leave out the 50 MB body (a server without a limit may need GBs)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        model = build_tiny_model(Path(work) / "tiny")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVICE_")}
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(args.src / "server"), "LLMSERVICE_CACHE_DIR": f"{work}/cache"})
        argv = [sys.executable, "-m", "llmservice_server.main", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "4", "--max-queue", "8"]
        if args.src.resolve() == REPO:  # flags an older checkout does not know
            argv += ["--request-read-timeout-seconds", str(args.read_timeout), "--max-connections", str(args.slow * 2)]
        with open(f"{work}/server.log", "wb") as log:
            server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(Path(f"{work}/server.log").read_text()[-3000:])
                time.sleep(0.2)
            pid = server.pid
            results: dict[str, Any] = {"src": str(args.src), "rss_mib_at_ready": round(_kib(pid, "VmRSS") / 1024, 1)}
            if not args.skip_50mb:
                body = b'{"model": "tiny", "prompt": "' + b"x" * (50 * MIB) + b'"}'
                headers = {"content-type": "application/json"}
                results["body_50mb"] = _step(pid, lambda: _post(url, content=body, headers=headers))
                chunks = [body[i : i + MIB] for i in range(0, len(body), MIB)]
                results["body_50mb_chunked"] = _step(pid, lambda: _post(url, content=iter(chunks), headers=headers))
            prompt = {"model": "tiny", "prompt": "Hello world " * (2 * MIB // 12), "max_tokens": 1}
            results["prompt_2mb"] = _step(pid, lambda: _post(url, json=prompt))
            results["burst_100"] = _step(pid, lambda: asyncio.run(_burst(url, 100)))
            results["slow_clients"] = _step(pid, lambda: _slow_clients(port, args.slow, args.read_timeout + 10))
            json.dump(results, sys.stdout, indent=2)
            sys.stdout.write("\n")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
