"""Ceilings: ``max_instances`` per resource class and per pool, which races cannot pass.

**What is counted.** Live instances: every instance that exists for the pool,
whatever its row says (created, idle, claimed, running, draining), from the
moment a provision or refresh decides to launch it until its row is marked
``terminated``. Claims do not change the count (the instance exists already);
only launches add to it.

**How races cannot pass it.** Two counter items in the state table, one per
class (``pk=ceiling, sk=class#<C>``) and one for the pool (``sk=pool``), each
with ``live`` (N) and ``version`` (N). Before any CreateFleet, the launcher
*reserves* the instances it is about to ask for with one conditional
UpdateItem per counter: ``ADD live :n`` only if ``live <= max - n``.
DynamoDB applies conditional writes to one item one at a time, so of 20
provisions racing for the last slot exactly one condition holds; the others
fail before launching anything. The class counter is reserved first, then the
pool's; when the pool's refuses, the class reservation is given back. An
instance is therefore counted *before* it exists, and the count can only be
too high for a moment (a reservation CreateFleet did not use is released right
after the call), never too low.

**Release.** The write that marks a row ``terminated`` (the one
:func:`controlplane.state.transition` call that wins, whichever path made
it) is followed by ``ADD live :-1`` on both counters, conditional on
``live >= 1``.

**Correction.** A process that dies between a reservation and its rows, or
between a ``terminated`` mark and its decrement, leaves a counter off.
Reconcile corrects it (:func:`correct`): it reads the rows (its snapshot,
taken at ``now``), then each counter, and sets a counter to the live rows'
count only if the counter was last written before ``now - SETTLE_S`` (nothing
reserved or released while the rows were read, and no reservation made before
is still waiting for its CreateFleet to return and its rows to be written),
conditional on the ``version`` it read (nothing since).

**Fail fast.** :func:`precheck` runs before a provision claims anything: with
the idle runners of the class (which the provision will claim rather than
create) subtracted from its count, a request that cannot fit fails at once
with :class:`CeilingReached` (exit 2). It is a read, so a race can still pass
it; the reservation before launch is what holds, and a provision that loses
there gives back what it claimed before it fails with the same error.

Counters are kept whether or not a ceiling is set, so one set later starts
from the right count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from controlplane import aws
from controlplane.clock import Deadline
from controlplane.config import PoolConfig
from controlplane.errors import AwsError, ConditionFailed, ConfigError
from controlplane.logs import event
from controlplane.records import LIVE_STATES, InstanceRecord, num

CEILING_PK = "ceiling"
POOL_SK = "pool"
READ_RETRY_S = 10
SETTLE_S = 120.0           # a counter untouched this long has no reservation waiting for its rows


def class_sk(resource_class: str) -> str:
    return f"class#{resource_class}"


class CeilingReached(ConfigError):
    """A provision would pass ``max_instances``; nothing was launched (exit 2)."""

    def __init__(self, message: str, hint: str, limit: int, live: int, scope: str) -> None:
        super().__init__(message, hint)
        self.limit, self.live, self.scope = limit, live, scope


@dataclass(frozen=True)
class Counter:
    sk: str
    live: int
    version: int
    updated_at: float


def _key(sk: str) -> dict[str, Any]:
    return {"pk": {"S": CEILING_PK}, "sk": {"S": sk}}


def _limits(cfg: PoolConfig, resource_class: str) -> list[tuple[str, int | None, str]]:
    """(counter sort key, its limit or None, how the error names it), class first."""
    rc = cfg.resource_classes.get(resource_class)
    return [(class_sk(resource_class), rc.max_instances if rc is not None else None,
             f"resource_classes.{resource_class}.max_instances"),
            (POOL_SK, cfg.max_instances, "max_instances")]


def read(cfg: PoolConfig, sks: list[str]) -> dict[str, Counter]:
    """The counters named (absent ones read as 0), consistently."""
    ddb = aws.client("dynamodb", cfg.region)
    out = {sk: Counter(sk, 0, 0, 0.0) for sk in sks}
    pending: dict[str, Any] = {cfg.table_name: {"Keys": [_key(sk) for sk in dict.fromkeys(sks)],
                                                "ConsistentRead": True}}
    deadline = Deadline(READ_RETRY_S)
    while pending:
        with aws.mapped("dynamodb:BatchGetItem ceiling counters"):
            resp = ddb.batch_get_item(RequestItems=pending)
        for item in resp.get("Responses", {}).get(cfg.table_name, []):
            sk = item["sk"]["S"]
            out[sk] = Counter(sk, int(item.get("live", {}).get("N", "0")),
                              int(item.get("version", {}).get("N", "0")),
                              float(item.get("updated_at", {}).get("N", "0")))
        pending = resp.get("UnprocessedKeys") or {}
        if pending and deadline.expired:
            raise AwsError("BatchGetItem kept returning the ceiling counters unprocessed")
        if pending:
            deadline.clock.sleep(0.05)
    return out


def _refusal(cfg: PoolConfig, resource_class: str, name: str, limit: int, live: int, asked: int) -> CeilingReached:
    scope = f"class {resource_class}" if name.startswith("resource_classes.") else f"pool {cfg.name}"
    return CeilingReached(
        f"{scope} is at its ceiling: {name} is {limit}, {live} live, {asked} more would pass it",
        hint=f"release a run, wait for idle runners to expire, or raise {name}",
        limit=limit, live=live, scope=scope)


def precheck(cfg: PoolConfig, resource_class: str, count: int, idle: int) -> None:
    """Fail fast (a read, before any claim) when ``count`` runners, ``idle`` of them claimable, cannot fit."""
    limits = [(sk, limit, name) for sk, limit, name in _limits(cfg, resource_class) if limit is not None]
    if not limits:
        return
    new = max(0, count - idle)
    if new == 0:
        return
    counters = read(cfg, [sk for sk, _, _ in limits])
    for sk, limit, name in limits:
        assert limit is not None
        live = counters[sk].live
        if live + new > limit:
            raise _refusal(cfg, resource_class, name, limit, live, new)


def _add(cfg: PoolConfig, sk: str, n: int, limit: int | None, now: float) -> bool:
    """``live += n`` on one counter; with ``limit``, only if the result stays within it. False if refused."""
    names = {"#l": "live", "#v": "version", "#u": "updated_at"}
    values: dict[str, Any] = {":n": {"N": str(n)}, ":one": {"N": "1"}, ":now": num(now)}
    kwargs: dict[str, Any] = {}
    if limit is not None and n > 0:
        values[":room"] = {"N": str(limit - n)}
        kwargs["ConditionExpression"] = "attribute_not_exists(#l) OR #l <= :room"
    elif n < 0:
        values[":need"] = {"N": str(-n)}
        kwargs["ConditionExpression"] = "#l >= :need"
    try:
        with aws.mapped(f"dynamodb:UpdateItem ceiling counter {sk}"):
            aws.client("dynamodb", cfg.region).update_item(
                TableName=cfg.table_name, Key=_key(sk), UpdateExpression="ADD #l :n, #v :one SET #u = :now",
                ExpressionAttributeNames=names, ExpressionAttributeValues=values, **kwargs)
    except ConditionFailed:
        return False
    return True


def reserve(cfg: PoolConfig, resource_class: str, n: int, now: float | None = None) -> None:
    """Count ``n`` instances about to be launched, or raise :class:`CeilingReached` having counted none."""
    if n <= 0:
        return
    now = time.time() if now is None else now
    done: list[str] = []
    for sk, limit, name in _limits(cfg, resource_class):
        if limit is not None and n > limit:
            _undo(cfg, done, n, now)
            raise _refusal(cfg, resource_class, name, limit, read(cfg, [sk])[sk].live, n)
        if not _add(cfg, sk, n, limit, now):
            _undo(cfg, done, n, now)
            assert limit is not None
            raise _refusal(cfg, resource_class, name, limit, read(cfg, [sk])[sk].live, n)
        done.append(sk)
    event("ceiling.reserved", pool=cfg.name, resource_class=resource_class, count=n)


def room(cfg: PoolConfig, resource_class: str) -> int | None:
    """How many more instances the class may launch now (None: no ceiling applies)."""
    limits = [(sk, limit) for sk, limit, _ in _limits(cfg, resource_class) if limit is not None]
    if not limits:
        return None
    counters = read(cfg, [sk for sk, _ in limits])
    return max(0, min(limit - counters[sk].live for sk, limit in limits if limit is not None))


def _undo(cfg: PoolConfig, sks: list[str], n: int, now: float) -> None:
    for sk in sks:
        _add(cfg, sk, -n, None, now)


def release(cfg: PoolConfig, resource_class: str, n: int, now: float | None = None) -> None:
    """Give back ``n`` counted instances: reserved but not launched, or marked terminated."""
    if n <= 0:
        return
    now = time.time() if now is None else now
    for sk, _, _ in _limits(cfg, resource_class):
        if not _add(cfg, sk, -n, None, now):
            event("ceiling.release_below_zero", pool=cfg.name, counter=sk, count=n)


def count_terminated(table: str, region: str, resource_class: str, now: float) -> None:
    """Called once per row that a won transition marked terminated: that instance no longer counts.

    Best effort: a failure here leaves the counter high (safe), and reconcile corrects it.
    """
    for sk in (class_sk(resource_class), POOL_SK):
        names = {"#l": "live", "#v": "version", "#u": "updated_at"}
        values = {":n": {"N": "-1"}, ":one": {"N": "1"}, ":now": num(now)}
        try:
            with aws.mapped(f"dynamodb:UpdateItem ceiling counter {sk}"):
                aws.client("dynamodb", region).update_item(
                    TableName=table, Key=_key(sk), UpdateExpression="ADD #l :n, #v :one SET #u = :now",
                    ConditionExpression="#l >= :one", ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values)
        except ConditionFailed:
            pass                                   # already 0: reconcile's count is the truth
        except AwsError as exc:                    # counted again by reconcile
            event("ceiling.release_failed", table=table, counter=sk, error=str(exc))


def live_counts(records: list[InstanceRecord]) -> dict[str, int]:
    """Live rows per counter sort key (each class's and the pool's)."""
    out: dict[str, int] = {POOL_SK: 0}
    for r in records:
        if r.state in LIVE_STATES:
            out[class_sk(r.resource_class)] = out.get(class_sk(r.resource_class), 0) + 1
            out[POOL_SK] += 1
    return out


def correct(cfg: PoolConfig, before: dict[str, Counter], records: list[InstanceRecord], now: float,
            dry_run: bool = False) -> dict[str, tuple[int, int]]:
    """Set counters that drifted to the live rows' count; ``before`` was read after ``records``,
    which were read from ``now`` on.

    Returns ``{sk: (was, now)}`` for each counter corrected (or, dry, that would be).
    """
    actual = live_counts(records)
    for sk in before:
        actual.setdefault(sk, 0)
    fixed: dict[str, tuple[int, int]] = {}
    ddb = aws.client("dynamodb", cfg.region)
    for sk, want in sorted(actual.items()):
        c = before.get(sk, Counter(sk, 0, 0, 0.0))
        if c.live == want or now - c.updated_at < SETTLE_S:
            continue
        if dry_run:
            fixed[sk] = (c.live, want)
            continue
        cond = "#v = :v" if c.version else "attribute_not_exists(#v)"
        values: dict[str, Any] = {":want": {"N": str(want)}, ":one": {"N": "1"}, ":now": num(now)}
        if c.version:
            values[":v"] = {"N": str(c.version)}
        try:
            with aws.mapped(f"dynamodb:UpdateItem ceiling counter {sk}"):
                ddb.update_item(TableName=cfg.table_name, Key=_key(sk),
                                UpdateExpression="SET #l = :want, #u = :now ADD #v :one", ConditionExpression=cond,
                                ExpressionAttributeNames={"#l": "live", "#v": "version", "#u": "updated_at"},
                                ExpressionAttributeValues=values)
        except ConditionFailed:
            continue                               # it moved meanwhile: the next reconcile looks again
        fixed[sk] = (c.live, want)
    if fixed:
        event("ceiling.corrected", pool=cfg.name, counters={k: {"was": a, "now": b} for k, (a, b) in fixed.items()})
    return fixed


def counter_keys(cfg: PoolConfig, extra_classes: list[str] | None = None) -> list[str]:
    return [POOL_SK] + [class_sk(c) for c in sorted({*cfg.resource_classes, *(extra_classes or [])})]
