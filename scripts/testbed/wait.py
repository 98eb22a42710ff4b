"""The one way tests, benches and the demo wait for something: poll a condition, never sleep-then-check."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float = 30.0, *, interval: float = 0.02,
               what: str | None = None) -> T:
    """Calls ``pred()`` every ``interval`` seconds until it returns something truthy, and returns
    that. After ``timeout`` seconds raises AssertionError naming ``what`` (else the predicate)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or getattr(pred, '__name__', pred)}")
        time.sleep(interval)
