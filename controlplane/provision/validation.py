"""Validation: all or nothing over the whole set, claimed plus created.

Input: the run and its members. Output: which members are ready and, for the
rest, why not. A member is ready when its agent has signalled ``registered``
for this run (or, for a relabelled pool runner, when the claim saw it on
GitHub with the run's labels) and its heartbeat is fresh. The set is polled with one batched
read per poll (two keys per instance, 50 instances per BatchGetItem) until
every member is ready, one fails (fail fast: a failure signal, or a heartbeat
that stops after it had started), or the validation timeout passes.
Progress is reported as "k of N ready".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from controlplane import store
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline, wait_until
from controlplane.errors import ValidationFailed, ValidationTimeout
from controlplane.logs import QUIET, Progress, event
from controlplane.records import AgentRecord, InstanceRecord, Member
from controlplane.store import Pool

POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ValidationResult:
    ready: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)      # instance id -> reason
    timed_out: bool = False
    polls: int = 0
    healthy: set[str] = field(default_factory=set)            # fresh heartbeat at the last poll
    decided_at: float | None = None                           # wall clock of the poll that decided (epoch)
    ids: list[str] = field(default_factory=list)              # every member's id, in order
    timeout_s: float = 0.0
    interrupted: list[str] = field(default_factory=list)      # members whose agent got a spot notice

    @property
    def ok(self) -> bool:
        return not self.failed and not self.timed_out

    def failure(self) -> ValidationFailed | ValidationTimeout | None:
        """Why the set was not accepted, as a typed value (None when it was)."""
        if self.failed:
            return ValidationFailed(self.failed, len(self.ids))
        if self.timed_out:
            missing = [i for i in self.ids if i not in set(self.ready)]
            return ValidationTimeout(self.ready, missing, self.timeout_s)
        return None


@dataclass
class _Poll:
    ready: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    healthy: set[str] = field(default_factory=set)
    polls: int = 0
    interrupted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """One member at one poll."""

    failed: str | None = None                # why it can never be ready for this run
    healthy: bool = False                    # its heartbeat is fresh
    ready: bool = False                      # registered for this run, heartbeat fresh


def judge(record: InstanceRecord | None, agent: AgentRecord | None, run_id: str, now: float,
          heartbeat_stale_s: float, heartbeat_seen: bool) -> Verdict:
    """A member's verdict from its two rows; no I/O. ``heartbeat_seen``: it had a fresh one before."""
    if record is None:
        return Verdict("its state row is gone")
    if record.run_id != run_id:
        return Verdict(f"its row now belongs to {record.run_id or 'no run'} ({record.state})")
    if agent is None:
        return Verdict()                     # still booting
    if agent.failed_for(run_id):
        return Verdict(f"agent signalled {agent.signal}" + (f": {agent.detail}" if agent.detail else ""))
    fresh = agent.is_healthy(now, heartbeat_stale_s)
    if not fresh and heartbeat_seen:
        age = agent.heartbeat_age(now)
        return Verdict(f"heartbeat stopped ({age:.0f} s old)" if age is not None else "no heartbeat")
    return Verdict(healthy=fresh, ready=fresh and agent.registered_for(run_id))


def validate(pool: Pool, run_id: str, members: list[Member], timeout_s: float,
             progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK,
             relabelled: frozenset[str] = frozenset()) -> ValidationResult:
    """``relabelled``: members whose listening runner the claim already relabelled and checked on
    GitHub; their agents signal nothing new, so for them a fresh heartbeat is enough."""
    if not members:
        return ValidationResult()
    res = _Poll()
    cfg = pool.config
    ids = [m.instance_id for m in members]
    # Claimed members were healthy when claimed: a stale heartbeat later means it stopped.
    seen_heartbeat: set[str] = {m.instance_id for m in members if m.source == "pool"}
    # Started from the stopped tier: like a claimed one, but booting. What its agent row says from
    # before the start is the last boot's word, not this one's.
    started = {m.instance_id: m.started_at for m in members if m.started_at is not None}
    deadline = Deadline(timeout_s, clock)

    def poll() -> bool:
        res.polls += 1
        rows = store.read_set(pool, ids)
        now = clock.now()
        ready: list[str] = []
        failed: dict[str, str] = {}
        healthy: set[str] = set()
        for iid in ids:
            record, agent = rows[iid]
            since = started.get(iid)
            if (record is not None and record.run_id == run_id and agent is not None and since is not None
                    and max(agent.heartbeat_at or 0, agent.signal_at or 0) < since):
                continue                              # started, its new boot has not written yet
            if agent is not None and agent.interrupted and iid not in res.interrupted:
                res.interrupted.append(iid)
            verdict = judge(record, agent, run_id, now, cfg.heartbeat_stale_s, iid in seen_heartbeat)
            if verdict.healthy:
                healthy.add(iid)
                seen_heartbeat.add(iid)
            if verdict.failed is not None:
                failed[iid] = verdict.failed
            elif verdict.ready or (verdict.healthy and iid in relabelled):
                ready.append(iid)
        res.ready, res.failed, res.healthy = ready, failed, healthy
        progress.update(f"{len(ready)} of {len(ids)} ready ({deadline.elapsed_s:.1f} s)", key=f"{len(ready)}/{len(ids)}")
        return bool(failed) or len(ready) == len(ids)

    done = wait_until(poll, deadline, POLL_INTERVAL_S)
    out = ValidationResult(res.ready, res.failed, not done, res.polls, res.healthy, clock.now(), ids, timeout_s,
                           res.interrupted)
    event("validation.done", run_id=run_id, ready=out.ready, failed=out.failed, timed_out=out.timed_out,
          polls=out.polls, elapsed_s=round(deadline.elapsed_s, 3))
    return out
