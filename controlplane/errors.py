"""Errors users see: a message and a hint, mapped to exit codes by the CLI.

Every failure a user can act on is one of these. botocore errors are mapped
once, in :mod:`controlplane.aws`, and chained (``raise ... from``) so a debug
run still shows the original. The CLI prints ``error: <message> (<hint>)`` and
exits with ``exit_code``; a traceback only with ``RUNNER_POOL_DEBUG=1``.
"""
from __future__ import annotations

from collections.abc import Sequence


class RunnerPoolError(Exception):
    """Base error: ``message`` says what went wrong, ``hint`` how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(RunnerPoolError):
    """Bad input: config, arguments, a missing resource. Nothing was changed."""

    exit_code = 2


class ConfigErrors(ConfigError):
    """Several input problems at once, one line each."""

    def __init__(self, problems: Sequence[str], hint: str = "") -> None:
        super().__init__(f"{len(problems)} problem(s) in the configuration", hint)
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


class AwsError(RunnerPoolError):
    """An AWS call failed after its retries (``code`` is AWS's error code)."""

    def __init__(self, message: str, code: str = "", hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


class CapacityError(RunnerPoolError):
    """EC2 could not supply the instances (after fallback, if allowed)."""

    def __init__(self, message: str, errors_by_code: dict[str, int] | None = None, hint: str = "") -> None:
        super().__init__(message, hint)
        self.errors_by_code = dict(errors_by_code or {})


class ValidationTimeout(RunnerPoolError):
    """Not every instance registered and heartbeated before the deadline."""

    def __init__(self, message: str, ready: Sequence[str], missing: Sequence[str], hint: str = "") -> None:
        super().__init__(message, hint)
        self.ready = list(ready)
        self.missing = list(missing)


class RollbackIncomplete(RunnerPoolError):
    """A rollback could not clean everything; ``leftover_ids`` need reconcile."""

    def __init__(self, message: str, leftover_ids: Sequence[str], hint: str = "run `runner-pool reconcile`") -> None:
        super().__init__(message, hint)
        self.leftover_ids = list(leftover_ids)
