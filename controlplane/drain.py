"""Returning instances to the pool: leave the run, deregister, then requeue.

Used by a provision's rollback (healthy claimed runners) and by release (a
run's runners). Each instance leaves its run (``-> draining``, the run kept
in ``last_run_id``); its agent sees that, stops the runner and wipes its
credentials, and signals ``deregistered``. Only then is its GitHub runner
deleted (:func:`controlplane.termination.remove_runners`) and the row put
back to ``idle`` and requeued in its class's queue, so the next claimer never
meets a runner still registered for the last run. An instance whose agent
does not confirm in time (or is dead: no fresh heartbeat), or that the
caller's ``retire`` names a reason for, is retired instead
(:func:`controlplane.termination.retire`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from controlplane import interruptions, store, termination
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline, wait_until
from controlplane.logs import QUIET, Progress, event
from controlplane.records import AgentRecord, Member, State
from controlplane.state import transition
from controlplane.store import Pool
from controlplane.termination import Cleanup, Doomed, remove_runners

if TYPE_CHECKING:
    from controlplane.github import GitHubClient

DRAIN_POLL_S = 0.25


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
        t = transition(pool, m.instance_id, from_=state, to=State.DRAINING, expect_run=run_id, set_run=None,
                       now=now, when="any")
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
    to_kill: list[Doomed] = []
    now = clock.now()
    for m in draining:
        why = retire(m) if retire is not None and m.instance_id in confirmed else None
        if why:
            event("release.retire", instance_id=m.instance_id, reason=why)
        if m.instance_id in confirmed and not why:
            t = transition(pool, m.instance_id, from_=State.DRAINING, to=State.IDLE, expect_run=None, now=now,
                           when="any")
            if t.won:
                back.append(m)
                continue
        to_kill.append(Doomed(m.instance_id, State.DRAINING, None))
    if back:
        pool_q.requeue(cfg, back, now)
        out.returned_to_pool = [m.instance_id for m in back]
    out.merge(termination.retire(pool, to_kill, clock))          # their runners are removed above
    return out
