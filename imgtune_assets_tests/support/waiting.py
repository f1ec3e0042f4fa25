"""Waiting on a condition instead of sleeping: the one polling loop of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.5,
             what: str | Callable[[], str] = "a condition") -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    After ``timeout`` seconds, raise ``TimeoutError`` naming ``what`` — a string, or a function called
    only then (so a service's log tail in the message is the one at the time of the failure). An
    exception raised by ``predicate`` (a service that died, a run that failed early) ends the wait at
    once. ``interval`` is the pause between two calls, never past the deadline.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message} (last value: {last!r:.300})")
        time.sleep(min(interval, remaining))
