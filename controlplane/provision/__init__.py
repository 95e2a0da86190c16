"""Provision: hand a run N registered runners carrying its label, or nothing.

Phases, each its own module, each taking and returning records:

1. **selection** claims idle runners from the class's pool queue;
2. **creation** launches the rest with one CreateFleet (two with spot fallback);
3. **validation** waits until every member, claimed and created, is
   registered for the run and heartbeating (all or nothing);
4. **finalize** commits the set to ``running``, or rolls it back (claimed
   runners return to the pool after their agents deregister; created and
   unhealthy ones are terminated). Any exception takes the emergency path:
   everything the provision touched is terminated and the error re-raised
   with what was cleaned up.

The run label is the run id: runners register with ``--labels <run id>`` and
jobs target ``runs-on: <label>``. A run id can hold one live fleet at a time.

Credentials: the control plane alone reads the pool's registration token
(SSM, rotated here when it is close to expiry) and hands it to exactly the
members that must register, inside each one's own state row (the claim write
for pool runners, the ``created`` row for new ones). In ephemeral mode each
created instance gets instead a just-in-time runner config of its own
(``generate-jitconfig``: its name, the run's labels, one job), written into
its row right after the row exists; nothing is claimed from the pool, since
an ephemeral instance is never reused. Commit and rollback remove the
credential from every row before the provision returns, so before any job of
the run can be scheduled. Runners that must leave GitHub (rollback, an
emergency) are deleted through the REST API.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, ceilings, costtags, metrics, poolstats, store
from controlplane import token as tokens
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.config import USAGE_CLASSES
from controlplane.errors import ConfigError, RunnerPoolError
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.provision import creation, finalize, selection, validation
from controlplane.records import JIT_CONFIG, LIVE_STATES, REGISTRATION_TOKEN, Member, State
from controlplane.store import Pool


@dataclass(frozen=True)
class ProvisionRequest:
    run_id: str
    resource_class: str
    count: int
    usage_class: str | None = None          # None: take any from the pool, create with the pool's default
    validation_timeout_s: float | None = None
    tags: Mapping[str, str] = field(default_factory=dict)   # cost tags while the run holds them (costtags.py)


@dataclass
class ProvisionResult:
    ok: bool
    run_id: str
    label: str
    resource_class: str
    usage_class: str
    instances: list[Member] = field(default_factory=list)
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    api_calls: dict[str, int] = field(default_factory=dict)              # by service
    api_calls_by_op: dict[str, int] = field(default_factory=dict)        # by service.Operation
    validated_at: float | None = None     # epoch: when validation saw the whole set ready (or one fail)
    fleet_calls: int = 0
    capacity_errors: dict[str, int] = field(default_factory=dict)
    cleanup: finalize.Cleanup = field(default_factory=finalize.Cleanup)
    from_pool: int = 0
    created: int = 0

    @property
    def instance_ids(self) -> list[str]:
        return [m.instance_id for m in self.instances]

    @property
    def pool_hit_rate(self) -> float:
        total = self.from_pool + self.created
        return round(self.from_pool / total, 3) if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        n = max(1, len(self.instances) or self.from_pool + self.created)
        return {
            "ok": self.ok, "run_id": self.run_id, "label": self.label, "resource_class": self.resource_class,
            "usage_class": self.usage_class,
            "instances": [{"id": m.instance_id, "source": m.source, "instance_type": m.instance_type,
                           "subnet": m.subnet_id, "usage_class": m.usage_class} for m in self.instances],
            "timings": self.timings, "reason": self.reason or None,
            "cleanup": {"terminated": self.cleanup.terminated, "returned_to_pool": self.cleanup.returned_to_pool,
                        "failed": self.cleanup.failed},
            "pool_hit_rate": self.pool_hit_rate, "from_pool": self.from_pool, "created": self.created,
            "api_calls": self.api_calls, "api_calls_by_op": self.api_calls_by_op,
            "api_calls_per_runner": round(sum(self.api_calls.values()) / n, 2),
            "fleet_calls": self.fleet_calls, "capacity_errors": self.capacity_errors,
        }

    def summary(self) -> str:
        if self.ok:
            lines = [f"provisioned {len(self.instances)} runner(s) for run {self.run_id} "
                     f"(label {self.label}): {self.from_pool} from the pool, {self.created} created, "
                     f"{self.timings.get('total', 0):.1f} s"]
            lines += [f"  {m.instance_id}  {m.source:<7}  {m.instance_type:<12}  {m.subnet_id}" for m in self.instances]
            lines.append(f'runs-on: "{self.label}"')
            return "\n".join(lines)
        c = self.cleanup
        return (f"provision of run {self.run_id} failed: {self.reason}\n"
                f"  rolled back: {len(c.terminated)} terminated ({', '.join(c.terminated) or 'none'}), "
                f"{len(c.returned_to_pool)} returned to the pool ({', '.join(c.returned_to_pool) or 'none'})"
                + (f", {len(c.failed)} left for reconcile ({', '.join(c.failed)})" if c.failed else ""))


def check_request(pool: Pool, req: ProvisionRequest) -> str:
    """Validate before any AWS change; returns the usage class to create with."""
    pool.config.resource_class(req.resource_class)
    if req.count < 1:
        raise ConfigError(f"count {req.count} is not valid", hint="ask for at least 1 runner")
    if req.usage_class is not None and req.usage_class not in USAGE_CLASSES:
        raise ConfigError(f"usage class {req.usage_class!r} is not valid", hint="use spot or on-demand")
    costtags.check(pool.config, req.tags)
    live = [r for r in store.run_records(pool, req.run_id) if r.state in LIVE_STATES]
    if live:
        raise ConfigError(
            f"run id {req.run_id!r} already holds {len(live)} instance(s) "
            f"({', '.join(sorted({str(r.state) for r in live}))})",
            hint=f"release it first (`runner-pool release --pool {pool.name} --run-id {req.run_id}`) "
                 "or use a new run id")
    _check_ceilings(pool, req)
    return req.usage_class or pool.config.usage_class


def _check_ceilings(pool: Pool, req: ProvisionRequest) -> None:
    """Fail fast, before any claim, when the runners this run would create cannot fit a ceiling.

    Only when a ceiling applies (no extra call otherwise). The idle runners of the class are
    what selection would claim instead of creating; the reservation before launch
    (:func:`controlplane.ceilings.reserve`) is what races cannot pass.
    """
    cfg = pool.config
    if cfg.max_instances is None and cfg.resource_class(req.resource_class).max_instances is None:
        return
    idle = 0 if cfg.is_ephemeral(req.resource_class) else store.count_idle(pool, req.resource_class)
    ceilings.precheck(cfg, req.resource_class, req.count, idle)


def provision(pool: Pool, req: ProvisionRequest, progress: Progress = QUIET,
              clock: Clock = SYSTEM_CLOCK, github: GitHubClient | None = None) -> ProvisionResult:
    gh = github or github_client_for(pool.config.github)     # no credential: bad input, before any AWS call
    ephemeral = pool.config.is_ephemeral(req.resource_class)
    counter = aws.CallCounter()
    token = aws.counting(counter)
    try:
        usage = check_request(pool, req)             # its Query is part of what a provision costs
    except BaseException:
        aws.stop_counting(token)
        raise
    started = time.monotonic()
    res = ProvisionResult(False, req.run_id, req.run_id, req.resource_class, usage)
    touched: list[str] = []
    claimed: list[Member] = []
    created: list[Member] = []
    unhealthy: list[Member] = []
    jit_runners: dict[str, int] = {}                 # ephemeral: instance id -> its just-in-time runner

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        res.timings[name] = round(now - since, 3)
        return now

    try:
        t = time.monotonic()
        registration: dict[str, str] | None = None
        if not ephemeral:
            stored, _ = tokens.ensure_tokens(pool.config, gh, now=clock.now())
            registration = {REGISTRATION_TOKEN: stored.registration}
        if ephemeral:
            progress.phase(f"[1/4] selection: none (class {req.resource_class} is ephemeral: never reused)")
        else:
            progress.phase(f"[1/4] selection: {req.count} x {req.resource_class} from pool {pool.name}")
            sel = selection.select(pool, req.run_id, req.resource_class, req.count, req.usage_class, clock,
                                   claimed_sink=touched, registration=registration)
            claimed, unhealthy = sel.claimed, sel.unhealthy
        t = lap("selection", t)
        missing = req.count - len(claimed)
        progress.phase(f"      {len(claimed)} claimed from the pool, {len(unhealthy)} unhealthy, {missing} to create")
        progress.phase(f"[2/4] creation: {missing} instance(s)" + ("" if missing else " (none needed)"))
        try:
            cr = creation.create(pool, req.run_id, req.resource_class, missing, usage, clock,
                                 created_sink=touched, registration=registration, run_tags=req.tags)
        except ceilings.CeilingReached as exc:
            # Lost the race for the last slots after claiming: nothing was launched; give the claims
            # back (and drop the unhealthy) before failing as the precheck would have.
            res.reason = str(exc)
            progress.phase(f"      {res.reason}")
            _fail(pool, req, res, claimed, unhealthy, progress, clock, counter, token, started, gh, jit_runners)
            raise CeilingAfterRollback(exc) from exc
        created = cr.members
        if ephemeral and created:
            jit_runners.update(_deliver_jit_configs(pool, gh, req.run_id, created))
        res.fleet_calls, res.capacity_errors = cr.fleet_calls, cr.errors_by_code
        t = lap("creation", t)
        res.from_pool, res.created = len(claimed), len(created)
        members = claimed + created
        if cr.shortfall:
            codes = ", ".join(f"{k} x{v}" for k, v in sorted(cr.errors_by_code.items())) or "no error given"
            res.reason = (f"EC2 could not supply {cr.shortfall} of {missing} instance(s) ({codes})"
                          + ("; on-demand fallback was tried" if cr.fell_back else ""))
            progress.phase(f"      {res.reason}")
            return _fail(pool, req, res, claimed, created + unhealthy, progress, clock, counter, token, started,
                         gh, jit_runners)
        timeout = req.validation_timeout_s or pool.config.validation_timeout_s
        progress.phase(f"[3/4] validation: {len(members)} runner(s) must register for {req.run_id} "
                       f"within {timeout:.0f} s")
        val = validation.validate(pool, req.run_id, members, timeout, progress, clock)
        res.validated_at = val.decided_at
        t = lap("validation", t)
        if not val.ok:
            res.reason = _validation_reason(val, len(members), timeout)
            progress.phase(f"      {res.reason}")
            healthy_claimed = [m for m in claimed if m.instance_id in val.healthy and m.instance_id not in val.failed]
            doomed = created + unhealthy + [m for m in claimed if m not in healthy_claimed]
            return _fail(pool, req, res, healthy_claimed, doomed, progress, clock, counter, token, started,
                         gh, jit_runners)
        progress.phase(f"[4/4] commit: {len(members)} runner(s) to running")
        lost = finalize.commit(pool, req.run_id, members, clock)
        lap("commit", t)
        if lost:
            res.reason = f"{len(lost)} instance(s) changed state before commit ({', '.join(lost)})"
            committed = [m for m in members if m.instance_id not in lost]
            cleanup = finalize.return_to_pool(pool, req.run_id, committed, State.RUNNING, progress, clock,
                                              github=gh)
            cleanup.merge(finalize.terminate(pool, [(i, State.TERMINATED, None) for i in lost], clock, gh))
            res.cleanup = cleanup
            return _finish(res, counter, token, started, pool.config)
        if unhealthy:
            res.cleanup = finalize.terminate(pool, [(m.instance_id, State.CLAIMED, req.run_id) for m in unhealthy],
                                             clock, gh)
        res.ok = True
        res.instances = members
        costtags.tag_claimed(pool.config, req.run_id, [m.instance_id for m in claimed], req.tags)
        poolstats.record_provision(pool.config, req.resource_class, req.run_id, len(claimed), len(created),
                                   clock.now())
        return _finish(res, counter, token, started, pool.config)
    except CeilingAfterRollback as exc:
        raise exc.error from None
    except BaseException as exc:
        cleanup = finalize.emergency(pool, req.run_id, touched, clock, gh)
        _delete_jit_runners(gh, jit_runners)
        res.cleanup = cleanup
        _finish(res, counter, token, started, pool.config)
        event("provision.emergency", run_id=req.run_id, error=str(exc), terminated=cleanup.terminated)
        if isinstance(exc, RunnerPoolError):
            exc.message += (f"; emergency cleanup terminated {len(cleanup.terminated)} instance(s)"
                            + (f", {len(cleanup.failed)} left for reconcile" if cleanup.failed else ""))
        raise


class CeilingAfterRollback(Exception):
    """Carries a :class:`~controlplane.ceilings.CeilingReached` past the emergency path: the
    provision already rolled back what it claimed, and the pool's idle runners must not be
    terminated as if they were this run's."""

    def __init__(self, error: ceilings.CeilingReached) -> None:
        super().__init__(str(error))
        self.error = error


def _validation_reason(val: validation.ValidationResult, n: int, timeout: float) -> str:
    if val.failed:
        first = sorted(val.failed.items())[:3]
        return (f"{len(val.failed)} of {n} runner(s) failed validation: "
                + "; ".join(f"{i}: {why}" for i, why in first))
    missing = n - len(val.ready)
    return f"only {len(val.ready)} of {n} runner(s) registered within {timeout:.0f} s ({missing} missing)"


def _deliver_jit_configs(pool: Pool, github: GitHubClient, run_id: str, members: list[Member]) -> dict[str, int]:
    """One just-in-time runner per created instance, its config into that instance's row.

    The name is the one the agent gives its first runner (``<instance-id>-1``),
    the labels the run's and the pool's, as a registration from config.sh would have.
    """
    cfg = pool.config

    def one(m: Member) -> tuple[str, int]:
        jit = github.jit_config(f"{m.instance_id}-1", [run_id, cfg.pool_label], cfg.github.runner_group_id)
        if not store.set_registration(pool, m.instance_id, run_id, State.CREATED, JIT_CONFIG, jit.encoded):
            event("jit.row_moved", run_id=run_id, instance_id=m.instance_id)
        return m.instance_id, jit.runner_id

    out = dict(aws.parallel(one, members))
    event("jit.delivered", run_id=run_id, instance_ids=sorted(out), runner_ids=sorted(out.values()))
    return out


def _delete_jit_runners(github: GitHubClient, runners: dict[str, int]) -> None:
    """Best effort: just-in-time runners of instances that will never run them."""
    for iid, runner_id in runners.items():
        try:
            github.delete_runner(runner_id)
        except RunnerPoolError as exc:
            event("jit.delete_failed", instance_id=iid, runner_id=runner_id, error=str(exc))


def _fail(pool: Pool, req: ProvisionRequest, res: ProvisionResult, healthy_claimed: list[Member],
          doomed: list[Member], progress: Progress, clock: Clock, counter: aws.CallCounter,
          token: Any, started: float, github: GitHubClient | None = None,
          jit_runners: dict[str, int] | None = None) -> ProvisionResult:
    t = time.monotonic()
    progress.phase(f"[4/4] rollback: {len(healthy_claimed)} back to the pool, {len(doomed)} to terminate")
    res.cleanup = finalize.rollback(pool, req.run_id, healthy_claimed, doomed, progress, clock, github)
    if github is not None and jit_runners:
        doomed_ids = {m.instance_id for m in doomed}
        _delete_jit_runners(github, {i: r for i, r in jit_runners.items() if i in doomed_ids})
    res.timings["rollback"] = round(time.monotonic() - t, 3)
    return _finish(res, counter, token, started, pool.config)


def _finish(res: ProvisionResult, counter: aws.CallCounter, token: Any, started: float,
            cfg: Any = None) -> ProvisionResult:
    res.timings["total"] = round(time.monotonic() - started, 3)
    res.api_calls = counter.by_service()
    res.api_calls_by_op = counter.snapshot()
    aws.stop_counting(token)
    event("provision.done", run_id=res.run_id, ok=res.ok, instance_ids=res.instance_ids, reason=res.reason,
          duration_s=res.timings["total"], pool_hit_rate=res.pool_hit_rate, api_calls=res.api_calls,
          capacity_errors=res.capacity_errors, terminated=res.cleanup.terminated,
          returned=res.cleanup.returned_to_pool)
    metrics.publish_provision(res, cfg)
    return res
