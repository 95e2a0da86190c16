"""What a run request may say, written once: run id, count, usage class, region.

Every entry point asks these functions: the CLI (``--run-id``, ``--count``,
``--usage-class``, ``--region``), :func:`controlplane.provision.check_request`,
the ``RunnerFleet`` provider's ``check`` and the Pulumi program's run stack.
Each names the field the way its user wrote it (``--count``, ``count``,
``runner-pool:count``) and says the fix in its own words, but the rule itself
(the pattern, the range) lives here and nowhere else. The ``check_*``
functions raise :class:`~controlplane.errors.ConfigError` (exit 2) naming the
field; the ``*_ok`` predicates serve the callers that collect problems.
"""
from __future__ import annotations

import re

from controlplane.errors import ConfigError
from controlplane.patterns import REGION_RE, RUN_ID_RE, USAGE_CLASSES  # not config: no pydantic at start-up

MIN_COUNT = 1
MAX_COUNT = 500                  # runners per run
RUN_ID_RULE = "1-100 characters: letters, digits, '.', '_', '-', starting with a letter or digit"
REGION_RULE = "an AWS region such as us-east-1"


def run_id_ok(value: object) -> bool:
    return isinstance(value, str) and RUN_ID_RE.match(value) is not None


def region_ok(value: object) -> bool:
    return isinstance(value, str) and re.match(REGION_RE, value) is not None


def count_ok(value: int) -> bool:
    return MIN_COUNT <= value <= MAX_COUNT


def usage_class_ok(value: object) -> bool:
    """``None`` is fine: take any runner from the pool, create with the pool's default."""
    return value is None or value in USAGE_CLASSES


def check_run_id(value: str, field: str = "run id") -> str:
    if not run_id_ok(value):
        raise ConfigError(f"{field} {value!r} is not valid", hint=RUN_ID_RULE)
    return value


def check_count(value: int, field: str = "count") -> int:
    if value < MIN_COUNT:
        raise ConfigError(f"{field} {value} is not valid", hint=f"ask for at least {MIN_COUNT} runner")
    if value > MAX_COUNT:
        raise ConfigError(f"{field} {value} is too large", hint=f"ask for at most {MAX_COUNT} runners per run")
    return value


def check_usage_class(value: str | None, field: str = "usage class") -> str | None:
    if not usage_class_ok(value):
        raise ConfigError(f"{field} {value!r} is not valid", hint=f"use one of: {', '.join(USAGE_CLASSES)}")
    return value


def check_region(value: str, field: str = "region") -> str:
    if not region_ok(value):
        raise ConfigError(f"{field} {value!r} is not an AWS region", hint="use a region name such as us-east-1")
    return value
