"""Reconcile: make the state table, EC2 and GitHub agree, in both directions.

The control plane runs inside other people's workflows, which get cancelled,
time out and lose their runners; a reaper outside the workflow is what keeps
such systems from leaking (peers' pain point 1). Reconcile is a pure plan
over a snapshot, then an apply:

* an EC2 instance tagged as ours with **no row** (older than a grace period,
  so a provision writing its rows is not raced) is terminated;
* an EC2 instance whose row says **terminated** is terminated again;
* a **live row whose instance is gone** from EC2 is closed (``-> terminated``),
  unless the row is younger than ``VISIBILITY_GRACE_S`` and DescribeInstances
  simply does not list its instance: EC2 is eventually consistent, and right
  after CreateFleet an instance may not be listed yet. One listed as
  ``shutting-down``/``terminated`` is gone whatever its age;
* a **GitHub runner** of this pool whose instance is not live is removed: one
  carrying the pool label, or one with no label at all (a pooled runner
  between runs) named after an instance of this pool's table or EC2 tags;
* a **ceiling counter** that drifted from the live rows (a process died
  between a reservation and its rows, or a mark and its decrement) is set to
  their count, if nobody touched it from ``ceilings.SETTLE_S`` before the
  rows were read until the correction (see :mod:`controlplane.ceilings`).

:func:`plan` does no I/O and is unit-tested on plain data; :func:`reconcile`
takes the snapshot, plans, and applies unless ``dry_run``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, ceilings, store, termination
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.errors import ConfigError
from controlplane.github import GitHubClient, GitHubRunner, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.records import InstanceRecord, State
from controlplane.store import Pool
from controlplane.termination import Doomed

ORPHAN_GRACE_S = 120
VISIBILITY_GRACE_S = 120      # a row this young is not closed because its instance is not listed (yet)
LIVE_EC2_STATES = ("pending", "running", "stopping", "stopped")
_RUNNER_INSTANCE = re.compile(r"^(i-[0-9a-f]+)")


@dataclass(frozen=True)
class Ec2Instance:
    instance_id: str
    state: str
    launched_at: float


@dataclass(frozen=True)
class Snapshot:
    records: list[InstanceRecord]
    instances: list[Ec2Instance]
    runners: list[GitHubRunner] | None         # None: GitHub not checked (no token)
    now: float
    pool_label: str = ""


@dataclass(frozen=True)
class Action:
    kind: str              # terminate_instance | close_row | delete_runner
    target: str
    reason: str
    state: str = ""        # for close_row: the state the row is in
    run_id: str | None = None


@dataclass
class ReconcileResult:
    dry_run: bool
    checked: dict[str, int] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    applied: list[Action] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    ceilings: dict[str, list[int]] = field(default_factory=dict)      # counter -> [was, set to]

    def by_kind(self, actions: list[Action]) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in actions:
            out[a.kind] = out.get(a.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "checked": self.checked, "found": self.by_kind(self.actions),
                "fixed": self.by_kind(self.applied), "failed": self.failed,
                "actions": [a.__dict__ for a in self.actions], "ceilings": self.ceilings}

    def summary(self) -> str:
        c = self.checked
        head = (f"reconcile checked {c.get('rows', 0)} row(s), {c.get('instances', 0)} instance(s), "
                + (f"{c['runners']} GitHub runner(s)" if "runners" in c else "GitHub not checked (no token)"))
        counters = [f"  ceiling counter  {k:<22} counted {a}, {b} live" + ("" if self.dry_run else ": set to " + str(b))
                    for k, (a, b) in sorted(self.ceilings.items())]
        if not self.actions:
            return "\n".join([head + ": no drift", *counters])
        lines = [head + f": {len(self.actions)} problem(s)" + (" (dry run, nothing changed)" if self.dry_run else "")]
        for a in self.actions:
            done = "" if self.dry_run else (" fixed" if a in self.applied else " NOT fixed")
            lines.append(f"  {a.kind:<18} {a.target:<22} {a.reason}{done}")
        lines += counters
        return "\n".join(lines)


def plan(snap: Snapshot) -> list[Action]:
    actions: list[Action] = []
    rows = {r.instance_id: r for r in snap.records}
    live_ec2 = {i.instance_id: i for i in snap.instances if i.state in LIVE_EC2_STATES}
    for iid, inst in sorted(live_ec2.items()):
        row = rows.get(iid)
        if row is None:
            if snap.now - inst.launched_at >= ORPHAN_GRACE_S:
                actions.append(Action("terminate_instance", iid, "instance has no row in the state table"))
        elif row.state is State.TERMINATED:
            actions.append(Action("terminate_instance", iid, "its row says terminated"))
    listed = {i.instance_id for i in snap.instances}
    for iid, row in sorted(rows.items()):
        if row.state is not State.TERMINATED and iid not in live_ec2:
            if iid not in listed and snap.now - row.launched_at < VISIBILITY_GRACE_S:
                continue                        # not visible yet, not known gone
            actions.append(Action("close_row", iid, f"row is {row.state} but the instance is gone from EC2",
                                  state=row.state.value, run_id=row.run_id))
    if snap.runners is not None:
        # Runners of instances this plan terminates go too: one pass converges.
        doomed = {a.target for a in actions if a.kind == "terminate_instance"}
        live_ids = {iid for iid in live_ec2 if iid not in doomed}
        for runner in snap.runners:
            m = _RUNNER_INSTANCE.match(runner.name)
            if snap.pool_label and snap.pool_label not in runner.labels and not (
                    not runner.labels and m is not None and (m.group(1) in rows or m.group(1) in listed)):
                # Not ours, unless it is a runner with no label at all (a pooled runner waits without one)
                # named after an instance this pool knows: a row (kept a day after termination) or a
                # tagged instance. A label-less runner of another pool in the same scope is left alone.
                continue
            if m is None or m.group(1) not in live_ids:
                actions.append(Action("delete_runner", str(runner.id),
                                      f"runner {runner.name} ({runner.status}) has no live instance"))
    return actions


def snapshot(pool: Pool, github: GitHubClient | None, clock: Clock = SYSTEM_CLOCK) -> Snapshot:
    # The orphan grace is judged at the moment the table is read: an instance launched just before
    # may get its row only after that, and the reads of a large pool (pages of rows, instances and
    # runners) can outlast the grace. Taken after the last page, a fresh instance looked orphaned.
    now = clock.now()
    records = store.all_records(pool)
    ec2 = aws.client("ec2", pool.region)
    instances = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag:runner-pool:pool", "Values": [pool.name]},
            {"Name": "instance-state-name", "Values": [*LIVE_EC2_STATES, "shutting-down"]}]):
        for r in page["Reservations"]:
            for i in r["Instances"]:
                instances.append(Ec2Instance(i["InstanceId"], i["State"]["Name"], i["LaunchTime"].timestamp()))
    runners = github.list_runners() if github is not None else None
    return Snapshot(records, instances, runners, now, pool.config.pool_label)


def apply(pool: Pool, actions: list[Action], github: GitHubClient | None, clock: Clock = SYSTEM_CLOCK
          ) -> tuple[list[Action], list[str]]:
    applied: list[Action] = []
    failed: list[str] = []
    doomed = [a for a in actions if a.kind == "terminate_instance"]
    if doomed:
        # Their rows are gone or already say terminated: nothing to mark, the instances go.
        out = termination.finish(pool, [a.target for a in doomed], clock)
        done = set(out.terminated)
        applied += [a for a in doomed if a.target in done]
        failed += [f"{iid}: InvalidInstanceID.NotFound after retries" for iid in out.not_found]
        failed += [f"{iid}: {out.error}" for iid in out.failed]
    # Each close is its own conditional write; at scale they go in parallel and the agent rows of
    # the closed ones in one batch (one at a time, 300 ghost rows were 600 sequential round trips).
    closes = {a.target: a for a in actions if a.kind == "close_row"}
    closed, why_not = termination.close_rows(
        pool, [Doomed(a.target, State(a.state), a.run_id) for a in closes.values()], clock.now())
    applied += [closes[i] for i in closed]
    failed += [f"{iid}: {why}" for iid, why in why_not.items()]
    if github is not None:
        for a in actions:
            if a.kind == "delete_runner":
                github.delete_runner(int(a.target))          # False = already gone: fixed all the same
                applied.append(a)
    return applied, failed


def reconcile(pool: Pool, dry_run: bool = False, github: GitHubClient | None = None,
              progress: Progress = QUIET, clock: Clock = SYSTEM_CLOCK) -> ReconcileResult:
    if github is None:
        try:
            github = github_client_for(pool.config.github)
        except ConfigError:
            github = None                       # without a token, EC2 and the table are still reconciled
    progress.phase(f"reconcile {pool.name}: reading the table, EC2" + (" and GitHub" if github else ""))
    snap = snapshot(pool, github, clock)
    counted = ceilings.read(pool.config, ceilings.counter_keys(pool.config))     # see ceilings.correct()
    res = ReconcileResult(dry_run)
    res.checked = {"rows": len(snap.records), "instances": len(snap.instances)}
    if snap.runners is not None:
        res.checked["runners"] = len(snap.runners)
    res.actions = plan(snap)
    if res.actions and not dry_run:
        res.applied, res.failed = apply(pool, res.actions, github, clock)
    res.ceilings = {k: [a, b] for k, (a, b) in
                    ceilings.correct(pool.config, counted, snap.records, snap.now, dry_run).items()}
    event("reconcile.done", pool=pool.name, dry_run=dry_run, found=res.by_kind(res.actions),
          fixed=res.by_kind(res.applied), failed=res.failed,
          instance_ids=[a.target for a in res.actions if a.kind != "delete_runner"])
    return res
