"""The shared test helpers do what they promise: waits end on the condition or fail naming it."""

from __future__ import annotations

import http.server
import itertools
import socket
import threading
from collections.abc import Iterator

import pytest
from devtools import prometheus
from devtools.ports import free_port
from devtools.waiting import WaitTimeout, assert_stays, wait_for

PAGE = """\
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="tiny",pid="1"} 2.0
vllm:num_requests_running{model_name="tiny",pid="2"} 1.0
# HELP requests_total Requests.
# TYPE requests_total counter
requests_total{code="200"} 5.0
requests_total{code="429"} 1.0
"""


def test_wait_for_returns_the_first_truthy_result() -> None:
    counter = itertools.count()
    assert wait_for(lambda: next(counter) >= 3 and "done", 5, "three calls", interval=0.001) == "done"


def test_wait_for_names_what_it_waited_for_and_the_last_error() -> None:
    def failing() -> bool:
        raise ConnectionError("refused")

    with pytest.raises(WaitTimeout, match=r"the server.*ConnectionError: refused"):
        wait_for(failing, 0.05, "the server", interval=0.01, ignore=(ConnectionError,))


def test_wait_for_lets_other_errors_through_at_once() -> None:
    with pytest.raises(ZeroDivisionError):
        wait_for(lambda: 1 / 0, 5, "never")


def test_assert_stays_checks_for_the_whole_period() -> None:
    calls = itertools.count()
    assert_stays(lambda: next(calls) < 1000, 0.05, "a condition", interval=0.01)
    assert next(calls) >= 3, "checked more than once"


def test_assert_stays_fails_as_soon_as_the_condition_breaks() -> None:
    calls = itertools.count()
    with pytest.raises(AssertionError, match="the count stayed low"):
        assert_stays(lambda: next(calls) < 2, 5, "the count stayed low", interval=0.001)
    assert next(calls) == 3  # it stopped at the first failure, not after 5 s


def test_free_port_is_free() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.fixture
def metrics_url() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_reads_samples_and_totals_sum_over_labels(metrics_url: str) -> None:
    samples = prometheus.scrape(metrics_url)
    assert prometheus.total(samples, "vllm:num_requests_running") == 3.0
    assert prometheus.total(samples, "requests_total", code="429") == 1.0
    assert prometheus.total(samples, "requests_total") == 6.0
    assert prometheus.total(samples, "absent_total") == 0.0
