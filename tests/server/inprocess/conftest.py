"""The in-process server tier: the real app from `create_app` around a scripted `FakeEngine`.

Requests go through `httpx.ASGITransport` (no socket, no uvicorn, no subprocess, no model), so
these tests run in `scripts/test.sh --fast` in well under a second each. What needs a real
model or real processes (tokens, batching, signals, drain) stays in the tiers beside this one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from devtools.fake_engine import FakeEngine
from devtools.tiny_tokenizer import build_tokenizer
from fastapi import FastAPI
from transformers import PreTrainedTokenizerFast

from llmservice_server.app import create_app
from llmservice_server.settings import Settings

MODEL = "tiny"


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def engine(tokenizer: PreTrainedTokenizerFast) -> FakeEngine:
    return FakeEngine(tokenizer)


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(engine: FakeEngine, tmp_path: Path) -> AppFactory:
    """`make_app(**settings)`: the server's app over `engine`, with these settings on top of the tier's own."""

    def make(**overrides: object) -> FastAPI:
        settings = {"model": str(tmp_path), "served_model_name": MODEL, "termination_log": tmp_path / "termination.log"}
        return create_app(Settings(**{**settings, **overrides}), engine)

    return make


@pytest_asyncio.fixture
async def client(make_app: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://server") as client:
        yield client
