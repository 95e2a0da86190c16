"""The invariant every reliability test ends with: nothing leaks, nothing is shared.

After any fault, and once the control plane has had its say (the operation's
own cleanup, then ``reconcile``), a pool must satisfy all four:

1. every EC2 instance of the pool has a state row that is not ``terminated``;
2. every live row (not ``terminated``) has an instance in EC2;
3. every runner registered on GitHub with the pool's label runs on a live
   instance of the pool (runner names are ``<instance-id>-<n>``);
4. no instance is in two runs: at most one registered runner per instance,
   that runner's run label is the run its row names (if any), and an
   ``idle`` instance (the next run's to claim) has no runner carrying a run.

Terminated instances' agents deregister as the OS shutdown reaches them, so
(3) and (4) are checked until they hold or ``settle_s`` passes; (1) and (2) are
what the control plane wrote and must hold at once.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from controlplane import store
from controlplane.apply import pool_instance_ids
from controlplane.records import State

SETTLE_S = 30.0
POLL_S = 0.25


def labels_of(runner: dict[str, Any]) -> list[str]:
    """The label names of a runner as the GitHub stand-in lists it."""
    return [lb["name"] for lb in runner["labels"]]


def online(emu: Any, label: str) -> list[dict[str, Any]]:
    """The runners GitHub shows online with ``label`` (a run's label is its run id): what a job can run on."""
    return [r for r in emu.runners() if r["status"] == "online" and label in labels_of(r)]


def _github_problems(pool: Any, emu: Any, live: dict[str, Any]) -> list[str]:
    label = pool.config.pool_label
    problems = []
    by_instance: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in emu.runners():
        names = labels_of(r)
        if label not in names:
            continue
        iid = r["name"].rsplit("-", 1)[0]
        if iid not in live:
            problems.append(f"runner {r['name']} ({r['status']}) is registered but instance {iid} is not live")
            continue
        by_instance[iid].append({"name": r["name"], "runs": [n for n in names if n != label
                                                             and n.lower() not in ("self-hosted", "linux", "x64")]})
    for iid, runners in by_instance.items():
        if len(runners) > 1:
            problems.append(f"instance {iid} has {len(runners)} registered runners: {runners}")
        row_run = live[iid].run_id
        for runner in runners:
            if row_run is not None and runner["runs"] and runner["runs"] != [row_run]:
                problems.append(f"instance {iid} is in run {row_run} but its runner {runner['name']} "
                                f"carries {runner['runs']}")
            elif live[iid].state is State.IDLE and runner["runs"]:
                problems.append(f"instance {iid} is idle in the pool but its runner {runner['name']} "
                                f"is still registered for {runner['runs']}")
    return problems


def check(pool: Any, emu: Any, settle_s: float = SETTLE_S) -> dict[str, int]:
    """Assert the four invariants; returns counts for the test's report."""
    rows = {r.instance_id: r for r in store.all_records(pool)}
    live = {i: r for i, r in rows.items() if r.state is not State.TERMINATED}
    in_ec2 = set(pool_instance_ids(pool.config))
    untracked = sorted(in_ec2 - set(live))
    ghosts = sorted(set(live) - in_ec2)
    assert not untracked, f"EC2 instances with no live row: {untracked}"
    assert not ghosts, f"live rows whose instance is gone: {ghosts}"
    deadline = time.monotonic() + settle_s
    while True:
        problems = _github_problems(pool, emu, live)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    assert not problems, "; ".join(problems)
    return {"instances": len(in_ec2), "live_rows": len(live), "rows": len(rows)}
