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


def step_delay(seconds: float):
    """An on_step hook that makes every decode step `seconds` longer: 'still running' is no race."""
    return lambda batch, took: time.sleep(seconds)


slow_step = step_delay(0.004)  # the engine tests' hook: a few ms more per step
