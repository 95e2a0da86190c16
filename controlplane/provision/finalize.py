"""Post-provision: commit the whole set, or roll it back, or clean up in an emergency.

* **commit**: every member goes to ``running`` with the run id and a fresh
  threshold (now + max runtime). If any commit loses its race (refresh
  expired a row meanwhile), the provision is rolled back instead: all or
  nothing holds to the end.
* **rollback** (a clean failure): healthy claimed instances leave the run
  (``claimed -> draining``), their agents deregister, and only once each one
  confirms is it put back to ``idle`` and requeued; one that does not confirm
  in time is terminated. Created instances and unhealthy ones are terminated.
  (The reference requeued first, so the next claimer could meet a runner still
  registered for the failed run.)
* **emergency** (an exception anywhere): terminate every instance the
  provision created or claimed, mark their rows terminated, and report it.

Termination is always: mark the row ``terminated`` (conditional on the state
we think it is in), remove its runner from GitHub, TerminateInstances, delete
the agent row.

**Runners leave GitHub through the control plane.** The instance holds no
removal token: whenever a runner must go (rollback, release, retirement,
termination, a dead agent) :func:`remove_runners` deletes it with the REST
API by the GitHub id its agent reported in the agent row, after checking
that the runner with that id is named after that instance
(``<instance-id>-<n>``): the agent row is the instance's to write, so a
forged id must not delete another instance's runner. A runner that cannot
be removed now (GitHub down, no id reported) is left for reconcile, which
deletes every pool runner without a live instance. Every transition also
removes the registration credential from the state row (see
:func:`controlplane.state.transition`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane import aws, interruptions, store
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline, wait_until
from controlplane.errors import RunnerPoolError
from controlplane.logs import QUIET, Progress, event
from controlplane.pool import PoolMessage
from controlplane.records import AgentRecord, Member, State
from controlplane.state import transition
from controlplane.store import Pool

if TYPE_CHECKING:
    from controlplane.github import GitHubClient

DRAIN_POLL_S = 0.25


@dataclass
class Cleanup:
    terminated: list[str] = field(default_factory=list)
    returned_to_pool: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)          # could not be cleaned: reconcile will

    def merge(self, other: Cleanup) -> None:
        self.terminated += other.terminated
        self.returned_to_pool += other.returned_to_pool
        self.failed += other.failed


def commit(pool: Pool, run_id: str, members: list[Member], clock: Clock = SYSTEM_CLOCK) -> list[str]:
    """Move every member to running. Returns the ids whose commit lost a race."""
    now = clock.now()
    threshold = now + pool.config.max_runtime_s

    def one(m: Member) -> str | None:
        reused = m.source in ("pool", "stopped")        # both were claimed: an idle row or a stopped one
        from_ = State.CLAIMED if reused else State.CREATED
        t = transition(pool.table, pool.region, m.arn, from_=from_, to=State.RUNNING, run_id=run_id,
                       threshold=threshold, now=now, count_reuse=reused)
        return None if t.won else m.instance_id

    lost = [i for i in aws.parallel(one, members) if i]
    event("commit.done", run_id=run_id, committed=len(members) - len(lost), lost=lost)
    return lost


def remove_runners(pool: Pool, github: GitHubClient | None, agents: Mapping[str, AgentRecord | None]) -> list[str]:
    """Delete on GitHub the runner each instance's agent reported; the instance ids whose runner is gone.

    Each id is checked first (one GET): only a runner named ``<instance-id>-<n>``
    is deleted for that instance. Failures are logged and left for reconcile.
    """
    if github is None:
        return []
    gh = github
    wanted = [(iid, a.runner_id) for iid, a in agents.items() if a is not None and a.runner_id is not None]

    def one(item: tuple[str, int | None]) -> str | None:
        iid, runner_id = item
        assert runner_id is not None
        try:
            runner = gh.get_runner(runner_id)
            if runner is not None and not runner.name.startswith(f"{iid}-"):
                event("runner.remove_refused", instance_id=iid, runner_id=runner_id, runner_name=runner.name,
                      reason="the id its agent reported names another instance's runner")
                return None
            if runner is not None:
                gh.delete_runner(runner_id)
        except RunnerPoolError as exc:
            event("runner.remove_failed", instance_id=iid, runner_id=runner_id, error=str(exc))
            return None
        return iid

    removed = [i for i in aws.parallel(one, wanted) if i]
    if wanted:
        event("runner.removed", instance_ids=removed, runner_ids=[r for _, r in wanted])
    return removed


def terminate(pool: Pool, members: list[tuple[str, State, str | None]], clock: Clock = SYSTEM_CLOCK,
              github: GitHubClient | None = None) -> Cleanup:
    """Terminate instances given as (instance id, state we expect, run id we expect).

    With ``github``, their runners are removed from GitHub first (see :func:`remove_runners`).
    """
    from controlplane.apply import terminate_instances

    out = Cleanup()
    if not members:
        return out
    now = clock.now()

    def mark(m: tuple[str, State, str | None]) -> None:
        iid, state, run = m
        if state is State.TERMINATED:
            return
        t = transition(pool.table, pool.region, pool.arn(iid), from_=state, to=State.TERMINATED, run_id=run,
                       threshold=now, now=now, when="any", new_run_id=None)
        if t.lost and t.record is not None and t.record.state is not State.TERMINATED:
            event("terminate.mark_lost", instance_id=iid, reason=t.reason)

    aws.parallel(mark, members)
    ids = [m[0] for m in members]
    if github is not None:
        remove_runners(pool, github, {i: a for i, (_, a) in store.read_set(pool, ids).items()})
    try:
        out.terminated = terminate_instances(pool.region, ids)
    except aws.AwsError as exc:
        out.failed = ids
        event("terminate.failed", instance_ids=ids, error=str(exc))
        return out
    store.delete_rows(pool, [pool.arn(i) for i in ids], state=False, agent=True)
    return out


def return_to_pool(pool: Pool, run_id: str, members: list[Member], from_: State | None,
                   progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK,
                   retire: Callable[[Member], str | None] | None = None,
                   github: GitHubClient | None = None) -> Cleanup:
    """Clear the run from instances, wait for deregistration, remove their runners, then requeue.

    ``from_`` is the state they are in (None: read each row's own state).
    An instance whose agent is dead (no fresh heartbeat) is not waited for.
    ``retire`` may name a reason to terminate a confirmed instance instead of
    requeueing it (reuse cap, lifetime, class removed): it is still
    deregistered first, so no runner is left registered on GitHub.
    """
    out = Cleanup()
    if not members:
        return out
    cfg = pool.config
    now = clock.now()
    draining: list[Member] = []
    states = {m.instance_id: from_ for m in members}
    if from_ is None:
        rows = store.read_set(pool, [m.instance_id for m in members])
        states = {i: (r.state if r else None) for i, (r, _) in rows.items()}
    for m in members:
        state = states.get(m.instance_id)
        if state is State.DRAINING:
            draining.append(m)
            continue
        if state not in (State.CLAIMED, State.RUNNING):
            continue                                # gone, terminated or never committed: not ours to drain
        t = transition(pool.table, pool.region, m.arn, from_=state, to=State.DRAINING, run_id=run_id,
                       new_run_id=None, threshold=now + cfg.deregistration_timeout_s, now=now, when="any")
        if t.won:
            draining.append(m)
        elif t.record is not None and t.record.state is State.DRAINING and t.record.last_run_id == run_id:
            draining.append(m)                      # a previous attempt got this far
    confirmed: set[str] = set()
    dead: set[str] = set()
    ids = [m.instance_id for m in draining]
    deadline = Deadline(cfg.deregistration_timeout_s, clock)
    agents: dict[str, AgentRecord | None] = {}

    def poll() -> bool:
        rows = store.read_set(pool, ids)
        agents.update({i: a for i, (_, a) in rows.items()})
        now = clock.now()
        for iid in ids:
            record, agent = rows[iid]
            if agent is not None and agent.interrupted:
                dead.add(iid)                       # a spot notice: EC2 takes it, it must not be reused
            elif agent is not None and agent.deregistered_from(run_id):
                confirmed.add(iid)
            elif record is None or agent is None or not agent.is_healthy(now, cfg.heartbeat_stale_s):
                dead.add(iid)
        progress.update(f"{len(confirmed)} of {len(ids)} deregistered ({deadline.elapsed_s:.1f} s)",
                        key=f"{len(confirmed)}/{len(ids)}")
        return len(confirmed | dead) == len(ids)

    if ids:
        wait_until(poll, deadline, DRAIN_POLL_S)
        remove_runners(pool, github, agents)          # every drained runner, confirmed or not
        interruptions.record(pool, {m.instance_id: m.resource_class for m in draining
                                    if (agents.get(m.instance_id) or AgentRecord(m.arn)).interrupted}, clock.now())
    back: list[Member] = []
    to_kill: list[tuple[str, State, str | None]] = []
    now = clock.now()
    for m in draining:
        why = retire(m) if retire is not None and m.instance_id in confirmed else None
        if why:
            event("release.retire", instance_id=m.instance_id, reason=why)
        if m.instance_id in confirmed and not why:
            t = transition(pool.table, pool.region, m.arn, from_=State.DRAINING, to=State.IDLE, run_id=None,
                           threshold=now + cfg.idle_time_s, now=now, when="any")
            if t.won:
                back.append(m)
                continue
        to_kill.append((m.instance_id, State.DRAINING, None))
    if back:
        by_class: dict[str, list[Member]] = {}
        for m in back:
            by_class.setdefault(m.resource_class, []).append(m)
        for cls, ms in by_class.items():
            pool_q.send(cfg.region, pool_q.queue_url(cfg, cls), [
                PoolMessage(m.instance_id, cls, m.instance_type, m.usage_class, now) for m in ms])
        out.returned_to_pool = [m.instance_id for m in back]
    out.merge(terminate(pool, to_kill, clock))
    return out


def rollback(pool: Pool, run_id: str, healthy_claimed: list[Member], doomed: list[Member],
             progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK,
             github: GitHubClient | None = None) -> Cleanup:
    out = terminate(pool, [(m.instance_id, State.CLAIMED if m.source in ("pool", "stopped") else State.CREATED,
                            run_id) for m in doomed], clock, github)
    out.merge(return_to_pool(pool, run_id, healthy_claimed, State.CLAIMED, progress, clock, github=github))
    event("rollback.done", run_id=run_id, terminated=out.terminated, returned=out.returned_to_pool,
          failed=out.failed)
    return out


def emergency(pool: Pool, run_id: str, instance_ids: list[str], clock: Clock = SYSTEM_CLOCK,
              github: GitHubClient | None = None) -> Cleanup:
    """Terminate everything the provision touched, whatever state its rows are in."""
    from controlplane.apply import terminate_instances

    out = Cleanup()
    ids = sorted(set(instance_ids))
    if not ids:
        return out
    now = clock.now()
    try:
        rows = store.read_set(pool, ids)
        for iid in ids:
            record, _ = rows[iid]
            if record is not None and record.state is not State.TERMINATED and record.run_id in (run_id, None):
                transition(pool.table, pool.region, record.arn, from_=record.state, to=State.TERMINATED,
                           run_id=record.run_id, threshold=now, now=now, when="any", new_run_id=None)
        remove_runners(pool, github, {i: a for i, (_, a) in rows.items()})
    except Exception as exc:  # noqa: BLE001 - the safety net must still terminate
        event("emergency.rows_failed", run_id=run_id, error=str(exc))
    try:
        out.terminated = terminate_instances(pool.region, ids)
    except Exception as exc:  # noqa: BLE001
        out.failed = ids
        event("emergency.terminate_failed", run_id=run_id, error=str(exc))
    event("emergency.done", run_id=run_id, terminated=out.terminated, failed=out.failed)
    return out
