"""Refresh: keep a pool converged and clean; meant for a scheduled workflow.

In order, each step idempotent:

1. **table and stored config**: the table exists; the stored config is the
   one given (so later ``--pool`` commands see a changed AMI or class list);
2. **launch template**: a new version, made default, only when the rendered
   template differs from the current default in EC2; old versions pruned;
3. **queues**: one per configured class; a removed class's queue is drained,
   its idle instances terminated and the queue (and DLQ) deleted; messages
   that reached a DLQ are put back when their instance is still idle;
4. **tokens**: fetched from GitHub when less than ``token_refresh_margin_s``
   of their hour is left, stored in SSM SecureString;
5. **expiry**, two-phase: rows past their threshold (idle, claimed, created,
   draining, running past max runtime) and idle instances past their
   lifetime are marked ``terminated`` (conditional on still being expired),
   then their instances terminated, then their agent rows removed (the state
   row expires through TTL);
6. **reconcile** (see :mod:`controlplane.reconcile`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, launch_template, store, termination, token
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.config import PoolConfig
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.reconcile import ReconcileResult, reconcile
from controlplane.records import State
from controlplane.store import Pool
from controlplane.termination import Doomed

EXPIRING_STATES = (State.IDLE, State.CLAIMED, State.CREATED, State.DRAINING, State.RUNNING)


@dataclass
class RefreshResult:
    pool: str
    launch_template_version: int = 0
    launch_template_changed: bool = False
    versions_pruned: list[int] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    classes_removed: list[str] = field(default_factory=list)
    dlq_redriven: int = 0
    tokens_rotated: bool = False
    tokens_expire_at: float = 0.0
    expired: dict[str, list[str]] = field(default_factory=dict)
    terminated: list[str] = field(default_factory=list)
    reconcile: ReconcileResult | None = None
    failed: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and (self.reconcile is None or not self.reconcile.failed)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "reconcile"}
        d["ok"] = self.ok
        d["reconcile"] = self.reconcile.to_dict() if self.reconcile else None
        return d

    def summary(self) -> str:
        lt = (f"launch template v{self.launch_template_version}"
              + (" (new version)" if self.launch_template_changed else " (unchanged)"))
        exp = sum(len(v) for v in self.expired.values())
        lines = [f"refreshed pool {self.pool} in {self.duration_s:.1f} s: {lt}, queues {', '.join(self.queues)}"
                 + (f" (removed {', '.join(self.classes_removed)})" if self.classes_removed else "")
                 + f", tokens {'rotated' if self.tokens_rotated else 'fresh'}, {exp} expired instance(s) terminated"]
        if self.reconcile is not None:
            lines.append(self.reconcile.summary())
        if self.failed:
            lines.append("failed: " + "; ".join(self.failed))
        return "\n".join(lines)


def refresh(cfg: PoolConfig, github: GitHubClient | None = None, progress: Progress = QUIET,
            clock: Clock = SYSTEM_CLOCK, run_reconcile: bool = True) -> RefreshResult:
    started = time.monotonic()
    github = github or github_client_for(cfg.github)
    launch_template.render(cfg)                          # bad input fails here, before any change
    account, partition = aws.account_and_partition(cfg.region)
    pool = Pool(cfg, account, partition)
    res = RefreshResult(cfg.name)
    store.ensure_table(cfg)

    progress.phase("[1/5] launch template")
    lt = launch_template.ensure(cfg)
    res.launch_template_version, res.launch_template_changed = lt.default_version, lt.changed
    res.versions_pruned = list(lt.pruned)

    progress.phase("[2/5] queues")
    urls = pool_q.ensure_queues(cfg)
    res.queues = sorted(urls)
    for cls, url in sorted(pool_q.pool_queues(cfg).items()):
        if cls not in cfg.resource_classes:
            res.terminated += _remove_class(pool, cls, url, clock)
            res.classes_removed.append(cls)
    for cls in cfg.resource_classes:
        res.dlq_redriven += _redrive(pool, cls, urls[cls])
    store.save_pool(pool, extra={"queues": urls, "launch_template": {"id": lt.template_id,
                                                                     "version": lt.default_version}})

    progress.phase("[3/5] runner tokens")
    tokens, res.tokens_rotated = token.ensure_tokens(cfg, github, now=clock.now())
    res.tokens_expire_at = tokens.expires_at

    progress.phase("[4/5] expired instances")
    res.expired = expire(pool, clock)
    res.terminated += [i for ids in res.expired.values() for i in ids]

    if run_reconcile:
        progress.phase("[5/5] reconcile")
        res.reconcile = reconcile(pool, github=github, clock=clock)
    res.duration_s = round(time.monotonic() - started, 3)
    event("refresh.done", pool=cfg.name, lt_version=res.launch_template_version, lt_changed=lt.changed,
          classes_removed=res.classes_removed, tokens_rotated=res.tokens_rotated, expired=res.expired,
          duration_s=res.duration_s)
    return res


def expire(pool: Pool, clock: Clock = SYSTEM_CLOCK) -> dict[str, list[str]]:
    """Two-phase termination of rows past their threshold (and idle ones past their lifetime)."""
    now = clock.now()
    out: dict[str, list[str]] = {}
    doomed: list[Doomed] = []
    seen: set[tuple[str, State]] = set()
    for state in EXPIRING_STATES:
        for r in store.records_in_state(pool, state, threshold_before=now):
            doomed.append(Doomed(r.instance_id, state, r.run_id, "expired"))
            seen.add((r.instance_id, state))
            out.setdefault(state.value, []).append(r.instance_id)
    lifetime_cut = now - pool.config.max_lifetime_s
    for r in store.records_in_state(pool, State.IDLE, launched_before=lifetime_cut):
        if r.launched_at <= lifetime_cut and (r.instance_id, State.IDLE) not in seen:
            doomed.append(Doomed(r.instance_id, State.IDLE, None, "any"))
            out.setdefault("lifetime", []).append(r.instance_id)
    if not doomed:
        return out
    marked = _marked(pool, doomed, now)        # phase 1: mark, only if still expired (a claim may have won)
    done = termination.finish(pool, marked, clock)                                              # phase 2
    event("refresh.expired", pool=pool.name, marked=marked, terminated=done.terminated)
    won = set(marked)
    return {k: [i for i in v if i in won] for k, v in out.items()}


def _marked(pool: Pool, doomed: list[Doomed], now: float) -> list[str]:
    """Mark rows ``terminated`` (in parallel: one at a time, 700 expired rows of a 10,000-row pool were
    700 sequential round trips); the ids whose mark won, in order."""
    return [iid for iid, t in termination.mark(pool, doomed, now).items() if t.won]


def _remove_class(pool: Pool, cls: str, url: str, clock: Clock) -> list[str]:
    """Drain a removed class's queue, terminate its idle instances, delete its queues."""
    pool_q.drain(pool.region, url)
    idle = [r for r in store.records_in_state(pool, State.IDLE) if r.resource_class == cls]
    marked = _marked(pool, [Doomed(r.instance_id, State.IDLE, None, "any") for r in idle], clock.now())
    out = termination.finish(pool, marked, clock)
    pool_q.delete_queue(pool.region, url)
    dlq = pool_q.dlq_url(pool.config, cls)
    if dlq:
        pool_q.delete_queue(pool.region, dlq)
    event("refresh.class_removed", pool=pool.name, resource_class=cls, terminated=out.terminated)
    return out.terminated


def _redrive(pool: Pool, cls: str, url: str) -> int:
    dlq = pool_q.dlq_url(pool.config, cls)
    if not dlq:
        return 0
    msgs = pool_q.drain(pool.region, dlq, max_rounds=100)
    if not msgs:
        return 0
    rows = store.read_set(pool, [m.instance_id for m in msgs])
    keep = [m for m in msgs if (row := rows[m.instance_id][0]) is not None and row.state is State.IDLE]
    if keep:
        pool_q.send(pool.region, url, keep)
    return len(keep)
