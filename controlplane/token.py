"""The pool's runner registration token in SSM Parameter Store (SecureString).

A GitHub registration token lasts one hour. The pool keeps it in one
SecureString parameter as JSON ``{"registration", "expires_at"}``; only the
control plane reads and writes it: instances have no SSM permission at all.
A provision reads it and hands it to exactly the instances that must
register, through each one's own state row, and the commit or rollback
removes it from those rows (see docs/architecture.md, "Runner credentials").
There is no removal token any more: the control plane removes runners with
the REST API (``DELETE .../actions/runners/{id}``). Tokens never appear in
user data, logs, stack outputs, or a state row past commit.
:func:`ensure_tokens` rotates the token when less than
``token_refresh_margin_s`` of its life is left.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from controlplane import aws
from controlplane.config import PoolConfig
from controlplane.github import GitHubClient


@dataclass(frozen=True)
class StoredTokens:
    registration: str
    expires_at: float

    def __repr__(self) -> str:
        return f"StoredTokens(expires_at={self.expires_at:.0f}, registration=***)"

    def seconds_left(self, now: float) -> float:
        return self.expires_at - now


def read_tokens(cfg: PoolConfig) -> StoredTokens | None:
    ssm = aws.client("ssm", cfg.region)
    try:
        with aws.mapped(f"ssm:GetParameter {cfg.token_parameter}"):
            value = ssm.get_parameter(Name=cfg.token_parameter, WithDecryption=True)["Parameter"]["Value"]
    except aws.NotFound:
        return None
    try:
        data = json.loads(value)
        return StoredTokens(str(data["registration"]), float(data["expires_at"]))
    except (ValueError, KeyError, TypeError):
        return None


def write_tokens(cfg: PoolConfig, tokens: StoredTokens) -> None:
    ssm = aws.client("ssm", cfg.region)
    value = json.dumps({"registration": tokens.registration, "expires_at": tokens.expires_at})
    with aws.mapped(f"ssm:PutParameter {cfg.token_parameter}"):
        ssm.put_parameter(Name=cfg.token_parameter, Value=value, Type="SecureString", Overwrite=True,
                          Description=f"GitHub runner registration token of runner-pool {cfg.name} "
                                      "(rotated by refresh and provision)")


def delete_tokens(cfg: PoolConfig) -> None:
    ssm = aws.client("ssm", cfg.region)
    try:
        with aws.mapped("ssm:DeleteParameter"):
            ssm.delete_parameter(Name=cfg.token_parameter)
    except aws.NotFound:
        pass


def ensure_tokens(cfg: PoolConfig, github: GitHubClient, now: float | None = None,
                  force: bool = False) -> tuple[StoredTokens, bool]:
    """A fresh token in SSM; returns (tokens, rotated). Rotates inside the margin."""
    now = time.time() if now is None else now
    current = read_tokens(cfg)
    if not force and current is not None and current.seconds_left(now) > cfg.token_refresh_margin_s:
        return current, False
    reg = github.registration_token()
    tokens = StoredTokens(reg.token, reg.expires_at)
    write_tokens(cfg, tokens)
    return tokens, True
