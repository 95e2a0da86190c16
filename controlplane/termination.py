"""Retiring instances: the one sequence that ends an instance, used by every operation.

Provision (rollback, unhealthy claims, a lost commit, an emergency), release,
refresh (expiry, a removed class) and reconcile all end instances here, in the
same order:

1. **mark** each row ``terminated`` with the one conditional write
   (:func:`controlplane.state.transition`), conditional on the state and run
   the caller believes it is in (:class:`Doomed`). A mark that loses is an
   answer, not an error: the caller decides whether the instance still goes
   (provision: yes, it was ours; refresh: no, a claim may have won);
2. **remove its runner from GitHub** (:func:`remove_runners`), when the
   caller has a GitHub client;
3. **TerminateInstances** (:func:`terminate_ec2`), in batches, retrying ids
   EC2 does not know yet;
4. **delete the agent row** (the state row stays, ``terminated``, until TTL).

:func:`retire` is the whole sequence; :func:`finish` is steps 2-4 for
instances whose rows are already marked or are no longer the caller's to
write; :func:`close_rows` is step 1 plus the agent rows for rows whose
instance is already gone; :func:`emergency` is the safety net that still
terminates when reading or writing rows fails.

**Runners leave GitHub through the control plane.** The instance holds no
removal token: :func:`remove_runners` deletes a runner with the REST API by
the GitHub id its agent reported in the agent row, after checking that the
runner with that id is named after that instance (``<instance-id>-<n>``): the
agent row is the instance's to write, so a forged id must not delete another
instance's runner. A runner that cannot be removed now (GitHub down, no id
reported) is left for reconcile, which deletes every pool runner without a
live instance.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane import aws, store
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline
from controlplane.errors import RunnerPoolError
from controlplane.logs import event
from controlplane.records import AgentRecord, State
from controlplane.state import Transition, When, transition
from controlplane.store import Pool

if TYPE_CHECKING:
    from controlplane.github import GitHubClient

# Right after CreateFleet, EC2's other APIs may not know an instance yet (eventual consistency:
# https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html), and TerminateInstances
# answers InvalidInstanceID.NotFound for it. An instance that was terminated stays known for about
# an hour, so a NotFound that persists means the id never existed here. Such ids are retried with
# backoff for NOT_FOUND_RETRY_S, then reported as not found (never silently dropped).
NOT_FOUND_RETRY_S = 30.0
NOT_FOUND_BACKOFF_S = (0.5, 8.0)      # first delay, longest delay
TERMINATE_BATCH = 500                 # instance ids per TerminateInstances call


@dataclass(frozen=True)
class Doomed:
    """An instance to retire, and what its row must still say for the mark to be ours to write."""

    instance_id: str
    state: State                       # the state the row is expected in
    run_id: str | None                 # the run it is expected to belong to (None: no run)
    when: When = "any"                 # condition on its threshold ("expired": only if still expired)


@dataclass
class Cleanup:
    """What a retirement (or a return to the pool) did, by instance id."""

    terminated: list[str] = field(default_factory=list)
    returned_to_pool: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)          # could not be cleaned: reconcile will
    not_found: list[str] = field(default_factory=list)       # EC2 never knew them (after the retries)
    error: str = ""                                          # why ``failed``, when it failed

    def merge(self, other: Cleanup) -> None:
        self.terminated += other.terminated
        self.returned_to_pool += other.returned_to_pool
        self.failed += other.failed
        self.not_found += other.not_found
        self.error = self.error or other.error


@dataclass(frozen=True)
class Termination:
    terminated: list[str]
    not_found: list[str]              # still InvalidInstanceID.NotFound after the retries


def mark(pool: Pool, doomed: Iterable[Doomed], now: float) -> dict[str, Transition]:
    """Step 1: each row to ``terminated``, one conditional write each, in parallel; the outcome by id."""
    items = list(doomed)

    def one(d: Doomed) -> Transition:
        return transition(pool, d.instance_id, from_=d.state, to=State.TERMINATED, expect_run=d.run_id,
                          set_run=None, now=now, when=d.when)

    return {d.instance_id: t for d, t in zip(items, aws.parallel(one, items), strict=True)}


def retire(pool: Pool, doomed: list[Doomed], clock: Clock = SYSTEM_CLOCK,
           github: GitHubClient | None = None) -> Cleanup:
    """The whole sequence for instances that are ours to end: mark, remove runners, terminate, drop agent rows.

    A mark that loses (the row moved on) is logged; the instance is terminated all the same.
    """
    if not doomed:
        return Cleanup()
    for iid, t in mark(pool, doomed, clock.now()).items():
        if t.lost and t.record is not None and t.record.state is not State.TERMINATED:
            event("terminate.mark_lost", instance_id=iid, reason=t.reason)
    return finish(pool, [d.instance_id for d in doomed], clock, github)


def finish(pool: Pool, instance_ids: list[str], clock: Clock = SYSTEM_CLOCK,
           github: GitHubClient | None = None,
           agents: Mapping[str, AgentRecord | None] | None = None) -> Cleanup:
    """Steps 2-4 for instances whose rows need no (more) writing.

    ``agents``: their agent rows when the caller has just read them (else they are read here,
    if there is a GitHub client to remove runners with).
    """
    out = Cleanup()
    if not instance_ids:
        return out
    if github is not None:
        if agents is None:
            agents = {i: a for i, (_, a) in store.read_set(pool, instance_ids).items()}
        remove_runners(pool, github, agents)
    try:
        term = terminate_ec2(pool.region, instance_ids, clock)
    except aws.AwsError as exc:
        out.failed, out.error = list(instance_ids), str(exc)
        event("terminate.failed", instance_ids=instance_ids, error=str(exc))
        return out
    out.terminated, out.not_found = term.terminated, term.not_found
    store.delete_rows(pool, [pool.arn(i) for i in instance_ids], state=False, agent=True)
    return out


def close_rows(pool: Pool, doomed: list[Doomed], now: float) -> tuple[list[str], dict[str, str]]:
    """Mark rows whose instance is already gone, and drop their agent rows.

    Returns the ids now terminated (by us or by whoever beat us) and, for the rest, why not.
    """
    closed: list[str] = []
    why_not: dict[str, str] = {}
    for iid, t in mark(pool, doomed, now).items():
        if t.won or (t.record is not None and t.record.state is State.TERMINATED):
            closed.append(iid)
        else:
            why_not[iid] = t.reason
    if closed:
        store.delete_rows(pool, [pool.arn(i) for i in closed], state=False, agent=True)
    return closed, why_not


def emergency(pool: Pool, run_id: str, instance_ids: Iterable[str], clock: Clock = SYSTEM_CLOCK,
              github: GitHubClient | None = None) -> Cleanup:
    """Terminate everything a provision touched, whatever state its rows are in.

    Rows still the run's (or no run's) are marked first; whatever fails on the
    way, the instances are still terminated.
    """
    ids = sorted(set(instance_ids))
    if not ids:
        return Cleanup()
    agents: dict[str, AgentRecord | None] | None = None
    try:
        rows = store.read_set(pool, ids)
        agents = {i: a for i, (_, a) in rows.items()}
        mark(pool, [Doomed(i, r.state, r.run_id) for i, (r, _) in rows.items()
                    if r is not None and r.state is not State.TERMINATED and r.run_id in (run_id, None)],
             clock.now())
    except Exception as exc:  # noqa: BLE001 - the safety net must still terminate
        event("emergency.rows_failed", run_id=run_id, error=str(exc))
    try:
        out = finish(pool, ids, clock, github, agents=agents if agents is not None else {})
    except Exception as exc:  # noqa: BLE001 - report, never mask the error that brought us here
        out = Cleanup(failed=ids, error=str(exc))
    event("emergency.done", run_id=run_id, terminated=out.terminated, failed=out.failed)
    return out


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


def terminate_ec2(region: str, instance_ids: list[str], clock: Clock = SYSTEM_CLOCK,
                  not_found_retry_s: float | None = None) -> Termination:
    """TerminateInstances in batches; an id EC2 does not know (yet) is retried, then reported."""
    ec2 = aws.client("ec2", region)
    done: list[str] = []
    unknown: list[str] = []
    for chunk in aws.chunks(sorted(set(instance_ids)), TERMINATE_BATCH):
        try:
            with aws.mapped("ec2:TerminateInstances"):
                ec2.terminate_instances(InstanceIds=chunk)
            done.extend(chunk)
        except aws.NotFound:
            unknown.extend(_terminate_one_by_one(ec2, chunk, done))   # one unknown id fails the whole call
    deadline = Deadline(NOT_FOUND_RETRY_S if not_found_retry_s is None else not_found_retry_s, clock)
    delay = NOT_FOUND_BACKOFF_S[0]
    attempts = 1
    while unknown and not deadline.expired:
        clock.sleep(min(delay, deadline.remaining_s))
        delay = min(delay * 2, NOT_FOUND_BACKOFF_S[1])
        attempts += 1
        unknown = _terminate_one_by_one(ec2, unknown, done)
    if unknown:
        event("terminate.not_found", logging.WARNING, instance_ids=unknown, attempts=attempts,
              retried_s=round(deadline.elapsed_s, 1))
    return Termination(done, unknown)


def _terminate_one_by_one(ec2: Any, instance_ids: list[str], done: list[str]) -> list[str]:
    """Terminate each id on its own, appending the terminated to ``done``; returns the ids EC2 does not know."""
    not_found: list[str] = []
    for iid in instance_ids:
        try:
            with aws.mapped("ec2:TerminateInstances"):
                ec2.terminate_instances(InstanceIds=[iid])
            done.append(iid)
        except aws.NotFound:
            not_found.append(iid)
    return not_found
