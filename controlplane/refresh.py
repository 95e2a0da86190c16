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
5. **expiry**, two-phase: idle runners past their threshold in a class with
   a stopped tier are stopped instead (:mod:`controlplane.stopped_tier`);
   rows past their threshold (idle, claimed, created, draining, stopped,
   running past max runtime) and idle or stopped instances past their
   lifetime are marked ``terminated`` (conditional on still being expired),
   then their instances terminated, then their agent rows removed (the state
   row expires through TTL); instances whose agent signalled a spot
   interruption are terminated and counted for the class's breaker;
6. **reconcile** (see :mod:`controlplane.reconcile`);
7. **warm minimum** (see :mod:`controlplane.warm`): each class topped up to its
   ``min_idle`` in force with one CreateFleet; expiry (5) already kept the idle
   rows the minimum needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, interruptions, launch_template, stopped_tier, store, termination, token
from controlplane import pool as pool_q
from controlplane import warm as warm_pool
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.config import PoolConfig
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.reconcile import ReconcileResult, reconcile
from controlplane.records import State
from controlplane.store import Pool
from controlplane.termination import Doomed

EXPIRING_STATES = (State.IDLE, State.CLAIMED, State.CREATED, State.DRAINING, State.RUNNING, State.STOPPED)
# Rows whose agent signalled a spot interruption are terminated from these states by the sweep.
INTERRUPTIBLE_STATES = (State.IDLE, State.RUNNING, State.CLAIMED, State.CREATED, State.DRAINING)


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
    stopped: list[str] = field(default_factory=list)         # idle runners parked in the stopped tier
    interrupted: list[str] = field(default_factory=list)     # terminated after a spot interruption notice
    reconcile: ReconcileResult | None = None
    warm: warm_pool.WarmResult | None = None
    failed: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and (self.reconcile is None or not self.reconcile.failed)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("reconcile", "warm")}
        d["ok"] = self.ok
        d["reconcile"] = self.reconcile.to_dict() if self.reconcile else None
        d["warm"] = self.warm.to_dict() if self.warm else None
        return d

    def summary(self) -> str:
        lt = (f"launch template v{self.launch_template_version}"
              + (" (new version)" if self.launch_template_changed else " (unchanged)"))
        exp = sum(len(v) for v in self.expired.values())
        lines = [f"refreshed pool {self.pool} in {self.duration_s:.1f} s: {lt}, queues {', '.join(self.queues)}"
                 + (f" (removed {', '.join(self.classes_removed)})" if self.classes_removed else "")
                 + f", tokens {'rotated' if self.tokens_rotated else 'fresh'}, {exp} expired instance(s) terminated"
                 + (f", {len(self.stopped)} idle runner(s) stopped" if self.stopped else "")
                 + (f", {len(self.interrupted)} interrupted instance(s) terminated" if self.interrupted else "")]
        if self.reconcile is not None:
            lines.append(self.reconcile.summary())
        if self.warm is not None and self.warm.targets:
            lines.append(self.warm.summary())
        if self.failed:
            lines.append("failed: " + "; ".join(self.failed))
        return "\n".join(lines)


def refresh(cfg: PoolConfig, github: GitHubClient | None = None, progress: Progress = QUIET,
            clock: Clock = SYSTEM_CLOCK, run_reconcile: bool = True) -> RefreshResult:
    started = time.monotonic()
    github = github or github_client_for(cfg.github)
    launch_template.render(cfg)                          # bad input fails here, before any change
    launch_template.check_architectures(cfg)
    account, partition = aws.account_and_partition(cfg.region)
    pool = Pool(cfg, account, partition)
    res = RefreshResult(cfg.name)
    store.ensure_table(cfg)

    progress.phase("[1/6] launch template")
    lt = launch_template.ensure(cfg)
    res.launch_template_version, res.launch_template_changed = lt.default_version, lt.changed
    res.versions_pruned = list(lt.pruned)

    progress.phase("[2/6] queues")
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

    progress.phase("[3/6] runner tokens")
    tokens, res.tokens_rotated = token.ensure_tokens(cfg, github, now=clock.now())
    res.tokens_expire_at = tokens.expires_at

    progress.phase("[4/6] expired instances")
    parked = stopped_tier.park_expired(pool, clock)
    res.stopped = parked.stopped
    res.terminated += parked.terminated
    res.expired = expire(pool, clock)
    res.terminated += [i for ids in res.expired.values() for i in ids]
    res.interrupted = sweep_interrupted(pool, clock, github)
    res.terminated += res.interrupted

    if run_reconcile:
        progress.phase("[5/6] reconcile")
        res.reconcile = reconcile(pool, github=github, clock=clock)
    if warm_pool.wants_warm(pool):
        progress.phase("[6/6] warm minimum")
        res.warm = warm_pool.top_up(pool, clock, progress, exclude=set(res.terminated))
        res.failed += res.warm.failed
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
        rows = store.records_in_state(pool, state, threshold_before=now)
        if state is State.IDLE:
            rows = warm_pool.hold_minimum(pool, rows, now)       # idle above the warm minimum expires
        for r in rows:
            doomed.append(Doomed(r.instance_id, state, r.run_id, "expired"))
            seen.add((r.instance_id, state))
            out.setdefault(state.value, []).append(r.instance_id)
    lifetime_cut = now - pool.config.max_lifetime_s
    for parked in (State.IDLE, State.STOPPED):
        for r in store.records_in_state(pool, parked, launched_before=lifetime_cut):
            if r.launched_at <= lifetime_cut and (r.instance_id, parked) not in seen:
                doomed.append(Doomed(r.instance_id, parked, None, "any"))
                out.setdefault("lifetime", []).append(r.instance_id)
    if not doomed:
        return out
    marked = _marked(pool, doomed, now)        # phase 1: mark, only if still expired (a claim may have won)
    done = termination.finish(pool, marked, clock)                                              # phase 2
    event("refresh.expired", pool=pool.name, marked=marked, terminated=done.terminated)
    won = set(marked)
    return {k: [i for i in v if i in won] for k, v in out.items()}


def sweep_interrupted(pool: Pool, clock: Clock = SYSTEM_CLOCK, github: GitHubClient | None = None) -> list[str]:
    """Terminate instances whose agent signalled a spot interruption (their runner removed from GitHub
    first), and count them for the class's breaker. One Scan of the agent rows."""
    hit = [iid for iid, a in store.all_agents(pool).items() if a.interrupted]
    if not hit:
        return []
    live = [r for r, _ in store.read_set(pool, hit).values() if r is not None and r.state in INTERRUPTIBLE_STATES]
    if not live:
        return []
    interruptions.record(pool, {r.instance_id: r.resource_class for r in live}, clock.now())
    out = termination.retire(pool, [Doomed(r.instance_id, r.state, r.run_id) for r in live], clock, github)
    event("refresh.interrupted", pool=pool.name, terminated=out.terminated)
    return out.terminated


def _marked(pool: Pool, doomed: list[Doomed], now: float) -> list[str]:
    """Mark rows ``terminated`` (in parallel: one at a time, 700 expired rows of a 10,000-row pool were
    700 sequential round trips); the ids whose mark won, in order."""
    return [iid for iid, t in termination.mark(pool, doomed, now).items() if t.won]


def _remove_class(pool: Pool, cls: str, url: str, clock: Clock) -> list[str]:
    """Drain a removed class's queue, terminate its idle instances, delete its queues."""
    pool_q.drain(pool.region, url)
    parked = [r for st in (State.IDLE, State.STOPPED) for r in store.records_in_state(pool, st)
              if r.resource_class == cls]
    marked = _marked(pool, [Doomed(r.instance_id, r.state, None, "any") for r in parked], clock.now())
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
