"""The operator and the server meet only in environment variables: each one the operator renders is a
server setting, and the server parses what the operator rendered into the values of the spec."""

from __future__ import annotations

from typing import Any

import pytest

from llmservice_operator.render import RenderContext, render
from llmservice_server.settings import ENV_PREFIX, Settings
from tests.operator.specs import MINIMAL, service

CONTEXT = RenderContext(default_image="registry.local/llmservice-server:test")
RICH: dict[str, Any] = {
    "model": {"source": {"huggingFace": {"repo": "org/model", "revision": "v1"}}, "maxContextLength": 4096},
    "resources": {"gpu": {"count": 0}, "cpu": {"request": "4"}, "memory": {"limit": "8Gi"}},
    "server": {
        "maxNumSeqs": 32,
        "maxQueue": 100,
        "prefillChunkTokens": 256,
        "drainSeconds": 45,
        "workers": 2,
        "prefixCacheSize": "1536Mi",
        "maxRequestSize": "4Mi",
        "requestReadTimeoutSeconds": 10,
        "maxConnections": 200,
        "requestTimeoutSeconds": 120,
        "apiKeySecretRef": {"name": "key", "key": "token"},
    },
}


def server_env(spec: dict[str, Any]) -> dict[str, str]:
    (deployment,) = [child for child in render(service(spec), CONTEXT) if child["kind"] == "Deployment"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if e["name"].startswith(ENV_PREFIX) and "value" in e}


@pytest.mark.parametrize("spec", [MINIMAL, RICH], ids=["minimal", "rich"])
def test_every_rendered_variable_is_a_server_setting(spec: dict[str, Any]) -> None:
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(server_env(spec)) <= settings


def test_the_server_reads_the_spec_back_from_the_rendered_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in server_env(RICH).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.model, settings.revision, settings.max_model_len) == ("org/model", "v1", 4096)
    assert (settings.max_num_seqs, settings.max_queue, settings.prefill_chunk_tokens) == (32, 100, 256)
    assert (settings.workers, settings.drain_seconds, settings.request_timeout_seconds) == (2, 45, 120)
    assert settings.cpus == 2  # 4 cores requested, 2 workers
    assert settings.prefix_cache_mib == 1536
    assert (settings.max_request_mib, settings.request_read_timeout_seconds, settings.max_connections) == (4, 10, 200)
    assert settings.api_key_file is not None and settings.api_key_file.name == "token"


def test_the_spec_defaults_are_the_servers_defaults() -> None:
    # A field left out of the spec must mean what the flag left out means.
    env = server_env(MINIMAL)
    defaults = Settings.model_fields
    assert float(env["LLMSERVICE_MAX_REQUEST_MIB"]) == defaults["max_request_mib"].default
    assert float(env["LLMSERVICE_REQUEST_READ_TIMEOUT_SECONDS"]) == defaults["request_read_timeout_seconds"].default
    assert int(env["LLMSERVICE_MAX_CONNECTIONS"]) == defaults["max_connections"].default
