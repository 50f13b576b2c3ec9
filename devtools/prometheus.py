"""Read a Prometheus /metrics page into samples, with the parser prometheus-client ships."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape(url: str, timeout: float = 10.0) -> list[Sample]:
    """Every sample of the page at `url` (http://host:port/metrics)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())
