"""Waiting for something another thread or process does: one helper for every test."""

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             what: str = "the condition") -> float:
    """Call `condition()` every `interval` seconds until it returns a true value; the
    seconds that took. AssertionError naming `what` once `timeout` seconds passed."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} did not hold within {timeout:g} s"
        time.sleep(interval)
    return time.monotonic() - start
