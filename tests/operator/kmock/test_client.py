"""The operator's HTTP client itself (`kube.http_client` + `Kube`), against kmock: credentials on
every request, the server URL kept whole, transport failures as transient errors."""

from __future__ import annotations

import itertools
import socket

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from llmservice_operator.kube import Credentials, Kube, KubeError, http_client
from llmservice_operator.metrics import OperatorMetrics

from .conftest import FIELD_MANAGER, ApiServer

pytestmark = pytest.mark.asyncio


def rotating_credentials(server: str) -> Credentials:
    """Credentials whose token the client library renews on every read, as in-cluster tokens rotate."""
    configuration = client.Configuration()
    configuration.api_key_prefix["BearerToken"] = "Bearer"
    tokens = (f"token-{i}" for i in itertools.count(1))
    configuration.refresh_api_key_hook = lambda conf: conf.api_key.update(BearerToken=next(tokens))
    return Credentials(
        server=server, ca_path=None, insecure=False, certificate_path=None, private_key_path=None, token=None, configuration=configuration
    )


async def test_every_request_carries_the_current_bearer_token(kmock: ApiServer) -> None:
    async with http_client(rotating_credentials(str(kmock.url))) as session:
        kube = Kube(session, str(kmock.url), FIELD_MANAGER, OperatorMetrics(CollectorRegistry()))
        await kube.list("LLMService", "default")
        await kube.list("LLMService", "default")
    assert [request.headers.get("Authorization") for request in kmock] == ["Bearer token-1", "Bearer token-2"]


async def test_a_server_url_with_a_path_keeps_it(kmock: ApiServer) -> None:
    # API proxies (Rancher's /k8s/clusters/<id>) serve the API under a path of their own.
    async with http_client(rotating_credentials(str(kmock.url))) as session:
        kube = Kube(session, f"{kmock.url}/k8s/clusters/c-1/", FIELD_MANAGER, OperatorMetrics(CollectorRegistry()))
        with pytest.raises(KubeError):
            await kube.list("LLMService", "default")  # kmock serves no such path
    assert [request.url.path for request in kmock] == ["/k8s/clusters/c-1/apis/llmservice.io/v1alpha1/namespaces/default/llmservices"]


async def test_an_unreachable_server_is_a_transient_error_and_counted() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        server = f"http://127.0.0.1:{probe.getsockname()[1]}"
    registry = CollectorRegistry()
    async with http_client(rotating_credentials(server)) as session:
        kube = Kube(session, server, FIELD_MANAGER, OperatorMetrics(registry))
        with pytest.raises(KubeError) as raised:
            await kube.list("LLMService", "default")
    assert raised.value.status == 0 and raised.value.transient
    assert registry.get_sample_value("llmservice_operator_api_requests_total", {"verb": "list", "code": "error"}) == 1.0
