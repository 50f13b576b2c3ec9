"""Leader election over a coordination.k8s.io Lease: the pure decision, no client and no clock.

The protocol is client-go's: the holder renews `spec.renewTime` well within
`spec.leaseDurationSeconds`; a candidate takes the Lease only when the record it sees has not
changed for a whole lease duration, timed on its own clock from when it saw it change. Comparing
the holder's timestamps with the local clock would let skew between two nodes hand the Lease over
while its holder is alive. Every write carries the resourceVersion it was decided on, so of two
candidates deciding at once the API server accepts one and answers the other 409 Conflict.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from llmservice_operator.render import Manifest

LEASE_API_VERSION = "coordination.k8s.io/v1"


class Step(Enum):
    CREATE = "create"  # there is no Lease: create it, holding it
    RENEW = "renew"  # ours: write a new renewTime
    TAKE = "take"  # another holder stopped renewing (or let go): take it over
    WAIT = "wait"  # another holder is alive


@dataclass(frozen=True)
class Record:
    """The part of a Lease that decides who leads."""

    holder: str
    duration_seconds: int
    acquire_time: str
    renew_time: str
    transitions: int
    resource_version: str

    @classmethod
    def of(cls, lease: Manifest) -> Record:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=str(spec.get("acquireTime") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
        )


def decide(record: Record | None, seen_unchanged_for: float, me: str) -> Step:
    """What the candidate `me` does next, given the Lease and how long it has looked the same to us."""
    if record is None:
        return Step.CREATE
    if record.holder == me:
        return Step.RENEW
    if not record.holder or seen_unchanged_for >= record.duration_seconds:
        return Step.TAKE
    return Step.WAIT


def lease(
    name: str,
    namespace: str,
    me: str,
    duration_seconds: int,
    now: str,
    *,
    previous: Record | None = None,
    acquired: bool = False,
) -> Manifest:
    """The Lease to write for `me`: a new one, a renewal of ours (`previous`), or a takeover (`acquired`)."""
    spec: dict[str, Any] = {
        "holderIdentity": me,
        "leaseDurationSeconds": duration_seconds,
        "renewTime": now,
        "leaseTransitions": (previous.transitions if previous else 0) + (1 if acquired and previous else 0),
    }
    spec["acquireTime"] = now if acquired or previous is None or not previous.acquire_time else previous.acquire_time
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if previous is not None:
        metadata["resourceVersion"] = previous.resource_version
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": metadata, "spec": spec}


def released(name: str, namespace: str, previous: Record, now: str) -> Manifest:
    """Our Lease let go on a clean shutdown, so a standby takes over at once instead of after a lease duration."""
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": previous.resource_version},
        "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": now, "leaseTransitions": previous.transitions},
    }
