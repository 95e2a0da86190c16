"""What every runner-pool dynamic provider shares: parsing props, checks, errors.

A provider here is thin: it parses its props into the controlplane model,
calls one controlplane function and returns outputs. This module holds the
parts that would otherwise be repeated, and the rules Pulumi imposes on all of
them (see ``notes/pulumi.md``):

* **Pickled by reference.** Pulumi dill-pickles the provider object into the
  ``__provider`` property. Provider classes live in this importable package
  (never in ``__main__.py``) and keep no instance state at all -- no boto3 or
  GitHub client, lock or session -- so the pickle is the class's module path
  and name only: stable across code edits, and ``destroy`` runs the code that
  is installed now. Renaming or moving a provider class breaks existing
  stacks: leave an import alias behind.
* **Numbers come back as floats.** The engine stores numbers as doubles, so
  ``count=2`` returns as ``2.0`` in ``olds``, in ``Update`` and in nested
  dicts. :func:`whole_numbers` turns integral floats back into ints before
  anything is parsed or compared.
* **Diff sees outputs.** ``olds`` in ``diff``/``update``/``delete`` are the
  previous *outputs*, so every ``create``/``update`` returns its inputs plus
  what it computed (:func:`outputs`).
* **Unknowns during preview.** ``check`` and ``diff`` run during preview with
  :class:`pulumi.output.Unknown` for values not known yet; checks skip them
  and a diff over them says "changed".
* **Errors read like the CLI's.** :func:`mapped_errors` turns a
  :class:`~controlplane.errors.RunnerPoolError` into :class:`ProviderError`
  whose message is ``<what failed>: <message> (<hint>)``; the engine prints it
  under the resource. The controlplane traceback is dropped unless
  ``RUNNER_POOL_DEBUG`` is set.
* **Thread-safe.** One provider host serves up to four calls at once; there
  is no shared mutable state to protect.
* **Credentials from the environment.** ``pulumi.Config()`` sees nothing in
  the provider host; AWS credentials and ``RUNNER_POOL_GITHUB_TOKEN`` come from
  the environment of ``pulumi up``, and are never inputs or outputs.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pulumi.dynamic import CheckFailure, CheckResult, DiffResult, ResourceProvider
from pulumi.output import Unknown
from pulumi.runtime.rpc import UNKNOWN as UNKNOWN_WIRE  # an unknown value as the engine sends it

from controlplane import logs
from controlplane.config import PoolConfig, parse_config, with_env_overrides
from controlplane.errors import ConfigError, ConfigErrors, RunnerPoolError

PROVIDER_KEY = "__provider"


def _in_provider_host() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and str(spec.name).startswith("pulumi.dynamic")


# Inside the provider host (``python -m pulumi.dynamic``) nothing else sets up logging: configure it as
# the CLI does, so every operation's structured line (run id, instance ids) reaches stderr, which
# ``pulumi`` shows. ``RUNNER_POOL_LOG_LEVEL`` / ``RUNNER_POOL_LOG_FORMAT`` apply as for the CLI.
if _in_provider_host():
    logs.configure()


class ProviderError(Exception):
    """A controlplane failure as Pulumi shows it: one message, with the hint."""


# ---------------------------------------------------------------- values


def is_unknown(value: Any) -> bool:
    return isinstance(value, Unknown) or (isinstance(value, str) and value == UNKNOWN_WIRE)


def contains_unknown(value: Any) -> bool:
    if is_unknown(value):
        return True
    if isinstance(value, Mapping):
        return any(contains_unknown(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains_unknown(v) for v in value)
    return False


def whole_numbers(value: Any) -> Any:
    """Integral floats (how the engine returns every number) back to ints, recursively."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [whole_numbers(v) for v in value]
    return value


def as_int(value: Any, name: str) -> int:
    """An integer input; ``2.0`` is 2, ``2.5``, ``"2"`` and ``True`` are errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def pool_config(raw: Any) -> PoolConfig:
    """The ``pool`` input (camelCase or snake_case keys) as a validated :class:`PoolConfig`.

    ``RUNNER_POOL_GITHUB_URL``/``..._API_URL`` apply as they do for the CLI
    (``runner-pool local env`` sets them for the GitHub stand-in).
    """
    return with_env_overrides(parse_config(whole_numbers(raw), "input pool"))


def pool_identity(raw: Any) -> tuple[Any, Any]:
    """What names a pool's AWS resources: a change of either replaces them."""
    raw = raw if isinstance(raw, Mapping) else {}
    return raw.get("name"), raw.get("region", PoolConfig.model_fields["region"].default)


def outputs(props: Mapping[str, Any], **computed: Any) -> dict[str, Any]:
    """Inputs plus computed outputs (``diff`` gets these back as ``olds``)."""
    out = {k: v for k, v in props.items() if k != PROVIDER_KEY}
    out.update(computed)
    return out


# ---------------------------------------------------------------- errors


@contextmanager
def mapped_errors(doing: str) -> Iterator[None]:
    """Re-raise controlplane errors as :class:`ProviderError` ``<doing>: <message> (<hint>)``."""
    debug = bool(os.environ.get("RUNNER_POOL_DEBUG"))
    try:
        yield
    except ConfigErrors as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise ProviderError(f"{doing}: " + "; ".join(exc.problems) + hint) from (exc if debug else None)
    except RunnerPoolError as exc:
        raise ProviderError(f"{doing}: {exc}") from (exc if debug else None)


# ---------------------------------------------------------------- checks


def check_pool(news: Mapping[str, Any], key: str = "pool") -> tuple[PoolConfig | None, list[CheckFailure]]:
    """Parse the pool input; one failure per problem, each naming the field."""
    raw = news.get(key)
    if raw is None:
        return None, [CheckFailure(key, f"{key} is required: the pool config (name, github, resourceClasses, ...)")]
    if contains_unknown(raw):
        return None, []
    try:
        return pool_config(raw), []
    except ConfigErrors as exc:
        return None, [CheckFailure(key, f"{key}.{line}") for line in exc.problems]
    except ConfigError as exc:
        return None, [CheckFailure(key, str(exc))]


def check_int(news: Mapping[str, Any], key: str, minimum: int, maximum: int) -> list[CheckFailure]:
    value = news.get(key)
    if is_unknown(value):
        return []
    if value is None:
        return [CheckFailure(key, f"{key} is required: a whole number from {minimum} to {maximum}")]
    try:
        n = as_int(value, key)
    except (TypeError, ValueError) as exc:
        return [CheckFailure(key, str(exc))]
    if not minimum <= n <= maximum:
        return [CheckFailure(key, f"{key} must be from {minimum} to {maximum}, got {n}")]
    return []


def check_pattern(news: Mapping[str, Any], key: str, pattern: str | re.Pattern[str], what: str,
                  required: bool = True) -> list[CheckFailure]:
    value = news.get(key)
    if is_unknown(value):
        return []
    if value is None:
        return [CheckFailure(key, f"{key} is required: {what}")] if required else []
    if not isinstance(value, str) or not re.match(pattern, value):
        return [CheckFailure(key, f"{key} {value!r} is not valid: {what}")]
    return []


def check_choice(news: Mapping[str, Any], key: str, choices: Sequence[str],
                 required: bool = True) -> list[CheckFailure]:
    value = news.get(key)
    if is_unknown(value):
        return []
    if value is None:
        return [CheckFailure(key, f"{key} is required: one of {', '.join(choices)}")] if required else []
    if value not in choices:
        return [CheckFailure(key, f"{key} {value!r} is not valid: use one of {', '.join(choices)}")]
    return []


def changed(olds: Mapping[str, Any], news: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """The keys whose value differs (numbers compared as numbers; unknown counts as changed)."""
    out = []
    for k in keys:
        old, new = olds.get(k), news.get(k)
        if contains_unknown(new) or whole_numbers(old) != whole_numbers(new):
            out.append(k)
    return out


# ---------------------------------------------------------------- base provider


class PoolResourceProvider(ResourceProvider):
    """Base of the providers whose input is the pool config dict (``pool``).

    Subclasses implement ``create``/``update``/``delete``/``read`` over the
    parsed config and may extend :meth:`check_more` and :meth:`needs_update`.
    A change of the pool's name or region replaces the resource (every AWS
    name derives from them); :attr:`replace_keys` names further inputs that do.
    """

    # Nothing secret is pickled (the instance has no attributes), so the
    # serialized provider need not be a secret (notes/pulumi.md §2.6).
    serialize_as_secret_always = False
    replace_keys: tuple[str, ...] = ()

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        cfg, failures = check_pool(news)
        if cfg is not None:
            failures += self.check_more(cfg, news)
        return CheckResult(news, failures)

    def check_more(self, cfg: PoolConfig, news: Mapping[str, Any]) -> list[CheckFailure]:
        return []

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = changed(olds, news, self.replace_keys)
        if contains_unknown(news.get("pool")):
            return DiffResult(changes=True, replaces=replaces)
        if pool_identity(olds.get("pool")) != pool_identity(news.get("pool")):
            replaces.append("pool")
        if replaces:
            return DiffResult(changes=True, replaces=replaces, delete_before_replace=False)
        # A new owner (the resource renamed with `aliases`, or first seen by this version) re-tags in place.
        return DiffResult(changes=bool(changed(olds, news, ("owner",))) or self.needs_update(olds, news),
                          replaces=[])

    def needs_update(self, olds: Mapping[str, Any], news: Mapping[str, Any]) -> bool:
        """Whether an in-place update is due; default: the parsed config changed."""
        return not same_config(olds.get("pool"), news.get("pool"))


def owner_of(props: Mapping[str, Any]) -> str | None:
    """The ``owner`` input (``<org>/<project>/<stack>/<name>``), or None when the caller gave none."""
    value = props.get("owner")
    return value if isinstance(value, str) and value else None


def same_config(old: Any, new: Any) -> bool:
    """Equal as configs (camelCase vs snake_case and 2 vs 2.0 do not matter)."""
    try:
        return pool_config(old) == pool_config(new)
    except RunnerPoolError:
        return bool(whole_numbers(old) == whole_numbers(new))
