"""Waiting on a live engine without races, for the engine tests."""

from __future__ import annotations

import time


def until(condition, seconds: float = 10.0) -> bool:
    """Poll `condition` every 2 ms; True once it holds, False after `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.002)
    return False


def slow_step(batch: int, seconds: float) -> None:
    """An on_step hook: every decode step takes a few ms more, so "still running" is not a race."""
    time.sleep(0.004)
