"""The stopped tier: idle runners parked as stopped instances, started again for a run.

A class with ``stopped_time_s`` keeps a second, cheaper tier behind its pool
of running idle runners: a stopped instance costs only its EBS volume.

* **park** (refresh): an idle runner past its ``idle_time_s`` is marked
  ``idle -> stopped`` (conditional on its threshold still being passed, so a
  claim that won meanwhile keeps it) with a threshold of now +
  ``stopped_time_s``, then stopped with one StopInstances for the batch. Its
  pool message stays in the queue and is dropped as stale by the next
  selection that meets it (the claim's condition fails on ``stopped``).
  Past ``stopped_time_s`` (or its lifetime) refresh terminates it like any
  expired row.
* **what EC2 refuses to stop** falls back to terminate, i.e. is left idle for
  refresh's expiry to terminate: a spot instance (EC2 stops a spot instance
  only when its request is persistent with interruption behaviour ``stop``;
  the one-time requests of an ``instant`` fleet are not), and an instance
  whose root device is instance store (only EBS-backed instances can stop).
  The root device type comes from one DescribeInstances for the batch. A
  StopInstances that fails anyway (``UnsupportedOperation``,
  ``UnsupportedInstanceAttribute``...) terminates those instances.
* **claim and start** (provision, after the pool of running idle runners):
  ``stopped -> claimed`` by conditional write per row, the same write carrying
  the registration credential as an idle claim does, then **one**
  StartInstances for the batch. EC2 refuses to start an instance still
  ``stopping``: such ids are retried one by one until ``START_RETRY_S``; what
  cannot be started is terminated and left to creation.

The agent comes back on its own: the bootstrap installs itself as a per-boot
script (cloud-init's ``scripts/per-boot``), so the boot after a start runs
the installed bootstrap again, which starts the agent, which reads its row
(now ``claimed`` for the run) and registers. Its agent row still holds what
the previous boot wrote, so validation ignores agent rows older than the
start (``Member.started_at``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane import aws, store, termination
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline
from controlplane.config import PoolConfig
from controlplane.logs import event
from controlplane.records import InstanceRecord, Member, State
from controlplane.state import transition
from controlplane.store import Pool
from controlplane.termination import Doomed

if TYPE_CHECKING:
    from controlplane.provision.attempt import Touched

START_RETRY_S = 90.0           # an instance EC2 still reports ``stopping`` cannot be started yet
START_BACKOFF_S = (1.0, 8.0)
NOT_YET_STARTABLE = ("IncorrectInstanceState",)


@dataclass
class ParkResult:
    stopped: list[str] = field(default_factory=list)
    left_to_terminate: list[str] = field(default_factory=list)     # EC2 would refuse: expiry terminates them
    terminated: list[str] = field(default_factory=list)            # StopInstances failed


def has_tier(cfg: PoolConfig, resource_class: str) -> bool:
    rc = cfg.resource_classes.get(resource_class)
    return rc is not None and rc.stopped_time_s is not None and not cfg.is_ephemeral(resource_class)


def _root_devices(region: str, ids: list[str]) -> dict[str, str]:
    """instance id -> root device type (``ebs`` / ``instance-store``), one DescribeInstances per 200 ids."""
    ec2 = aws.client("ec2", region)
    out: dict[str, str] = {}
    for chunk in aws.chunks(ids, 200):
        with aws.mapped("ec2:DescribeInstances"):
            resp = ec2.describe_instances(InstanceIds=chunk)
        for r in resp["Reservations"]:
            for i in r["Instances"]:
                out[i["InstanceId"]] = str(i.get("RootDeviceType") or "ebs")
    return out


def why_not_stoppable(record: InstanceRecord, root_device: str | None) -> str | None:
    """Why EC2 would refuse to stop this instance, or None when it can be stopped."""
    if record.usage_class == "spot":
        return "spot (instant fleets make one-time spot requests, which EC2 does not stop)"
    if root_device == "instance-store":
        return "instance-store root (only EBS-backed instances can be stopped)"
    return None


def park_expired(pool: Pool, clock: Clock = SYSTEM_CLOCK) -> ParkResult:
    """Stop the idle runners past their threshold in classes with a stopped tier (refresh's step)."""
    cfg = pool.config
    res = ParkResult()
    now = clock.now()
    lifetime_cut = now - cfg.max_lifetime_s
    candidates = [r for r in store.records_in_state(pool, State.IDLE, threshold_before=now)
                  if has_tier(cfg, r.resource_class) and r.launched_at > lifetime_cut]
    if not candidates:
        return res
    roots = _root_devices(pool.region, [r.instance_id for r in candidates])
    parkable = []
    for r in candidates:
        why = why_not_stoppable(r, roots.get(r.instance_id))
        if why:
            res.left_to_terminate.append(r.instance_id)
            event("stopped_tier.not_stoppable", instance_id=r.instance_id, reason=why)
        else:
            parkable.append(r)

    def mark(r: InstanceRecord) -> bool:
        rc = cfg.resource_class(r.resource_class)
        t = transition(pool, r.instance_id, from_=State.IDLE, to=State.STOPPED, expect_run=None, now=now,
                       when="expired", threshold=now + float(rc.stopped_time_s or 0))
        return t.won

    marked = [r.instance_id for r, won in zip(parkable, aws.parallel(mark, parkable), strict=True) if won]
    if marked:
        failed = _stop(pool.region, marked)
        res.stopped = [i for i in marked if i not in failed]
        if failed:
            res.terminated = _terminate(pool, sorted(failed), State.STOPPED, None, clock)
    event("stopped_tier.parked", pool=pool.name, stopped=res.stopped, not_stoppable=res.left_to_terminate,
          terminated=res.terminated)
    return res


def _stop(region: str, ids: list[str]) -> dict[str, str]:
    """StopInstances for ``ids`` (batches of 500); the ids EC2 refused, with why."""
    ec2 = aws.client("ec2", region)
    failed: dict[str, str] = {}
    for chunk in aws.chunks(sorted(ids), 500):
        try:
            with aws.mapped("ec2:StopInstances"):
                ec2.stop_instances(InstanceIds=chunk)
            continue
        except aws.AwsError as exc:
            event("stopped_tier.stop_batch_failed", instance_ids=chunk, error=exc.code)
        for iid in chunk:                          # one refused id fails the whole call: find which
            try:
                with aws.mapped("ec2:StopInstances"):
                    ec2.stop_instances(InstanceIds=[iid])
            except aws.AwsError as exc:
                failed[iid] = exc.code
    return failed


def _terminate(pool: Pool, ids: list[str], state: State, run_id: str | None, clock: Clock) -> list[str]:
    return termination.retire(pool, [Doomed(i, state, run_id) for i in ids], clock).terminated


def claim_and_start(pool: Pool, run_id: str, resource_class: str, count: int, usage_class: str | None,
                    clock: Clock = SYSTEM_CLOCK, touched: Touched | None = None,
                    registration: dict[str, str] | None = None) -> list[Member]:
    """Claim up to ``count`` stopped runners of the class for ``run_id`` and start them (one call)."""
    cfg = pool.config
    if count <= 0 or not has_tier(cfg, resource_class):
        return []
    now = clock.now()
    rows = [r for r in store.records_in_state(pool, State.STOPPED)
            if r.resource_class == resource_class and r.threshold > now
            and (usage_class is None or r.usage_class == usage_class)]
    rows.sort(key=lambda r: -r.threshold)          # the most recently stopped first: the freshest disks
    won: list[InstanceRecord] = []
    while rows and len(won) < count:
        batch, rows = rows[:count - len(won)], rows[count - len(won):]

        def claim(r: InstanceRecord) -> InstanceRecord | None:
            t = transition(pool, r.instance_id, from_=State.STOPPED, to=State.CLAIMED, expect_run=None,
                           set_run=run_id, now=now, registration=registration)
            if t.won and t.record is not None:
                if touched is not None:
                    touched.add([t.record.instance_id])
                return t.record
            event("claim.lost", run_id=run_id, instance_id=r.instance_id, reason=t.reason, tier="stopped")
            return None

        won += [r for r in aws.parallel(claim, batch) if r is not None]
    if not won:
        return []
    started_at = clock.now()
    failed = start(pool.region, [r.instance_id for r in won], clock)
    if failed:
        _terminate(pool, sorted(failed), State.CLAIMED, run_id, clock)
    members = [Member(r.instance_id, r.arn, "stopped", r.instance_type, r.subnet_id, r.usage_class,
                      r.resource_class, started_at=started_at) for r in won if r.instance_id not in failed]
    event("stopped_tier.started", run_id=run_id, resource_class=resource_class,
          instance_ids=[m.instance_id for m in members], failed=failed)
    return members


def start(region: str, ids: list[str], clock: Clock = SYSTEM_CLOCK) -> dict[str, str]:
    """One StartInstances for ``ids``; ids EC2 refuses are retried alone (a ``stopping`` instance becomes
    startable once ``stopped``) until ``START_RETRY_S``. Returns the ids that could not be started."""
    ec2 = aws.client("ec2", region)
    try:
        with aws.mapped("ec2:StartInstances"):
            ec2.start_instances(InstanceIds=sorted(ids))
        return {}
    except aws.AwsError as exc:
        event("stopped_tier.start_batch_failed", instance_ids=ids, error=exc.code)
    pending = sorted(ids)
    failed: dict[str, str] = {}
    deadline = Deadline(START_RETRY_S, clock)
    delay = START_BACKOFF_S[0]
    while pending:
        retry = []
        for iid in pending:
            try:
                with aws.mapped("ec2:StartInstances"):
                    ec2.start_instances(InstanceIds=[iid])
            except aws.AwsError as exc:
                code = exc.code
                if code in NOT_YET_STARTABLE and not deadline.expired:
                    retry.append(iid)
                else:
                    failed[iid] = code
        pending = retry
        if pending:
            clock.sleep(min(delay, max(0.0, deadline.remaining_s)))
            delay = min(delay * 2, START_BACKOFF_S[1])
    return failed


def stopped_counts(records: list[InstanceRecord]) -> dict[str, int]:
    """Stopped runners per class (for status)."""
    out: dict[str, int] = {}
    for r in records:
        if r.state is State.STOPPED:
            out[r.resource_class] = out.get(r.resource_class, 0) + 1
    return out

