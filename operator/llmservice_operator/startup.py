"""Where a replica's cold start went, from its pod's timestamps and the server's own stage report.

Pure. The pod says when it was created, scheduled, when its server container started and when it
became ready; the server (its /startupz) says how long it spent downloading, loading and warming
up. Everything from the container's start to ready that the server does not account for
(interpreter start, imports, the readiness probe's period) is `other`, so the phases always add
up to `total` (up to the timestamps' whole seconds).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

Manifest = dict[str, Any]
SERVER_PHASES = ("fetch", "load", "warmup")
PHASES = ("scheduling", "image", *SERVER_PHASES, "other", "total")
SERVER_CONTAINER = "server"


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _condition_time(pod: Manifest, kind: str) -> datetime | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return _time(condition.get("lastTransitionTime"))
    return None


def _started(pod: Manifest) -> datetime | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == SERVER_CONTAINER:
            state = status.get("state") or {}
            return _time((state.get("running") or {}).get("startedAt"))
    return None


def ready_at(pod: Manifest) -> datetime | None:
    return _condition_time(pod, "Ready")


def latest_ready(pods: list[Manifest]) -> Manifest | None:
    """The pod that most recently became ready (the newest cold start)."""
    ready = [(at, pod["metadata"]["name"], pod) for pod in pods if (at := ready_at(pod)) is not None]
    return max(ready, key=lambda item: (item[0], item[1]))[2] if ready else None


def breakdown(pod: Manifest, stages: dict[str, float] | None) -> dict[str, Any] | None:
    """status.startup for `pod`; None while it lacks a timestamp (not yet ready, say)."""
    created = _time(pod["metadata"].get("creationTimestamp"))
    scheduled = _condition_time(pod, "PodScheduled")
    started = _started(pod)
    ready = ready_at(pod)
    if created is None or scheduled is None or started is None or ready is None:
        return None
    scheduling = _seconds(created, scheduled)
    image = _seconds(scheduled, started)
    in_container = _seconds(started, ready)
    phases: dict[str, float] = {"scheduling": scheduling, "image": image}
    reported = 0.0
    for phase in SERVER_PHASES:
        if stages is not None and isinstance(stages.get(phase, 0.0), int | float):
            phases[phase] = round(float(stages.get(phase, 0.0)), 3)
            reported += phases[phase]
    phases["other"] = round(max(0.0, in_container - reported), 3)
    phases["total"] = _seconds(created, ready)
    return {"pod": pod["metadata"]["name"], "readyAt": ready.strftime("%Y-%m-%dT%H:%M:%SZ"), **phases}


def _seconds(start: datetime, end: datetime) -> float:
    return round(max(0.0, (end - start).total_seconds()), 3)
