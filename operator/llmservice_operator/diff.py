"""Pure comparison of what we would apply with what the API server holds.

A settled LLMService must cost zero writes, so before applying a child we ask whether every field
we own already has the value we want. The server adds defaults and other managers add fields;
those are fine. It also rewrites quantities into canonical form ("1024Mi" -> "1Gi"), so strings
that are quantities compare by value.
"""

from __future__ import annotations

from typing import Any

from llmservice_operator.spec import SpecError, quantity_value


def contains(observed: Any, desired: Any) -> bool:
    """True when `observed` already holds every field and value of `desired`."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(key in observed and contains(observed[key], value) for key, value in desired.items())
    if isinstance(desired, list):
        return isinstance(observed, list) and _list_contains(observed, desired)
    if isinstance(desired, str) and isinstance(observed, str) and desired != observed:
        return _same_quantity(observed, desired)
    return bool(observed == desired) and type(observed) is type(desired)


def _list_contains(observed: list[Any], desired: list[Any]) -> bool:
    # Lists keyed by name (containers, env, ports, volumes) are merged by key under server-side
    # apply, so others may have added entries; match ours by name. Other lists are atomic.
    if desired and all(isinstance(item, dict) and "name" in item for item in desired):
        by_name = {item.get("name"): item for item in observed if isinstance(item, dict)}
        return all(item["name"] in by_name and contains(by_name[item["name"]], item) for item in desired)
    return len(observed) == len(desired) and all(contains(o, d) for o, d in zip(observed, desired, strict=True))


def _same_quantity(observed: str, desired: str) -> bool:
    try:
        return quantity_value(observed) == quantity_value(desired)
    except SpecError:
        return False
