"""Time, deadlines and bounded waits.

Every wait in the control plane goes through :func:`wait_until` with a
:class:`Deadline`; there are no bare sleeps. The clock is injectable so unit
tests can run time forward without sleeping.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float: ...          # wall clock, epoch seconds (compared with table thresholds)
    def monotonic(self) -> float: ...    # for durations
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


class AheadClock(SystemClock):
    """The system clock ``ahead_s`` in the future (wall time only): what a scheduled run that
    comes after a grace period sees, so tests and benchmarks need not wait for it."""

    def __init__(self, ahead_s: float) -> None:
        self.ahead_s = ahead_s

    def now(self) -> float:
        return super().now() + self.ahead_s


@dataclass
class Deadline:
    """A point in monotonic time after which a wait gives up."""

    timeout_s: float
    clock: Clock = field(default=SYSTEM_CLOCK)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock.monotonic()

    @property
    def elapsed_s(self) -> float:
        return self.clock.monotonic() - self.started

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.timeout_s - self.elapsed_s)

    @property
    def expired(self) -> bool:
        return self.elapsed_s >= self.timeout_s


def wait_until(
    probe: Callable[[], T | None],
    deadline: Deadline,
    interval_s: float,
    on_poll: Callable[[T | None], None] | None = None,
) -> T | None:
    """Call ``probe`` until it returns something truthy or the deadline passes.

    Returns the probe's last truthy result, or ``None`` on timeout. The probe is
    always called at least once, and once more right at the deadline.
    """
    while True:
        result = probe()
        if on_poll is not None:
            on_poll(result)
        if result:
            return result
        if deadline.expired:
            return None
        deadline.clock.sleep(min(interval_s, max(deadline.remaining_s, 0.01)))
