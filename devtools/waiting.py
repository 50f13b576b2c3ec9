"""Waiting on conditions with deadlines, instead of sleeping and hoping.

`wait_for` returns as soon as a condition holds (and fails, naming it, when the deadline passes
first); `assert_stays` is its mirror, for what must *not* happen: it checks a condition for a
whole period and fails at the first moment it does not hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A deadline-bounded wait ran out; the message says what was awaited."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.2,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Raises :class:`WaitTimeout` naming ``what`` (and the last result or ignored error) when
    ``timeout`` seconds pass first. Exceptions of the ``ignore`` types count as "not yet";
    any other exception propagates at once.
    """
    deadline = time.monotonic() + timeout
    last_result: object = None
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
        except ignore as error:
            last_error = error
        else:
            if result:
                return result
            last_result = result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f"; last result: {last_result!r}"
            if last_error is not None:
                detail += f"; last error: {type(last_error).__name__}: {last_error}"
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(min(interval, remaining))


def assert_stays(predicate: Callable[[], object], period: float, what: str, *, interval: float = 0.2) -> None:
    """Check ``predicate`` for ``period`` seconds (first and last time included); fail when it is ever false."""
    deadline = time.monotonic() + period
    while True:
        result = predicate()
        assert result, f"{what} stopped holding (got {result!r})"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(interval, remaining))
