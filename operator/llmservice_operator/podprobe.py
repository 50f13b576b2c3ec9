"""Asks a server pod for its start-up stages (GET /startupz on the pod's IP), for status.startup.

An adapter of its own: a session without the operator's Kubernetes credentials (a pod must never
see the operator's token), a short timeout, and no retries - the reconciler asks each pod once,
when it first becomes ready, and a pod it cannot reach (a NetworkPolicy, a fake node) only leaves
status.startup without the fetch/load/warmup split.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from llmservice_operator import naming

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 1.0


class StageProbe:
    def __init__(self, session: aiohttp.ClientSession, port: int = naming.SERVER_PORT) -> None:
        self._session = session
        self._port = port

    async def __call__(self, pod: dict[str, Any]) -> dict[str, float] | None:
        address = (pod.get("status") or {}).get("podIP")
        if not address:
            return None
        host = f"[{address}]" if ":" in address else address
        url = f"http://{host}:{self._port}/startupz"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)) as response:
                body = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            log.info("No start-up stages from pod %s: %r", pod["metadata"].get("name"), error)
            return None
        stages = body.get("stages") if isinstance(body, dict) else None
        if not isinstance(stages, dict):
            return None
        return {str(k): float(v) for k, v in stages.items() if isinstance(v, int | float)}


def session() -> aiohttp.ClientSession:
    """A plain session (no credentials, no middleware) for talking to pods."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))
