"""The container security context every pod the operator makes runs under: Pod Security's `restricted`."""

from __future__ import annotations

from typing import Any


def restricted_container() -> dict[str, Any]:
    """A fresh copy each call: manifests are mutated by later rendering steps and by tests."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
