"""Release: give a run's runners back to the pool.

A listening runner (the default, relabelling) stays registered: its run's
labels are removed through GitHub's API after a check that it is not busy,
and its row goes straight back to ``idle`` and into the queue
(``provision/relabel.py``); its agent does nothing. Every other instance of
the run (``fresh_registration``, a busy runner, one GitHub cannot relabel,
one being retired) takes the draining path: clear the run from its row (``-> draining``),
wait until its agent signals that it stopped the runner and wiped its
credentials, delete the runner on GitHub (REST API, by the id the agent
reported), then put it back to ``idle`` with a fresh idle threshold and
requeue it in its class's queue; the run's cost tags
(:mod:`controlplane.costtags`) come off before anything is requeued. An instance is terminated instead when its
agent does not confirm in time (or is dead: no fresh heartbeat), when it has
served ``max_reuse`` runs, is older than ``max_lifetime_s``, its class is no
longer configured, or its class is ephemeral (one run per instance).
Instances of the run still ``created`` (a provision that died) are
terminated.

Release is idempotent: a second release of the same run finds no rows
carrying the run and says so; a release of a run whose provision rolled back
finds nothing either.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, costtags, metrics, store, termination
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.drain import return_to_pool
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.provision import relabel
from controlplane.records import InstanceRecord, Member, State
from controlplane.store import Pool
from controlplane.termination import Doomed


@dataclass
class ReleaseResult:
    run_id: str
    found: list[str] = field(default_factory=list)
    returned_to_pool: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    api_calls: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_id": self.run_id, "found": self.found, "returned_to_pool": self.returned_to_pool,
                "terminated": self.terminated, "failed": self.failed, "duration_s": self.duration_s,
                "api_calls": self.api_calls}

    def summary(self) -> str:
        if not self.found:
            return f"nothing to release for run {self.run_id} (already released, rolled back, or never provisioned)"
        line = (f"released run {self.run_id}: {len(self.returned_to_pool)} back in the pool, "
                f"{len(self.terminated)} terminated, {self.duration_s:.1f} s")
        if self.failed:
            line += f"; {len(self.failed)} could not be cleaned ({', '.join(self.failed)}): run `runner-pool reconcile`"
        return line


def member_of(r: InstanceRecord) -> Member:
    return Member(r.instance_id, r.arn, "pool", r.instance_type, r.subnet_id, r.usage_class, r.resource_class)


def release(pool: Pool, run_id: str, progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK,
            github: GitHubClient | None = None) -> ReleaseResult:
    gh = github or github_client_for(pool.config.github)     # no credential: bad input, before any AWS call
    with aws.counted() as calls:
        started = time.monotonic()
        res = ReleaseResult(run_id)
        try:
            _release(pool, run_id, res, progress, clock, gh)
        finally:
            res.duration_s = round(time.monotonic() - started, 3)
            res.api_calls = calls.by_service()
            event("release.done", run_id=run_id, instance_ids=res.found, returned=res.returned_to_pool,
                  terminated=res.terminated, failed=res.failed, duration_s=res.duration_s)
            metrics.publish_release(res, pool.config)
    return res


def _release(pool: Pool, run_id: str, res: ReleaseResult, progress: Progress, clock: Clock,
             gh: GitHubClient) -> None:
    cfg = pool.config
    records = [r for r in store.run_records(pool, run_id) if r.state is not State.TERMINATED]
    res.found = [r.instance_id for r in records]
    if not records:
        progress.phase(f"run {run_id}: nothing to release")
        return
    now = clock.now()
    created = [r for r in records if r.state is State.CREATED]
    active = [r for r in records if r.state in (State.CLAIMED, State.RUNNING, State.DRAINING)]
    by_id = {r.instance_id: r for r in records}

    def why_retire(m: Member) -> str | None:
        r = by_id[m.instance_id]
        if m.resource_class not in cfg.resource_classes:
            return f"class {m.resource_class} is no longer configured"
        if cfg.is_ephemeral(m.resource_class):
            return "ephemeral: an instance serves one run"
        if r.reuse_count >= cfg.max_reuse:
            return f"served {r.reuse_count} runs (max_reuse {cfg.max_reuse})"
        if now - r.launched_at >= cfg.max_lifetime_s:
            return f"older than max_lifetime_s ({cfg.max_lifetime_s} s)"
        return None

    progress.phase(f"run {run_id}: releasing {len(active)} runner(s), terminating {len(created)} unvalidated")
    # Before any of them is requeued (a relabelled runner is requeued by unlabel): once in the queue, the
    # next run may claim and tag it.
    costtags.untag(cfg, run_id, [r.instance_id for r in active])
    relabelled: list[str] = []
    listening = [member_of(r) for r in active if r.state is State.RUNNING and not cfg.fresh_registration
                 and not why_retire(member_of(r))]
    if listening:
        agents = {i: a for i, (_, a) in store.read_set(pool, [m.instance_id for m in listening]).items()}
        back, _ = relabel.unlabel(pool, gh, run_id, listening, agents, State.RUNNING, clock)
        relabelled = [m.instance_id for m in back]
        active = [r for r in active if r.instance_id not in set(relabelled)]
    unvalidated = [Doomed(r.instance_id, State.CREATED, run_id) for r in created]
    cleanup = termination.retire(pool, unvalidated, clock, gh)
    cleanup.merge(return_to_pool(pool, run_id, [member_of(r) for r in active], None, progress, clock,
                                 retire=why_retire, github=gh))
    res.returned_to_pool, res.terminated, res.failed = (relabelled + cleanup.returned_to_pool,
                                                        cleanup.terminated, cleanup.failed)
