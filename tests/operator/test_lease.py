"""The pure leader-election decision: who acts, and what a Lease write says."""

from __future__ import annotations

from llmservice_operator.lease import Record, Step, decide, lease, released

ME, OTHER = "op-a_1234", "op-b_5678"
T0, T1 = "2026-11-29T10:00:00.000000Z", "2026-11-29T10:00:05.000000Z"


def held_by(holder: str, transitions: int = 0) -> Record:
    return Record(holder=holder, duration_seconds=15, acquire_time=T0, renew_time=T0, transitions=transitions, resource_version="42")


def test_no_lease_is_created() -> None:
    assert decide(None, 0.0, ME) is Step.CREATE


def test_our_lease_is_renewed() -> None:
    assert decide(held_by(ME), 100.0, ME) is Step.RENEW


def test_a_live_holder_is_left_alone_until_its_record_is_unchanged_for_a_lease_duration() -> None:
    assert decide(held_by(OTHER), 0.0, ME) is Step.WAIT
    assert decide(held_by(OTHER), 14.9, ME) is Step.WAIT
    assert decide(held_by(OTHER), 15.0, ME) is Step.TAKE


def test_a_released_lease_is_taken_at_once() -> None:
    assert decide(held_by(""), 0.0, ME) is Step.TAKE


def test_a_new_lease_holds_for_us_from_now() -> None:
    written = lease("llmservice-operator", "ops", ME, 15, T0)
    assert written == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "llmservice-operator", "namespace": "ops"},
        "spec": {"holderIdentity": ME, "leaseDurationSeconds": 15, "acquireTime": T0, "renewTime": T0, "leaseTransitions": 0},
    }


def test_a_renewal_keeps_the_acquire_time_and_names_the_version_it_replaces() -> None:
    written = lease("l", "ops", ME, 15, T1, previous=held_by(ME, transitions=2))
    assert written["metadata"]["resourceVersion"] == "42"
    assert (written["spec"]["acquireTime"], written["spec"]["renewTime"], written["spec"]["leaseTransitions"]) == (T0, T1, 2)


def test_a_takeover_counts_a_transition_and_starts_a_new_term() -> None:
    written = lease("l", "ops", ME, 15, T1, previous=held_by(OTHER, transitions=2), acquired=True)
    assert written["spec"]["holderIdentity"] == ME
    assert (written["spec"]["acquireTime"], written["spec"]["leaseTransitions"]) == (T1, 3)
    assert written["metadata"]["resourceVersion"] == "42"


def test_a_release_empties_the_holder() -> None:
    written = released("l", "ops", held_by(ME), T1)
    assert written["spec"]["holderIdentity"] == ""
    assert written["metadata"]["resourceVersion"] == "42"
    assert decide(Record.of(written), 0.0, OTHER) is Step.TAKE


def test_record_reads_a_lease_as_the_api_server_returns_it() -> None:
    body = {
        "metadata": {"name": "l", "namespace": "ops", "resourceVersion": "77"},
        "spec": {"holderIdentity": OTHER, "leaseDurationSeconds": 15, "acquireTime": T0, "renewTime": T1, "leaseTransitions": 4},
    }
    assert Record.of(body) == Record(OTHER, 15, T0, T1, 4, "77")
