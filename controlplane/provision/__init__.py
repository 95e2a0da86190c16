"""Provision: hand a run N registered runners carrying its label, or nothing.

Phases, each its own module, each taking and returning records:

1. **selection** claims idle runners from the class's pool queue, and
   **relabel** gives each claimed runner, still registered and listening, the
   run's labels through GitHub's API (a member that cannot be relabelled falls
   back, alone, to a fresh registration);
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
(SSM, rotated here when it is close to expiry), only when some member must
register, and hands it to exactly those members inside each one's own state
row: the ``created`` row for new ones, a relabel fallback's claimed row, and,
with ``fresh_registration``, the claim write of every pool runner. A warm hit
by relabelling hands its instance nothing. In ephemeral mode each
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, metrics, store
from controlplane import token as tokens
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.config import USAGE_CLASSES
from controlplane.errors import ConfigError, RunnerPoolError
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.provision import creation, finalize, relabel, selection, validation
from controlplane.records import JIT_CONFIG, LIVE_STATES, REGISTRATION_TOKEN, AgentRecord, Member, State
from controlplane.store import Pool


@dataclass(frozen=True)
class ProvisionRequest:
    run_id: str
    resource_class: str
    count: int
    usage_class: str | None = None          # None: take any from the pool, create with the pool's default
    validation_timeout_s: float | None = None


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
    relabelled: int = 0                   # pool runners served by a label change (no new registration)
    fallback: dict[str, str] = field(default_factory=dict)   # pool runners registered anew, and why

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
            "relabelled": self.relabelled, "fallback": self.fallback,
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
    live = [r for r in store.run_records(pool, req.run_id) if r.state in LIVE_STATES]
    if live:
        raise ConfigError(
            f"run id {req.run_id!r} already holds {len(live)} instance(s) "
            f"({', '.join(sorted({str(r.state) for r in live}))})",
            hint=f"release it first (`runner-pool release --pool {pool.name} --run-id {req.run_id}`) "
                 "or use a new run id")
    return req.usage_class or pool.config.usage_class


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
    relabelled: list[Member] = []
    agents: dict[str, AgentRecord | None] = {}       # the claimed runners' agent rows, read at claim
    fresh = pool.config.fresh_registration
    credential: dict[str, str] = {}

    def registration() -> dict[str, str]:
        """The pool's token (SSM, rotated when close to expiry), read once and only when needed."""
        if not credential:
            stored, _ = tokens.ensure_tokens(pool.config, gh, now=clock.now())
            credential[REGISTRATION_TOKEN] = stored.registration
        return credential

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        res.timings[name] = round(now - since, 3)
        return now

    try:
        t = time.monotonic()
        if ephemeral:
            progress.phase(f"[1/4] selection: none (class {req.resource_class} is ephemeral: never reused)")
        else:
            progress.phase(f"[1/4] selection: {req.count} x {req.resource_class} from pool {pool.name}")
            sel = selection.select(pool, req.run_id, req.resource_class, req.count, req.usage_class, clock,
                                   claimed_sink=touched, registration=registration() if fresh else None)
            claimed, unhealthy, agents = sel.claimed, sel.unhealthy, sel.agents
        t = lap("selection", t)
        missing = req.count - len(claimed)
        progress.phase(f"      {len(claimed)} claimed from the pool, {len(unhealthy)} unhealthy, {missing} to create")
        if claimed and not fresh:
            rl = relabel.claim(pool, gh, req.run_id, claimed, sel.agents, registration, clock)
            relabelled, res.fallback = rl.ready, rl.reasons
            res.relabelled = len(relabelled)
            progress.phase(f"      {len(relabelled)} relabelled for {req.run_id}, {len(rl.fallback)} registering anew"
                           + "".join(f"\n        {i}: {why}" for i, why in sorted(rl.reasons.items())[:5]))
            t = lap("relabel", t)
        progress.phase(f"[2/4] creation: {missing} instance(s)" + ("" if missing else " (none needed)"))
        cr = creation.create(pool, req.run_id, req.resource_class, missing, usage, clock, created_sink=touched,
                             registration=registration() if missing and not ephemeral else None)
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
                         gh, jit_runners, relabelled, agents)
        timeout = req.validation_timeout_s or pool.config.validation_timeout_s
        checked = frozenset(m.instance_id for m in relabelled)
        if len(checked) == len(members):
            # Every runner was relabelled and checked on GitHub, its heartbeat read just after its claim.
            progress.phase(f"[3/4] validation: {len(members)} runner(s) relabelled and checked on GitHub")
            val = validation.ValidationResult(ready=sorted(checked), healthy=set(checked),
                                              decided_at=clock.now())
        else:
            progress.phase(f"[3/4] validation: {len(members) - len(checked)} runner(s) must register for "
                           f"{req.run_id} within {timeout:.0f} s" + (f", {len(checked)} relabelled" if checked else ""))
            val = validation.validate(pool, req.run_id, members, timeout, progress, clock, relabelled=checked)
        res.validated_at = val.decided_at
        t = lap("validation", t)
        if not val.ok:
            res.reason = _validation_reason(val, len(members), timeout)
            progress.phase(f"      {res.reason}")
            healthy_claimed = [m for m in claimed if m.instance_id in val.healthy and m.instance_id not in val.failed]
            doomed = created + unhealthy + [m for m in claimed if m not in healthy_claimed]
            return _fail(pool, req, res, healthy_claimed, doomed, progress, clock, counter, token, started,
                         gh, jit_runners, relabelled, agents)
        progress.phase(f"[4/4] commit: {len(members)} runner(s) to running")
        lost = finalize.commit(pool, req.run_id, members, clock)
        lap("commit", t)
        if lost:
            res.reason = f"{len(lost)} instance(s) changed state before commit ({', '.join(lost)})"
            committed = [m for m in members if m.instance_id not in lost]
            back, committed = _unlabel(pool, gh, req.run_id, committed, relabelled, agents, State.RUNNING, clock)
            cleanup = finalize.return_to_pool(pool, req.run_id, committed, State.RUNNING, progress, clock,
                                              github=gh)
            cleanup.returned_to_pool += back
            cleanup.merge(finalize.terminate(pool, [(i, State.TERMINATED, None) for i in lost], clock, gh))
            res.cleanup = cleanup
            return _finish(res, counter, token, started, pool.config)
        if unhealthy:
            res.cleanup = finalize.terminate(pool, [(m.instance_id, State.CLAIMED, req.run_id) for m in unhealthy],
                                             clock, gh)
        res.ok = True
        res.instances = members
        return _finish(res, counter, token, started, pool.config)
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


def _unlabel(pool: Pool, github: GitHubClient | None, run_id: str, members: list[Member],
             relabelled: Sequence[Member], agents: Mapping[str, AgentRecord | None], from_: State,
             clock: Clock) -> tuple[list[str], list[Member]]:
    """Relabelled members back to the pool by removing the run's labels; the ids returned, and the
    members left for the draining path."""
    ids = {m.instance_id for m in relabelled}
    listening = [m for m in members if m.instance_id in ids]
    if github is None or not listening:
        return [], members
    back, _ = relabel.unlabel(pool, github, run_id, listening, agents, from_, clock)
    returned = {m.instance_id for m in back}
    return sorted(returned), [m for m in members if m.instance_id not in returned]


def _fail(pool: Pool, req: ProvisionRequest, res: ProvisionResult, healthy_claimed: list[Member],
          doomed: list[Member], progress: Progress, clock: Clock, counter: aws.CallCounter,
          token: Any, started: float, github: GitHubClient | None = None,
          jit_runners: dict[str, int] | None = None, relabelled: Sequence[Member] = (),
          agents: Mapping[str, AgentRecord | None] | None = None) -> ProvisionResult:
    t = time.monotonic()
    progress.phase(f"[4/4] rollback: {len(healthy_claimed)} back to the pool, {len(doomed)} to terminate")
    back, healthy_claimed = _unlabel(pool, github, req.run_id, healthy_claimed, relabelled, agents or {},
                                     State.CLAIMED, clock)
    res.cleanup = finalize.rollback(pool, req.run_id, healthy_claimed, doomed, progress, clock, github)
    res.cleanup.returned_to_pool += back
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
