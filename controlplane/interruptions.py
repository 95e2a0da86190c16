"""Spot interruptions: counted per class, and the circuit breaker they drive.

An agent that sees EC2's spot interruption notice (``spot/instance-action``)
or a rebalance recommendation in IMDS stops its runner and signals
``interrupted`` (controlplane/agent/agent.py). Whoever meets that signal --
validation, selection's health check, release, refresh's sweep -- treats the
instance as unhealthy (it is terminated, its runner removed from GitHub) and
calls :func:`record`, which writes one item per interrupted instance:

    pk = ``interruption#<class>``, sk = ``<instance-id>``, ``at`` (epoch), ``expires_at`` (TTL)

One item per instance makes recording idempotent (validation and the
rollback that follows may both see the same instance). The breaker is a pure
function of those times (:func:`breaker_state`): when ``spot_breaker.
interruptions`` of them fall within ``spot_breaker.window_s``, the class's
new creations go on-demand until ``cooldown_s`` after the one that tripped
it. Claiming from the pool is unaffected: those runners exist already.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controlplane import aws
from controlplane.logs import event
from controlplane.records import num
from controlplane.store import Pool

PREFIX = "interruption#"
STATUS_WINDOW_S = 3600        # `runner-pool status`: interruptions in the last hour


@dataclass(frozen=True)
class Breaker:
    open: bool
    count: int                # interruptions within the window, now
    until: float              # epoch until which creations go on-demand (0: never tripped)


def breaker_state(times: list[float], now: float, threshold: int, window_s: float, cooldown_s: float) -> Breaker:
    """Open while some ``threshold`` interruptions within ``window_s`` of each other ended less than
    ``cooldown_s`` ago. No I/O."""
    ts = sorted(t for t in times if t <= now)
    until = 0.0
    for i in range(threshold - 1, len(ts)):
        if ts[i] - ts[i - threshold + 1] <= window_s:
            until = max(until, ts[i] + cooldown_s)
    count = sum(1 for t in ts if t >= now - window_s)
    return Breaker(until > now, count, until)


def record(pool: Pool, classes: Mapping[str, str], now: float) -> None:
    """Count each interrupted instance (``instance id -> class``) once."""
    if not classes:
        return
    cfg = pool.config.spot_breaker
    keep_s = cfg.window_s + cfg.cooldown_s + STATUS_WINDOW_S
    ddb = aws.client("dynamodb", pool.region)

    def one(item: tuple[str, str]) -> None:
        iid, cls = item
        try:
            with aws.mapped("dynamodb:PutItem interruption"):
                ddb.put_item(TableName=pool.table, Item={
                    "pk": {"S": PREFIX + cls}, "sk": {"S": iid}, "at": num(now), "expires_at": num(now + keep_s)},
                    ConditionExpression="attribute_not_exists(pk)")
        except aws.ConditionFailed:
            pass                                    # counted already

    aws.parallel(one, sorted(classes.items()))
    event("interruptions.recorded", pool=pool.name, instance_ids=sorted(classes),
          classes=sorted(set(classes.values())))


def times(pool: Pool, resource_class: str, since: float) -> list[float]:
    """When the class's instances were interrupted, from ``since`` on (one Query, every page)."""
    ddb = aws.client("dynamodb", pool.region)
    out: list[float] = []
    kwargs = {"TableName": pool.table, "KeyConditionExpression": "pk = :p", "FilterExpression": "#a >= :s",
              "ExpressionAttributeNames": {"#a": "at"},
              "ExpressionAttributeValues": {":p": {"S": PREFIX + resource_class}, ":s": num(since)}}
    with aws.mapped("dynamodb:Query interruptions"):
        for page in ddb.get_paginator("query").paginate(**kwargs):
            out += [float(i["at"]["N"]) for i in page["Items"] if "N" in i.get("at", {})]
    return out


def breaker(pool: Pool, resource_class: str, now: float) -> Breaker:
    cfg = pool.config.spot_breaker
    since = now - cfg.window_s - cfg.cooldown_s
    return breaker_state(times(pool, resource_class, since), now, cfg.interruptions, cfg.window_s, cfg.cooldown_s)


def last_hour(pool: Pool, now: float) -> dict[str, int]:
    """Interruptions in the last hour per configured class (for ``runner-pool status``)."""
    return {cls: len(times(pool, cls, now - STATUS_WINDOW_S)) for cls in sorted(pool.config.resource_classes)}
