"""What one provision attempt has done so far: the ids it touched and how long each phase took.

The phases return their results as records; these two small recorders are
what must survive an exception in the middle of a phase. :class:`Touched`
learns each instance id the moment a claim wins or EC2 returns it (claims
run in threads), so the emergency path ends everything the attempt holds
even when a phase raises half-way. :class:`Laps` times the phases.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Touched:
    """Instance ids an attempt holds rows or instances for (thread-safe, in the order they came)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: list[str] = []

    def add(self, instance_ids: Iterable[str]) -> None:
        with self._lock:
            self._ids.extend(instance_ids)

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)


class Laps:
    """Seconds per phase (``with laps.lap("selection"): ...``) and in total since it was made."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - t, 3)

    def stop(self) -> dict[str, float]:
        self.timings["total"] = round(time.monotonic() - self.started, 3)
        return self.timings
