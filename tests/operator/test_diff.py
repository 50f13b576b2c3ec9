"""The settled-object check: desired fields already present means no write."""

from __future__ import annotations

from llmservice_operator.diff import contains


def test_server_defaults_and_other_managers_fields_do_not_count_as_drift() -> None:
    desired = {"spec": {"template": {"spec": {"containers": [{"name": "server", "env": [{"name": "A", "value": "1"}]}]}}}}
    observed = {
        "spec": {
            "progressDeadlineSeconds": 600,
            "template": {
                "spec": {
                    "dnsPolicy": "ClusterFirst",
                    "containers": [
                        {"name": "sidecar"},
                        {
                            "name": "server",
                            "terminationMessagePath": "/dev/termination-log",
                            "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}],
                        },
                    ],
                }
            },
        }
    }
    assert contains(observed, desired)


def test_changed_or_missing_fields_are_drift() -> None:
    assert not contains({"spec": {"replicas": 2}}, {"spec": {"replicas": 3}})
    assert not contains({"spec": {}}, {"spec": {"replicas": 3}})
    assert not contains({"ports": [{"name": "http", "port": 80}]}, {"ports": [{"name": "http", "port": 8000}]})
    assert not contains({"args": ["a"]}, {"args": ["a", "b"]})
    assert not contains({"x": "1"}, {"x": 1})


def test_quantities_compare_by_value() -> None:
    assert contains({"memory": "1Gi"}, {"memory": "1024Mi"})
    assert contains({"cpu": "500m"}, {"cpu": "0.5"})
    assert not contains({"memory": "1Gi"}, {"memory": "2Gi"})
    assert not contains({"image": "a:1"}, {"image": "a:2"})
