"""The stage probe against a real HTTP server on loopback: what it reads, and what it leaves out."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from llmservice_operator import podprobe

pytestmark = pytest.mark.asyncio


def _pod(address: str | None) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"podIP": address} if address else {}}


@pytest_asyncio.fixture
async def startupz() -> AsyncIterator[tuple[int, dict[str, Any]]]:
    body: dict[str, Any] = {}

    async def handle(_: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/startupz", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, body
    await runner.cleanup()


async def test_reads_the_stages_a_ready_server_reports(startupz: tuple[int, dict[str, Any]]) -> None:
    port, body = startupz
    body.update({"status": "started", "stages": {"load": 38.5, "warmup": 0.9, "bogus": "x"}})
    async with podprobe.session() as session:
        stages = await podprobe.StageProbe(session, port=port)(_pod("127.0.0.1"))
    assert stages == {"load": 38.5, "warmup": 0.9}


async def test_a_server_without_stages_or_a_pod_without_an_ip_gives_none(startupz: tuple[int, dict[str, Any]]) -> None:
    port, body = startupz
    body.update({"status": "started"})
    async with podprobe.session() as session:
        probe = podprobe.StageProbe(session, port=port)
        assert await probe(_pod("127.0.0.1")) is None
        assert await probe(_pod(None)) is None


async def test_a_pod_nobody_answers_for_gives_none() -> None:
    with socket.socket() as sock:  # a loopback port that is bound but never listened on refuses
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with podprobe.session() as session:
            assert await podprobe.StageProbe(session, port=port)(_pod("127.0.0.1")) is None
