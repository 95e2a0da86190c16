"""Finalize: decide a provision's outcome from the phases' records, then carry it out.

:func:`decide` is the one decision, a pure function over the selection,
creation and validation records: **commit** the whole set, or **roll back**
with a typed reason (:class:`~controlplane.errors.CapacityError`,
:class:`~controlplane.errors.ValidationTimeout`,
:class:`~controlplane.errors.ValidationFailed`). The rollback sets (who goes
back to the pool, who is terminated) are computed there and nowhere else.

* **commit** (:func:`commit`): every member goes to ``running`` with the run
  id and a fresh threshold (now + max runtime), in one DynamoDB transaction
  per 100 members (:func:`controlplane.state.transition_together`); claimed
  but unhealthy runners are retired. If any commit loses its race (refresh expired a row
  meanwhile), all or nothing still holds: the committed members are given
  back to the pool, the lost ones terminated, and the result says
  :class:`~controlplane.errors.CommitRaced`.
* **rollback** (:func:`rollback`): healthy claimed instances leave the run
  and return to the pool once their agents deregister
  (:func:`controlplane.drain.return_to_pool`); created and unhealthy ones are
  retired (:func:`controlplane.termination.retire`). (The reference requeued
  first, so the next claimer could meet a runner still registered for the
  failed run.)

An exception anywhere takes the emergency path instead
(:func:`controlplane.termination.emergency`, called by the orchestrator).
Every transition also removes the registration credential from the state row
(see :func:`controlplane.state.transition`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.drain import return_to_pool
from controlplane.errors import CapacityError, CommitRaced, ProvisionFailure
from controlplane.logs import QUIET, Progress, event
from controlplane.provision.creation import CreationResult
from controlplane.provision.selection import SelectionResult
from controlplane.provision.validation import ValidationResult
from controlplane.records import Member, State
from controlplane.state import Move, transition_together
from controlplane.store import Pool
from controlplane.termination import Cleanup, Doomed, finish, retire

if TYPE_CHECKING:
    from controlplane.github import GitHubClient

CLAIMED_SOURCES = ("pool", "stopped")      # members that were claimed rows: reused, returned to the pool

__all__ = ["Cleanup", "Commit", "Finalized", "Outcome", "Rollback", "commit", "decide", "rollback"]


@dataclass(frozen=True)
class Commit:
    """Accept the set: every member to ``running``; the unhealthy claims are retired."""

    members: list[Member]
    unhealthy: list[Member] = field(default_factory=list)


@dataclass(frozen=True)
class Rollback:
    """Give the set up: ``keep`` go back to the pool, ``doomed`` are terminated, for ``failure``."""

    failure: ProvisionFailure
    keep: list[Member]
    doomed: list[Member]


Outcome = Commit | Rollback


@dataclass(frozen=True)
class Finalized:
    """What finalize did: the accepted set (empty unless ``ok``), the cleanup, and why not, if not."""

    ok: bool
    members: list[Member] = field(default_factory=list)
    cleanup: Cleanup = field(default_factory=Cleanup)
    failure: ProvisionFailure | None = None


def decide(sel: SelectionResult, cr: CreationResult, val: ValidationResult | None) -> Outcome:
    """Commit or roll back, from the phases' records (``val`` is None when validation did not run)."""
    claimed, created = sel.claimed, cr.members
    if cr.shortfall or val is None:
        return Rollback(CapacityError(cr.shortfall, cr.requested, cr.errors_by_code, cr.fell_back),
                        keep=claimed, doomed=created + sel.unhealthy)
    failure = val.failure()
    if failure is None:
        return Commit(claimed + created, sel.unhealthy)
    keep = [m for m in claimed if m.instance_id in val.healthy and m.instance_id not in val.failed]
    return Rollback(failure, keep, created + sel.unhealthy + [m for m in claimed if m not in keep])


def commit(pool: Pool, run_id: str, outcome: Commit, progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK,
           github: GitHubClient | None = None) -> Finalized:
    """Move every member to running; repair a lost race by giving the whole set up."""
    lost = _commit_all(pool, run_id, outcome.members, clock)
    if lost:
        failure = CommitRaced(lost)
        progress.phase(f"      {failure.message}")
        committed = [m for m in outcome.members if m.instance_id not in lost]
        cleanup = return_to_pool(pool, run_id, committed, State.RUNNING, progress, clock, github=github)
        cleanup.merge(finish(pool, lost, clock, github))        # their rows are no longer ours to write
        cleanup.merge(_retire_members(pool, run_id, outcome.unhealthy, clock, github))
        return Finalized(False, cleanup=cleanup, failure=failure)
    cleanup = _retire_members(pool, run_id, outcome.unhealthy, clock, github)
    return Finalized(True, outcome.members, cleanup)


def rollback(pool: Pool, run_id: str, outcome: Rollback, progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK,
             github: GitHubClient | None = None) -> Finalized:
    out = _retire_members(pool, run_id, outcome.doomed, clock, github)
    out.merge(return_to_pool(pool, run_id, outcome.keep, State.CLAIMED, progress, clock, github=github))
    event("rollback.done", run_id=run_id, terminated=out.terminated, returned=out.returned_to_pool,
          failed=out.failed)
    return Finalized(False, cleanup=out, failure=outcome.failure)


def _commit_all(pool: Pool, run_id: str, members: list[Member], clock: Clock) -> list[str]:
    """Every member to running, in one transaction per 100 (row by row only if one is cancelled);
    the ids whose commit lost a race."""
    moves = [Move(m.instance_id, _state_of(m), count_reuse=m.source in CLAIMED_SOURCES) for m in members]
    lost = list(transition_together(pool, moves, to=State.RUNNING, expect_run=run_id, now=clock.now()))
    event("commit.done", run_id=run_id, committed=len(members) - len(lost), lost=lost,
          instance_ids=[m.instance_id for m in members])
    return lost


def _retire_members(pool: Pool, run_id: str, members: list[Member], clock: Clock,
                    github: GitHubClient | None) -> Cleanup:
    return retire(pool, [Doomed(m.instance_id, _state_of(m), run_id) for m in members], clock, github)


def _state_of(m: Member) -> State:
    """The state a member of a provision in progress is in: claimed (from the pool or the stopped tier),
    or created."""
    return State.CLAIMED if m.source in CLAIMED_SOURCES else State.CREATED
