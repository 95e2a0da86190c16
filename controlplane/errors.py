"""Errors users see: a message and a hint, mapped to exit codes by the CLI.

Every failure a user can act on is one of these. botocore errors are mapped
once, in :mod:`controlplane.aws`, and chained (``raise ... from``) so a debug
run still shows the original. The CLI prints ``error: <message> (<hint>)`` and
exits with ``exit_code``; a traceback only with ``RUNNER_POOL_DEBUG=1``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class RunnerPoolError(Exception):
    """Base error: ``message`` says what went wrong, ``hint`` how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def add_detail(self, detail: str) -> None:
        """Say what was done about it (e.g. an emergency cleanup) after the message, before the hint."""
        self.message = f"{self.message}; {detail}"


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
    """An AWS call failed after its retries (``code`` is AWS's error code).

    :mod:`controlplane.aws` raises one of the children below when the code
    says what happened, so callers branch on a class, never on a code string.
    """

    def __init__(self, message: str, code: str = "", hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


class NotFound(AwsError):
    """The resource (table, queue, parameter, launch template, instance id) does not exist."""


class AlreadyExists(AwsError):
    """The resource to create exists already (often: created concurrently)."""


class ConditionFailed(AwsError):
    """A conditional write lost; ``item`` is the row as it is now (wire format), when AWS returned it."""

    def __init__(self, message: str, code: str = "", hint: str = "",
                 item: dict[str, Any] | None = None) -> None:
        super().__init__(message, code, hint)
        self.item = item


class Throttled(AwsError):
    """AWS kept throttling the call past the client's retries."""


class Unreachable(AwsError):
    """The SDK could not talk to AWS at all (endpoint, network, credentials); ``detail`` is the SDK's words."""

    def __init__(self, message: str, detail: str, code: str = "", hint: str = "") -> None:
        super().__init__(message, code, hint)
        self.detail = detail


class ProvisionFailure(RunnerPoolError):
    """Why a provision rolled back, as data: the result carries one, the CLI and the provider render it."""


class CapacityError(ProvisionFailure):
    """EC2 could not supply ``shortfall`` of ``requested`` instances (after fallback, if allowed)."""

    def __init__(self, shortfall: int, requested: int, errors_by_code: Mapping[str, int] | None = None,
                 fell_back: bool = False) -> None:
        self.shortfall, self.requested, self.fell_back = shortfall, requested, fell_back
        self.errors_by_code = dict(errors_by_code or {})
        codes = ", ".join(f"{k} x{v}" for k, v in sorted(self.errors_by_code.items())) or "no error given"
        super().__init__(f"EC2 could not supply {shortfall} of {requested} instance(s) ({codes})"
                         + ("; on-demand fallback was tried" if fell_back else ""))


class ValidationTimeout(ProvisionFailure):
    """Not every instance registered and heartbeated before the deadline."""

    def __init__(self, ready: Sequence[str], missing: Sequence[str], timeout_s: float) -> None:
        self.ready, self.missing, self.timeout_s = list(ready), list(missing), timeout_s
        n = len(self.ready) + len(self.missing)
        super().__init__(f"only {len(self.ready)} of {n} runner(s) registered within {timeout_s:.0f} s "
                         f"({len(self.missing)} missing)")


class ValidationFailed(ProvisionFailure):
    """Some instances failed validation: ``failed`` maps each to why (a signal, a stopped heartbeat)."""

    def __init__(self, failed: Mapping[str, str], total: int) -> None:
        self.failed, self.total = dict(failed), total
        first = sorted(self.failed.items())[:3]
        super().__init__(f"{len(self.failed)} of {total} runner(s) failed validation: "
                         + "; ".join(f"{i}: {why}" for i, why in first))


class CommitRaced(ProvisionFailure):
    """Rows changed state between validation and commit (``lost``): the set was given back."""

    def __init__(self, lost: Sequence[str]) -> None:
        self.lost = list(lost)
        super().__init__(f"{len(self.lost)} instance(s) changed state before commit ({', '.join(self.lost)})")


class RollbackIncomplete(RunnerPoolError):
    """A rollback could not clean everything; ``leftover_ids`` need reconcile."""

    def __init__(self, message: str, leftover_ids: Sequence[str], hint: str = "run `runner-pool reconcile`") -> None:
        super().__init__(message, hint)
        self.leftover_ids = list(leftover_ids)
