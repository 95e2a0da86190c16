"""Structured logs and progress lines.

Every operation logs events as one line each with the run id, phase, instance
ids and duration: JSON when stderr is not a terminal (CI, schedulers, log
shippers), a compact ``key=value`` line when it is. Progress lines ("3 of 5
ready, 4.2 s") go to stderr too, so ``--json`` output on stdout stays one
clean document. Tokens never reach a log: callers pass ids and counts only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

LOGGER = logging.getLogger("runner_pool")
_configured = False


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        if self.as_json:
            return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "event": record.getMessage(), **fields}, default=str)
        kv = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return f"[{record.levelname.lower()}] {record.getMessage()} {kv}".rstrip()


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) if len(v) <= 8 else f"{','.join(str(x) for x in v[:8])},...(+{len(v) - 8})"
    return str(v)


def configure(level: str | None = None, as_json: bool | None = None) -> None:
    """Set up the handler once (the CLI calls this; library users may not)."""
    global _configured
    if _configured:
        return
    level = level or os.environ.get("RUNNER_POOL_LOG_LEVEL", "WARNING")
    if as_json is None:
        as_json = os.environ.get("RUNNER_POOL_LOG_FORMAT", "").lower() == "json" or not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
    _configured = True


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: ``event("claim.won", run_id=..., instance_ids=[...])``."""
    LOGGER.log(level, name, extra={"fields": fields})


class Progress:
    """Phase lines and in-place progress for long waits, on stderr."""

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._last = ""
        self._last_at = 0.0

    def phase(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def update(self, text: str, key: str | None = None, min_interval_s: float = 5.0) -> None:
        """Print ``text`` when ``key`` (default: the text) changes, else at most every few seconds."""
        now = time.monotonic()
        key = text if key is None else key
        if not self.enabled or (key == self._last and now - self._last_at < min_interval_s):
            return
        print(f"  {text}", file=self.stream, flush=True)
        self._last, self._last_at = key, now


QUIET = Progress(enabled=False)
