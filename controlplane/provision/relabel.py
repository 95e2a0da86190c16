"""Relabel: a warm hit changes a listening runner's labels instead of registering a new one.

A runner in the pool stays registered on GitHub and listening between runs,
with no label at all: the agent registers with ``--no-default-labels``, so
GitHub gives it no read-only label (``self-hosted``, OS, arch), and release
removes its custom labels. No ``runs-on:`` can name it while it waits.

**Claim** (:func:`claim`), for the members selection claimed, in parallel:

1. set the runner's custom labels to the run's (``PUT .../labels``: the run
   label and the pool label), one call per runner (GitHub has no batch
   endpoint);
2. check that it took (``GET .../runners/{id}``): online, not busy, named as
   its agent reported, and carrying exactly the run's labels. A change not in
   effect yet is polled for (every ``CHECK_POLL_S``, up to
   ``LABEL_TIMEOUT_S``): the claim waits for it, it never assumes it;
3. a member whose agent reports no registered runner, whose relabel GitHub
   refuses, whose runner is offline, busy, gone or does not show the labels
   in time falls back, alone, to a fresh registration: the pool's
   registration token goes into its (claimed) row, then its old runner is
   deleted on GitHub; its agent registers a new runner for the run and
   validation waits for it as for a created instance.

With no fallback a warm runner costs two GitHub calls and its agent does
nothing at all; the agent's heartbeat was checked by selection's health read
right after the claim. All or nothing still holds: a relabelled member is
ready only when the check passed and its heartbeat is fresh, and a rollback
removes the run's labels again.

**Release** (:func:`unlabel`, also the rollback of relabelled members): for
each listening runner whose agent heartbeats, check it is online and not
busy (``GET``), remove its custom
labels (``DELETE .../labels``), then move its row straight to ``idle`` and
requeue it. A busy runner, one GitHub cannot change, or one whose agent
reports no runner takes the draining path instead (the agent stops and wipes
it, the control plane deletes it), so nothing is put back in the pool while a
job may still run on it.

Why a label that lingers is harmless: run labels are unique per run attempt
and never reused (docs/architecture.md, "Runner labels"), so a job that could
still match a removed label belongs to a run that is over, and a runner is
only claimed again after the check saw exactly the new run's labels and no
job on it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane import aws, store
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline
from controlplane.errors import RunnerPoolError
from controlplane.logs import event
from controlplane.records import REGISTRATION_TOKEN, AgentRecord, Member, State
from controlplane.state import transition
from controlplane.store import Pool

if TYPE_CHECKING:
    from controlplane.github import GitHubClient, GitHubRunner

LABEL_TIMEOUT_S = 30.0          # a label change must show on the runner within this, else fall back
CHECK_POLL_S = 0.2


@dataclass
class ClaimResult:
    ready: list[Member] = field(default_factory=list)        # relabelled and checked
    fallback: list[Member] = field(default_factory=list)     # registering anew: a credential is in the row
    lost: list[Member] = field(default_factory=list)         # the row moved on before the credential went in
    reasons: dict[str, str] = field(default_factory=dict)    # instance id -> why it fell back
    checks: int = 0                                          # GET rounds until every label showed


def run_labels(pool: Pool, run_id: str) -> tuple[str, ...]:
    """What a runner of ``run_id`` carries: the run label (``runs-on:``) and the pool label."""
    return (run_id, pool.config.pool_label)


def listening_runner(member: Member, agent: AgentRecord | None) -> int | None:
    """The GitHub id of the runner the member's agent reports registered, if it names this instance."""
    if agent is None or not agent.holds_runner:
        return None
    if not str(agent.runner_name).startswith(f"{member.instance_id}-"):
        return None                         # the agent row is the instance's to write: trust only its own name
    return agent.runner_id


def claim(pool: Pool, github: GitHubClient, run_id: str, members: list[Member],
          agents: Mapping[str, AgentRecord | None], registration: Callable[[], dict[str, str]],
          clock: Clock = SYSTEM_CLOCK) -> ClaimResult:
    """Relabel each claimed member for ``run_id``; fall back per member (see the module docstring).

    ``registration`` returns the credential a fallback puts into the row (the
    pool's token, read only when some member needs it).
    """
    res = ClaimResult()
    if not members:
        return res
    labels = run_labels(pool, run_id)
    wanted = {label.lower() for label in labels}
    runner_of: dict[str, int] = {}
    for m in members:
        rid = listening_runner(m, agents.get(m.instance_id))
        if rid is None:
            res.reasons[m.instance_id] = "its agent reports no registered runner"
        else:
            runner_of[m.instance_id] = rid
    set_results = github.set_labels_many([(rid, labels) for rid in runner_of.values()])
    for iid, rid in list(runner_of.items()):
        outcome = set_results.get(rid)
        if isinstance(outcome, RunnerPoolError):
            res.reasons[iid] = f"relabel refused: {outcome.message}"
            del runner_of[iid]
    pending = dict(runner_of)
    deadline = Deadline(LABEL_TIMEOUT_S, clock)
    ready: set[str] = set()
    while pending:
        res.checks += 1
        seen = github.get_runners(list(pending.values()))
        for iid, rid in list(pending.items()):
            verdict = _check(seen.get(rid), agents[iid], wanted)
            if verdict == "ready":
                ready.add(iid)
                del pending[iid]
            elif verdict:
                res.reasons[iid] = verdict
                del pending[iid]
        if not pending or deadline.expired:
            break
        clock.sleep(min(CHECK_POLL_S, max(deadline.remaining_s, 0.01)))
    for iid in pending:
        res.reasons[iid] = f"its labels did not show within {LABEL_TIMEOUT_S:.0f} s"
    res.ready = [m for m in members if m.instance_id in ready]
    falling = [m for m in members if m.instance_id in res.reasons]
    if falling:
        _fall_back(pool, github, run_id, falling, agents, registration, res)
    event("relabel.claim", run_id=run_id, relabelled=[m.instance_id for m in res.ready],
          fallback=res.reasons, lost=[m.instance_id for m in res.lost], checks=res.checks)
    return res


def _check(runner: GitHubRunner | None | RunnerPoolError, agent: AgentRecord | None, wanted: set[str]) -> str:
    """'ready', '' (not yet: poll again), or why the member must fall back."""
    if isinstance(runner, RunnerPoolError):
        return f"runner check failed: {runner.message}"
    if runner is None:
        return "its runner is gone from GitHub"
    if agent is None or runner.name != agent.runner_name:
        return f"runner {runner.id} is named {runner.name}, not as its agent reported"
    if runner.status != "online":
        return f"runner {runner.name} is {runner.status}"
    if runner.busy:
        return f"runner {runner.name} is busy with a job"
    return "ready" if {label.lower() for label in runner.labels} == wanted else ""


def _fall_back(pool: Pool, github: GitHubClient, run_id: str, members: list[Member],
               agents: Mapping[str, AgentRecord | None], registration: Callable[[], dict[str, str]],
               res: ClaimResult) -> None:
    """Hand each member a registration credential in its row, then delete its old runner.

    The credential goes first: the agent of a runner deleted on GitHub looks
    for one in its row, and an agent that finds one while its runner still
    listens stops that runner itself before it registers.
    """
    from controlplane.termination import remove_runners

    token = registration()[REGISTRATION_TOKEN]

    def one(m: Member) -> bool:
        return store.set_registration(pool, m.instance_id, run_id, State.CLAIMED, REGISTRATION_TOKEN, token)

    handed = aws.parallel(one, members)
    for m, ok in zip(members, handed, strict=True):
        (res.fallback if ok else res.lost).append(m)
    old = {m.instance_id: agents.get(m.instance_id) for m in res.fallback
           if listening_runner(m, agents.get(m.instance_id)) is not None}
    if old:
        remove_runners(pool, github, old)


def unlabel(pool: Pool, github: GitHubClient, run_id: str, members: list[Member],
            agents: Mapping[str, AgentRecord | None], from_: State,
            clock: Clock = SYSTEM_CLOCK) -> tuple[list[Member], list[Member]]:
    """Put listening runners back in the pool without leaving GitHub (see the module docstring).

    Returns ``(returned, rest)``: ``rest`` must take the draining path.
    """
    now = clock.now()
    cfg = pool.config
    runner_of: dict[str, int] = {}
    why: dict[str, str] = {}
    for m in members:
        agent = agents.get(m.instance_id)
        rid = listening_runner(m, agent)
        if rid is None:
            why[m.instance_id] = "its agent reports no registered runner"
        elif agent is None or not agent.is_healthy(now, cfg.heartbeat_stale_s):
            why[m.instance_id] = "its agent's heartbeat is stale"        # the draining path judges it dead
        else:
            runner_of[m.instance_id] = rid
    if not runner_of:
        return [], list(members)
    seen = github.get_runners(list(runner_of.values()))
    for iid, rid in list(runner_of.items()):
        runner = seen.get(rid)
        if isinstance(runner, RunnerPoolError) or runner is None:
            why[iid] = "gone or unreadable on GitHub"
        elif runner.busy:
            why[iid] = "busy with a job"
        elif runner.status != "online":
            why[iid] = f"runner {runner.name} is {runner.status}"
        else:
            continue
        del runner_of[iid]
    cleared = github.set_labels_many([(rid, ()) for rid in runner_of.values()])
    for iid, rid in list(runner_of.items()):
        if isinstance(cleared.get(rid), RunnerPoolError):
            why[iid] = f"labels not removed: {cleared[rid]}"
            del runner_of[iid]
    def idle(m: Member) -> bool:
        t = transition(pool, m.instance_id, from_=from_, to=State.IDLE, expect_run=run_id, set_run=None, now=now,
                       when="any")
        if t.lost:
            why[m.instance_id] = f"row moved on: {t.reason}"
        return t.won

    candidates = [m for m in members if m.instance_id in runner_of]
    back = [m for m, won in zip(candidates, aws.parallel(idle, candidates), strict=True) if won]
    pool_q.requeue(cfg, back, now)
    returned = {m.instance_id for m in back}
    rest = [m for m in members if m.instance_id not in returned]
    event("relabel.release", run_id=run_id, returned=sorted(returned), drained=why)
    return back, rest
