"""The instance state machine: the transition table and its only writer.

Every change of the ``state`` attribute goes through :func:`transition`
(``transition(pool, instance_id, from_=, to=, expect_run=, set_run=, now=)``),
which is one conditional UpdateItem naming the state it leaves, the run it
expects, and the run it sets; the threshold it sets follows from ``to``
(:func:`threshold_for`). Losing a race (another provision claimed the row,
refresh expired it, release already moved it) is a normal outcome and comes
back as a :class:`Transition` with ``won=False`` and the row as it is now,
never as an exception.

Thresholds are deadlines of the current state, in epoch seconds:
created/claimed -> ``claim_timeout_s``; running -> ``max_runtime_s``;
draining -> ``deregistration_timeout_s``; idle -> ``idle_time_s``; stopped ->
the class's ``stopped_time_s``; terminated
-> now, with ``expires_at`` so DynamoDB's TTL removes the row later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from controlplane import aws, ceilings
from controlplane.records import REGISTRATION_ATTRIBUTES, STATE_SK, InstanceRecord, State, num

if TYPE_CHECKING:
    from controlplane.config import PoolConfig
    from controlplane.store import Pool

# (from, to): why the edge exists. Anything not listed is refused before any call.
TRANSITIONS: dict[tuple[State, State], str] = {
    (State.CREATED, State.RUNNING): "validation passed for a created instance: commit it to its run",
    (State.CREATED, State.IDLE): "warm top-up: an instance refresh created for no run is up; into the pool",
    (State.IDLE, State.CLAIMED): "a provision claims an idle runner from the pool (one winner)",
    (State.CLAIMED, State.RUNNING): "validation passed for a claimed instance: commit it to its run",
    (State.CLAIMED, State.DRAINING): "provision rolled back: clear the run, wait for the agent to deregister",
    (State.RUNNING, State.DRAINING): "release: clear the run, wait for the agent to deregister",
    (State.DRAINING, State.IDLE): "the agent confirmed deregistration: back in the pool",
    (State.IDLE, State.STOPPED): "idle past its threshold in a class with a stopped tier: refresh stops it",
    (State.STOPPED, State.CLAIMED): "a provision claims a stopped runner (one winner), then starts it",
    (State.RUNNING, State.IDLE): "release of a listening runner: its run labels removed, still registered",
    (State.CLAIMED, State.IDLE): "rollback of a relabelled runner: its run labels removed, still registered",
    (State.CREATED, State.TERMINATED): "created but not accepted (validation failed, or past its deadline)",
    (State.IDLE, State.TERMINATED): "idle past its threshold, reuse cap or lifetime reached, or class removed",
    (State.CLAIMED, State.TERMINATED): "claimed but unhealthy, or past its deadline (provisioner died)",
    (State.RUNNING, State.TERMINATED): "past max runtime, or its instance is gone",
    (State.DRAINING, State.TERMINATED): "the agent did not confirm deregistration in time",
    (State.STOPPED, State.TERMINATED): "stopped past stopped_time_s or its lifetime, class removed, or EC2 "
                                       "refused to stop or start it",
}

TERMINATED_RETENTION_S = 86400   # terminated rows stay a day for status/audit, then TTL removes them

When = Literal["unexpired", "expired", "any"]


@dataclass(frozen=True)
class Transition:
    won: bool
    record: InstanceRecord | None      # the row after the write, or as it is now when the race was lost
    reason: str = ""

    @property
    def lost(self) -> bool:
        return not self.won


class Keep:
    """Marker for ``set_run``: leave the row's run as it is."""


KEEP = Keep()


def threshold_for(cfg: PoolConfig, to: State, now: float) -> float:
    """The deadline a row gets on entering ``to`` (see the module docstring)."""
    ahead = {State.CREATED: cfg.claim_timeout_s, State.CLAIMED: cfg.claim_timeout_s,
             State.RUNNING: cfg.max_runtime_s, State.DRAINING: cfg.deregistration_timeout_s,
             State.IDLE: cfg.idle_time_s}.get(to, 0.0)
    return now + ahead


def transition(
    pool: Pool,
    instance_id: str,
    *,
    from_: State,
    to: State,
    expect_run: str | None,
    now: float,
    set_run: str | None | Keep = KEEP,
    when: When = "unexpired",
    count_reuse: bool = False,
    registration: dict[str, str] | None = None,
    threshold: float | None = None,
) -> Transition:
    """Move one row ``from_`` -> ``to`` if it is still in ``from_`` and belongs to ``expect_run``.

    ``expect_run=None`` expects the row to belong to no run. ``set_run`` sets
    (str), clears (None) or keeps (KEEP) the run; clearing remembers it in
    ``last_run_id``. The new threshold is :func:`threshold_for` ``to``.
    ``threshold`` overrides it where the deadline is the class's, not the pool's (``stopped``:
    the class's ``stopped_time_s``). ``when`` adds a condition on the current threshold. ``registration``
    (only into ``claimed``) sets what the agent needs to register its runner;
    every transition removes whatever of it it does not set, so commit,
    rollback and termination all take it away.
    """
    request = _request(pool, instance_id, from_=from_, to=to, expect_run=expect_run, now=now, set_run=set_run,
                       when=when, count_reuse=count_reuse, registration=registration, threshold=threshold)
    arn = pool.arn(instance_id)
    try:
        item = aws.conditional_update(pool.region, **request, doing=f"dynamodb:UpdateItem {from_}->{to} on {arn}")
    except aws.ConditionFailed as exc:
        current = InstanceRecord.from_item(exc.item) if exc.item else None
        if current is not None and _landed_already(current, to, expect_run, set_run, now):
            return _won(pool, to, current, now)
        return Transition(False, current, _why_lost(current, from_, expect_run, now, when))
    return _won(pool, to, InstanceRecord.from_item(item), now)


@dataclass(frozen=True)
class Move:
    """One row of :func:`transition_together`: the row, the state it leaves, whether it counts a reuse."""

    instance_id: str
    from_: State
    count_reuse: bool = False


def transition_together(pool: Pool, moves: list[Move], *, to: State, expect_run: str | None, now: float,
                        set_run: str | None | Keep = KEEP,
                        registration: dict[str, str] | None = None) -> dict[str, Transition]:
    """Move every row to ``to`` in transactions of up to 100 rows; the writes that lost, by instance id.

    Each row's Update is exactly :func:`transition`'s (same conditions, unexpired, same
    ``registration``). A transaction lands whole or not at all; a cancelled one (some row moved
    on, a conflicting write) is retried row by row with :func:`transition`, which says which rows
    lost and why, and counts as won a row a resend of ours had already written. So the outcome is
    the per-row one, in one call per 100 rows when nothing raced. Not for ``terminated``: those
    writes also move the class's ceiling counters (use :func:`transition`).
    """
    if to is State.TERMINATED:
        raise ValueError("a transition into terminated counts against the ceilings: use transition()")
    kw: dict[str, Any] = {"to": to, "expect_run": expect_run, "now": now, "set_run": set_run,
                          "registration": registration}
    requests = [_request(pool, m.instance_id, from_=m.from_, count_reuse=m.count_reuse, when="unexpired",
                         threshold=None, **kw) for m in moves]     # a bad edge is refused before any call
    lost: dict[str, Transition] = {}
    for pairs in aws.chunks(list(zip(moves, requests, strict=True)), aws.TRANSACTION_MAX):
        chunk = [m for m, _ in pairs]
        if aws.transact_updates(pool.region, [r for _, r in pairs],
                                doing=f"dynamodb:TransactWriteItems {len(chunk)} rows -> {to}"):
            continue
        results = aws.parallel(lambda m: transition(pool, m.instance_id, from_=m.from_, count_reuse=m.count_reuse,
                                                    **kw), chunk)
        lost.update({m.instance_id: t for m, t in zip(chunk, results, strict=True) if t.lost})
    return lost

def _request(pool: Pool, instance_id: str, *, from_: State, to: State, expect_run: str | None, now: float,
             set_run: str | None | Keep, when: When, count_reuse: bool, registration: dict[str, str] | None,
             threshold: float | None) -> dict[str, Any]:
    """The conditional Update of one transition (see :func:`transition`), refused before any call if
    the edge or the credential is not allowed."""
    if (from_, to) not in TRANSITIONS:
        raise ValueError(f"no transition {from_} -> {to}")
    registration = registration or {}
    if registration and (to is not State.CLAIMED or set(registration) - set(REGISTRATION_ATTRIBUTES)):
        raise ValueError(f"a registration credential goes only into a claimed row, not {to}")
    arn = pool.arn(instance_id)
    names = {"#s": "state", "#t": "threshold", "#r": "run_id", "#v": "version", "#u": "updated_at"}
    values: dict[str, Any] = {
        ":from": {"S": from_.value}, ":to": {"S": to.value},
        ":thr": num(threshold_for(pool.config, to, now) if threshold is None else threshold),
        ":now": num(now), ":one": {"N": "1"},
    }
    cond = ["#s = :from"]
    if expect_run is None:
        cond.append("attribute_not_exists(#r)")
    else:
        cond.append("#r = :run")
        values[":run"] = {"S": expect_run}
    if when == "unexpired":
        cond.append("#t > :now")
    elif when == "expired":
        cond.append("#t < :now")
    sets = ["#s = :to", "#t = :thr", "#v = #v + :one", "#u = :now"]
    removes = []
    if isinstance(set_run, str):
        sets.append("#r = :newrun")
        values[":newrun"] = {"S": set_run}
    elif set_run is None:
        removes.append("#r")
        if expect_run is not None:
            names["#l"] = "last_run_id"
            sets.append("#l = :run")
    for i, attr in enumerate(REGISTRATION_ATTRIBUTES):
        names[f"#g{i}"] = attr
        if attr in registration:
            sets.append(f"#g{i} = :g{i}")
            values[f":g{i}"] = {"S": registration[attr]}
        else:
            removes.append(f"#g{i}")
    if to is State.TERMINATED:
        names["#x"] = "expires_at"
        sets.append("#x = :exp")
        values[":exp"] = num(now + TERMINATED_RETENTION_S)
    if count_reuse:
        names["#c"] = "reuse_count"
        sets.append("#c = if_not_exists(#c, :zero) + :one")
        values[":zero"] = {"N": "0"}
    update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
    return {"TableName": pool.table, "Key": {"pk": {"S": arn}, "sk": {"S": STATE_SK}},
            "ConditionExpression": " AND ".join(cond), "UpdateExpression": update,
            "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}


def _won(pool: Pool, to: State, record: InstanceRecord, now: float) -> Transition:
    """A won write; one into ``terminated`` also stops counting the instance against its ceilings."""
    if to is State.TERMINATED:
        ceilings.count_terminated(pool.table, pool.region, record.resource_class, now)
    return Transition(True, record)


def _landed_already(current: InstanceRecord, to: State, expect_run: str | None, set_run: str | None | Keep,
                    now: float) -> bool:
    """Whether the row already holds exactly this write: botocore resent it after a dropped
    connection or a read timeout, the first attempt had landed, and the resend's condition failed
    on our own result. ``updated_at`` is this call's ``now`` (to the millisecond, as written), so a
    write by anyone else, even to the same state, does not match."""
    expected_run = expect_run if isinstance(set_run, Keep) else set_run
    return (current.state is to and current.run_id == expected_run
            and abs(current.updated_at - round(float(now), 3)) < 1e-6)


def _why_lost(current: InstanceRecord | None, from_: State, run_id: str | None, now: float, when: When) -> str:
    if current is None:
        return "no such row"
    if current.state is not from_:
        return f"state is {current.state}, not {from_}"
    if current.run_id != run_id:
        return f"run is {current.run_id or 'none'}, not {run_id or 'none'}"
    if when == "unexpired" and current.threshold <= now:
        return "threshold passed"
    if when == "expired" and current.threshold >= now:
        return "threshold not yet passed"
    return "condition failed"
