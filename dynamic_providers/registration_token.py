"""``RegistrationToken``: the pool's GitHub runner tokens in SSM SecureString.

Inputs: ``pool`` (the pool config dict). Outputs: ``parameterName`` and
``expiresAt`` (epoch seconds), nothing else: the tokens live in SSM only.

* create / update -> :func:`controlplane.token.ensure_tokens` with a GitHub
  client from ``RUNNER_POOL_GITHUB_TOKEN`` (or ``GITHUB_TOKEN``) in the
  environment of ``pulumi up``. Update forces new tokens when the GitHub
  scope or API URL changed; otherwise it rotates only inside the margin.
* diff -> an update when :func:`controlplane.token.read_tokens` finds the
  parameter missing or with less than ``tokenRefreshMarginS`` of its hour
  left, so any ``pulumi up`` near expiry rotates it (the scheduled
  ``runner-pool refresh`` does the same between runs); a change of pool name
  or region replaces it.
* delete -> :func:`controlplane.token.delete_tokens` ("not found" is
  success); read -> the parameter exists, with its expiry.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi.dynamic
from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from controlplane import token
from controlplane.config import PoolConfig
from controlplane.errors import RunnerPoolError
from controlplane.github import github_client_from_env
from dynamic_providers import _base


def rescoped(old_pool: Any, cfg: PoolConfig) -> bool:
    """True when the tokens were made for another GitHub scope or API (old outputs' ``pool``)."""
    try:
        old = _base.pool_config(old_pool)
    except RunnerPoolError:
        return True
    return (old.github.scope, old.github.api_url) != (cfg.github.scope, cfg.github.api_url)


def ensure(cfg: PoolConfig, force: bool = False) -> dict[str, Any]:
    """Fresh tokens in SSM; returns the outputs (never the tokens)."""
    gh = github_client_from_env(cfg.github.api_url, cfg.github.scope)
    tokens, _ = token.ensure_tokens(cfg, gh, force=force)
    return {"parameterName": cfg.token_parameter, "expiresAt": int(tokens.expires_at)}


def near_expiry(cfg: PoolConfig, now: float | None = None) -> bool:
    """True when the stored tokens are missing or have less than the margin left."""
    stored = token.read_tokens(cfg)
    now = time.time() if now is None else now
    return stored is None or stored.seconds_left(now) <= cfg.token_refresh_margin_s


class RegistrationTokenProvider(_base.PoolResourceProvider):
    def needs_update(self, olds: Mapping[str, Any], news: Mapping[str, Any]) -> bool:
        try:
            cfg = _base.pool_config(news["pool"])
        except RunnerPoolError:
            return True                                     # update reports the problem
        if rescoped(olds.get("pool"), cfg):
            return True
        with _base.mapped_errors(f"read runner tokens {cfg.token_parameter}"):
            return near_expiry(cfg)

    def create(self, props: dict[str, Any]) -> CreateResult:
        with _base.mapped_errors("runner tokens"):
            cfg = _base.pool_config(props["pool"])
            outs = ensure(cfg)
        return CreateResult(cfg.token_parameter, _base.outputs(props, **outs))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        with _base.mapped_errors("runner tokens"):
            cfg = _base.pool_config(news["pool"])
            outs = ensure(cfg, force=rescoped(olds.get("pool"), cfg))
        return UpdateResult(_base.outputs(news, **outs))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with _base.mapped_errors(f"read runner tokens {id_}"):
            stored = token.read_tokens(_base.pool_config(props["pool"]))
        if stored is None:
            return ReadResult("", {})
        return ReadResult(id_, _base.outputs(props, expiresAt=int(stored.expires_at)))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with _base.mapped_errors(f"delete runner tokens {id_}"):
            token.delete_tokens(_base.pool_config(props["pool"]))


class RegistrationTokenArgs:
    """Inputs of :class:`RegistrationToken`."""

    def __init__(self, pool: pulumi.Input[dict[str, Any]]) -> None:
        self.pool = pool


class RegistrationToken(pulumi.dynamic.Resource, module="runnerpool", name="RegistrationToken"):
    parameterName: pulumi.Output[str]
    expiresAt: pulumi.Output[int]

    def __init__(self, name: str, args: RegistrationTokenArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(RegistrationTokenProvider(), name, {
            "pool": args.pool,
            "parameterName": None, "expiresAt": None,
        }, opts)
