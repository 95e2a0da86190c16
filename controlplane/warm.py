"""Warm minimum: refresh keeps each class at ``min_idle`` idle runners (per its schedule).

Input: the pool, a clock. Output: what was promoted, created, kept and why
something was not created. Runs as refresh's last step, after expiry and
reconcile, so it counts what is really left.

**What counts towards the minimum**, each instance once:

* ``idle`` rows of the class whose threshold has not passed (claimable now);
* ``created`` rows of the class that belong to **no run**: instances an
  earlier top-up launched whose agents are not up yet.

Rows of a run (claimed, running, draining) do not count: they are not
available to the next run. The minimum in force is
:meth:`controlplane.config.ResourceClass.min_idle_at` (0 outside the
schedule's window).

**Top-up**, per class short of its minimum: one CreateFleet for the whole
deficit (through :func:`controlplane.provision.creation.create` with no run,
so its ceiling reservation applies; a deficit above the ceiling's room is cut
to the room). The rows are ``created`` with no run and no credential; the agent
boots, runs the pre-runner script and waits. Refresh then waits (up to
``validation_timeout_s``) for each new agent to report ``waiting`` with a
fresh heartbeat and **promotes** it: ``created -> idle`` with a fresh idle
threshold, then one message into the class's queue. One not up in time stays
``created`` and counted; the next refresh promotes it, or expiry terminates it
once its ``claim_timeout_s`` passes.

**Holding the minimum against expiry.** When idle rows pass their threshold,
:func:`hold_minimum` keeps as many of them as the class needs to stay at its
minimum (the youngest: they have the most lifetime left), giving each a new
idle threshold with one conditional write (still idle, same threshold, no
run); the rest expire after ``idle_time_s`` as before. Instances past
``max_lifetime_s`` are never kept: they are retired and the top-up replaces
them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, ceilings, store
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline, wait_until
from controlplane.errors import RunnerPoolError
from controlplane.logs import QUIET, Progress, event
from controlplane.records import FAILURE_SIGNALS, InstanceRecord, Signal, State
from controlplane.state import transition
from controlplane.store import Pool

PROMOTE_POLL_S = 0.5


@dataclass
class WarmResult:
    targets: dict[str, int] = field(default_factory=dict)          # minimum in force per class
    counted: dict[str, int] = field(default_factory=dict)          # what counted towards it before the top-up
    created: dict[str, list[str]] = field(default_factory=dict)
    promoted: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)               # created, not up yet: the next refresh's
    capped: dict[str, str] = field(default_factory=dict)           # class -> why less than the deficit was created
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        made = sum(len(v) for v in self.created.values())
        line = (f"warm minimum: {', '.join(f'{c} {n}' for c, n in sorted(self.targets.items()))}; "
                f"{made} created, {len(self.promoted)} into the pool")
        if self.waiting:
            line += f", {len(self.waiting)} still booting"
        if self.capped:
            line += "; " + "; ".join(f"{c}: {why}" for c, why in sorted(self.capped.items()))
        return line


def wants_warm(pool: Pool) -> bool:
    return any(rc.min_idle for rc in pool.config.resource_classes.values())


def _warm_created(pool: Pool) -> list[InstanceRecord]:
    return [r for r in store.records_in_state(pool, State.CREATED) if r.run_id is None]


def _unexpired_idle(pool: Pool, now: float, exclude: set[str]) -> list[InstanceRecord]:
    return [r for r in store.records_in_state(pool, State.IDLE)
            if r.threshold > now and r.instance_id not in exclude]


def top_up(pool: Pool, clock: Clock = SYSTEM_CLOCK, progress: Progress = QUIET,
           exclude: set[str] | None = None) -> WarmResult:
    """Bring every class to its minimum in force. ``exclude``: ids this refresh just terminated
    (the index may still list them as idle for a moment)."""
    res = WarmResult()
    if not wants_warm(pool):
        return res
    cfg = pool.config
    now = clock.now()
    gone = exclude or set()
    res.targets = {c: rc.min_idle_at(now) for c, rc in sorted(cfg.resource_classes.items()) if rc.min_idle}
    # One snapshot, each instance in exactly one list (created first: a promotion between the two
    # reads can only count an instance twice, which creates too few, never too many).
    booting = [r for r in _warm_created(pool) if r.instance_id not in gone]
    idle = _unexpired_idle(pool, now, gone)
    res.promoted += _promote(pool, booting, clock)         # earlier top-ups' instances that are up now
    new: list[str] = []
    for cls, target in res.targets.items():
        have = sum(1 for r in idle if r.resource_class == cls) + sum(1 for r in booting if r.resource_class == cls)
        res.counted[cls] = have
        deficit = target - have
        if deficit <= 0:
            continue
        room = ceilings.room(cfg, cls)
        n = deficit if room is None else min(deficit, room)
        if n < deficit:
            res.capped[cls] = f"{deficit - n} short of min_idle: the ceiling leaves room for {n}"
        if n <= 0:
            continue
        progress.phase(f"      {cls}: {have} of {target} warm, creating {n}")
        try:
            from controlplane.provision import creation

            cr = creation.create(pool, None, cls, n, cfg.usage_class, clock)
        except ceilings.CeilingReached as exc:
            res.capped[cls] = str(exc)
            continue
        except RunnerPoolError as exc:
            res.failed.append(f"{cls}: {exc}")
            continue
        res.created[cls] = [m.instance_id for m in cr.members]
        if cr.shortfall:
            res.capped[cls] = f"EC2 supplied {len(cr.members)} of {n}"
        new += res.created[cls]
    if new:
        res.promoted += _wait_and_promote(pool, new, clock, progress)
    res.waiting = sorted({r.instance_id for r in booting} | set(new) - set(res.promoted))
    event("warm.top_up", pool=cfg.name, targets=res.targets, counted=res.counted, created=res.created,
          promoted=res.promoted, waiting=res.waiting, capped=res.capped)
    return res


def _promote(pool: Pool, rows: list[InstanceRecord], clock: Clock) -> list[str]:
    """``created -> idle`` and into the queue, for rows whose agent is up and waiting."""
    if not rows:
        return []
    cfg = pool.config
    agents = store.read_set(pool, [r.instance_id for r in rows])
    now = clock.now()
    ready = []
    for r in rows:
        _, agent = agents.get(r.instance_id, (None, None))
        if (agent is not None and agent.is_healthy(now, cfg.heartbeat_stale_s)
                and agent.signal is Signal.WAITING and agent.signal not in FAILURE_SIGNALS):
            ready.append(r)

    def one(r: InstanceRecord) -> InstanceRecord | None:
        t = transition(pool, r.instance_id, from_=State.CREATED, to=State.IDLE, expect_run=None, now=now)
        return t.record if t.won else None

    won = [r for r in aws.parallel(one, ready) if r is not None]
    pool_q.requeue(cfg, won, now)
    if won:
        event("warm.promoted", pool=cfg.name, instance_ids=[r.instance_id for r in won])
    return [r.instance_id for r in won]


def _wait_and_promote(pool: Pool, ids: list[str], clock: Clock, progress: Progress) -> list[str]:
    cfg = pool.config
    promoted: list[str] = []
    deadline = Deadline(cfg.validation_timeout_s, clock)

    def poll() -> bool:
        rows = store.read_set(pool, [i for i in ids if i not in promoted])
        pending = [r for r, _ in rows.values() if r is not None and r.state is State.CREATED and r.run_id is None]
        promoted.extend(_promote(pool, pending, clock))
        progress.update(f"  {len(promoted)} of {len(ids)} warm runner(s) up ({deadline.elapsed_s:.1f} s)",
                        key=f"{len(promoted)}/{len(ids)}")
        return not pending or len(promoted) == len(ids)

    wait_until(poll, deadline, PROMOTE_POLL_S)
    return promoted


def hold_minimum(pool: Pool, expired_idle: list[InstanceRecord], now: float) -> list[InstanceRecord]:
    """Of idle rows past their threshold, keep what each class needs for its minimum; return the rest.

    A kept row gets ``now + idle_time_s`` as its threshold (one conditional write each).
    """
    cfg = pool.config
    targets = {c: rc.min_idle_at(now) for c, rc in cfg.resource_classes.items() if rc.min_idle}
    if not expired_idle or not any(targets.values()):
        return expired_idle
    expired_ids = {r.instance_id for r in expired_idle}
    idle = [r for r in store.records_in_state(pool, State.IDLE) if r.instance_id not in expired_ids
            and r.threshold > now]
    booting = _warm_created(pool)
    lifetime_cut = now - cfg.max_lifetime_s
    keep: list[InstanceRecord] = []
    for cls, target in targets.items():
        have = sum(1 for r in idle if r.resource_class == cls) + sum(1 for r in booting if r.resource_class == cls)
        need = target - have
        if need <= 0:
            continue
        candidates = sorted((r for r in expired_idle if r.resource_class == cls and r.launched_at > lifetime_cut),
                            key=lambda r: -r.launched_at)
        keep += candidates[:need]
    extended = aws.parallel(lambda r: store.extend_idle(pool, r, now + cfg.idle_time_s, now), keep)
    kept = [r for r, ok in zip(keep, extended, strict=True) if ok]
    if kept:
        event("warm.held", pool=cfg.name, instance_ids=[r.instance_id for r in kept])
    held = {r.instance_id for r in kept}
    return [r for r in expired_idle if r.instance_id not in held]
