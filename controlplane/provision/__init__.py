"""Provision: hand a run N registered runners carrying its label, or nothing.

Phases, each its own module, each taking and returning records:

1. **selection** claims idle runners from the class's pool queue, and
   **relabel** gives each claimed runner, still registered and listening, the
   run's labels through GitHub's API (a member that cannot be relabelled falls
   back, alone, to a fresh registration);
2. **creation** launches the rest with one CreateFleet (two with spot fallback);
3. **validation** waits until every member, claimed and created, is
   registered for the run and heartbeating (all or nothing);
4. **finalize** decides once, from the three records (:func:`finalize.decide`:
   ``Commit`` or ``Rollback`` with a typed failure), and carries it out: the
   set committed to ``running``, or rolled back (claimed runners return to
   the pool after their agents deregister; created and unhealthy ones are
   retired through :mod:`controlplane.termination`). Any exception takes the
   emergency path: everything the provision touched
   (:class:`~controlplane.provision.attempt.Touched`) is terminated and the error re-raised
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

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane import aws, ceilings, costtags, inputs, interruptions, metrics, poolstats, store
from controlplane import token as tokens
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.errors import ConfigError, ProvisionFailure, RunnerPoolError
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.provision import creation, finalize, jit, relabel, selection, validation
from controlplane.provision.attempt import Laps, Touched
from controlplane.provision.creation import CreationResult
from controlplane.provision.finalize import Commit, Finalized, Outcome, Rollback
from controlplane.provision.selection import SelectionResult
from controlplane.provision.validation import ValidationResult
from controlplane.records import LIVE_STATES, REGISTRATION_TOKEN, Member, State
from controlplane.store import Pool
from controlplane.termination import Cleanup, emergency


@dataclass(frozen=True)
class ProvisionRequest:
    run_id: str
    resource_class: str
    count: int
    usage_class: str | None = None          # None: take any from the pool, create with the pool's default
    tags: Mapping[str, str] = field(default_factory=dict)   # cost tags while the run holds them (costtags.py)
    validation_timeout_s: float | None = None


@dataclass
class ProvisionResult:
    ok: bool
    run_id: str
    label: str
    resource_class: str
    usage_class: str
    instances: list[Member] = field(default_factory=list)
    failure: ProvisionFailure | None = None     # why not ok (None on success, and after an exception)
    timings: dict[str, float] = field(default_factory=dict)
    api_calls: dict[str, int] = field(default_factory=dict)              # by service
    api_calls_by_op: dict[str, int] = field(default_factory=dict)        # by service.Operation
    validated_at: float | None = None     # epoch: when validation saw the whole set ready (or one fail)
    fleet_calls: int = 0
    capacity_errors: dict[str, int] = field(default_factory=dict)
    cleanup: Cleanup = field(default_factory=Cleanup)
    from_pool: int = 0
    from_stopped: int = 0                 # stopped runners started for this run (the stopped tier)
    created: int = 0
    breaker_open: bool = False            # spot interruptions breaker: this run's creations went on-demand
    relabelled: int = 0                   # pool runners served by a label change (no new registration)
    fallback: dict[str, str] = field(default_factory=dict)   # pool runners registered anew, and why

    @property
    def reason(self) -> str:
        return self.failure.message if self.failure is not None else ""

    @property
    def instance_ids(self) -> list[str]:
        return [m.instance_id for m in self.instances]

    @property
    def pool_hit_rate(self) -> float:
        total = self.from_pool + self.from_stopped + self.created
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
            "pool_hit_rate": self.pool_hit_rate, "from_pool": self.from_pool, "from_stopped": self.from_stopped,
            "created": self.created, "breaker_open": self.breaker_open,
            "relabelled": self.relabelled, "fallback": self.fallback,
            "api_calls": self.api_calls, "api_calls_by_op": self.api_calls_by_op,
            "api_calls_per_runner": round(sum(self.api_calls.values()) / n, 2),
            "fleet_calls": self.fleet_calls, "capacity_errors": self.capacity_errors,
        }

    def summary(self) -> str:
        if self.ok:
            lines = [f"provisioned {len(self.instances)} runner(s) for run {self.run_id} "
                     f"(label {self.label}): {self.from_pool} from the pool, "
                     + (f"{self.from_stopped} started from stopped, " if self.from_stopped else "")
                     + f"{self.created} created, "
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
    inputs.check_run_id(req.run_id)
    pool.config.resource_class(req.resource_class)
    inputs.check_count(req.count)
    inputs.check_usage_class(req.usage_class)
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


@dataclass
class _Attempt:
    """One provision in progress: its inputs, and the records each phase handed on so far."""

    pool: Pool
    req: ProvisionRequest
    usage_class: str
    github: GitHubClient
    progress: Progress
    clock: Clock
    laps: Laps = field(default_factory=Laps)
    touched: Touched = field(default_factory=Touched)       # what the emergency path must end
    jit_runners: dict[str, int] = field(default_factory=dict)
    selection: SelectionResult = field(default_factory=SelectionResult)
    relabel: relabel.ClaimResult = field(default_factory=relabel.ClaimResult)
    creation: CreationResult = field(default_factory=CreationResult)
    validated_at: float | None = None
    breaker_open: bool = False
    credential: dict[str, str] = field(default_factory=dict)

    @property
    def ephemeral(self) -> bool:
        return self.pool.config.is_ephemeral(self.req.resource_class)

    @property
    def fresh(self) -> bool:
        """Every pool runner registers anew (``fresh_registration``) instead of being relabelled."""
        return self.pool.config.fresh_registration

    def registration(self) -> dict[str, str]:
        """The pool's registration token (SSM, rotated when close to expiry), read once, and only when
        some member registers with it: a warm hit by relabelling never reads it."""
        if not self.credential:
            stored, _ = tokens.ensure_tokens(self.pool.config, self.github, now=self.clock.now())
            self.credential[REGISTRATION_TOKEN] = stored.registration
        return self.credential


def provision(pool: Pool, req: ProvisionRequest, progress: Progress = QUIET,
              clock: Clock = SYSTEM_CLOCK, github: GitHubClient | None = None) -> ProvisionResult:
    gh = github or github_client_for(pool.config.github)     # no credential: bad input, before any AWS call
    with aws.counted() as calls:
        usage = check_request(pool, req)             # its Query is part of what a provision costs
        a = _Attempt(pool, req, usage, gh, progress, clock)
        refused: ceilings.CeilingReached | None = None
        try:
            sel = _select(a)
            rl = _relabel(a, sel)
            try:
                cr = _create(a, sel)
            except ceilings.CeilingReached as exc:
                # Lost the race for the last slots after claiming; nothing was launched: give the
                # claims back (the unhealthy ones go), then fail as the precheck would have.
                refused = exc
                missing = a.req.count - len(sel.claimed)
                cr = CreationResult(shortfall=missing, requested=missing)
            val = None if cr.shortfall else _validate(a, sel.claimed + cr.members, rl)
            done = _carry_out(a, finalize.decide(sel, cr, val))
            if done.ok:
                costtags.tag_claimed(pool.config, req.run_id, [m.instance_id for m in sel.claimed], req.tags)
                poolstats.record_provision(pool.config, req.resource_class, req.run_id, len(sel.claimed),
                                           len(cr.members), clock.now())
        except BaseException as exc:
            _finish(a, calls, Finalized(False, cleanup=_emergency(a, exc)))
            raise
        res = _finish(a, calls, done)
    if refused is not None:
        raise refused
    return res


def _select(a: _Attempt) -> SelectionResult:
    req = a.req
    with a.laps.lap("selection"):
        if a.ephemeral:
            a.progress.phase(f"[1/4] selection: none (class {req.resource_class} is ephemeral: never reused)")
        else:
            a.progress.phase(f"[1/4] selection: {req.count} x {req.resource_class} from pool {a.pool.name}")
            a.selection = selection.select(a.pool, req.run_id, req.resource_class, req.count, req.usage_class,
                                           a.clock, a.touched, a.registration() if a.fresh else None)
    return a.selection


def _relabel(a: _Attempt, sel: SelectionResult) -> relabel.ClaimResult:
    """Give the claimed runners the run's labels on GitHub; the ones that cannot be get a credential."""
    if not sel.claimed or a.fresh:
        return a.relabel
    with a.laps.lap("relabel"):
        a.relabel = relabel.claim(a.pool, a.github, a.req.run_id, sel.claimed, sel.agents, a.registration,
                                  a.clock)
    rl = a.relabel
    a.progress.phase(f"      {len(rl.ready)} relabelled for {a.req.run_id}, {len(rl.fallback)} registering anew"
                     + "".join(f"\n        {i}: {why}" for i, why in sorted(rl.reasons.items())[:5]))
    return rl


def _create(a: _Attempt, sel: SelectionResult) -> CreationResult:
    missing = a.req.count - len(sel.claimed)
    started = sum(1 for m in sel.claimed if m.source == "stopped")
    a.progress.phase(f"      {len(sel.claimed) - started} claimed from the pool, {started} started from "
                     f"stopped, {len(sel.unhealthy)} unhealthy, {missing} to create")
    if a.usage_class == "spot" and missing > 0:
        _spot_breaker(a)
    a.progress.phase(f"[2/4] creation: {missing} instance(s)" + ("" if missing else " (none needed)"))
    with a.laps.lap("creation"):
        a.creation = creation.create(a.pool, a.req.run_id, a.req.resource_class, missing, a.usage_class, a.clock,
                                     a.touched, a.registration() if missing and not a.ephemeral else None,
                                     run_tags=a.req.tags)
        if a.ephemeral and a.creation.members:
            a.jit_runners.update(jit.deliver(a.pool, a.github, a.req.run_id, a.creation.members))
    return a.creation


def _validate(a: _Attempt, members: list[Member], rl: relabel.ClaimResult) -> ValidationResult:
    timeout = a.req.validation_timeout_s or a.pool.config.validation_timeout_s
    checked = frozenset(m.instance_id for m in rl.ready)
    ids = [m.instance_id for m in members]
    if len(checked) == len(members):
        # Every runner was relabelled and checked on GitHub, its heartbeat read just after its claim.
        a.progress.phase(f"[3/4] validation: {len(members)} runner(s) relabelled and checked on GitHub")
        val = ValidationResult(ready=ids, healthy=set(ids), decided_at=a.clock.now(), ids=ids, timeout_s=timeout)
    else:
        a.progress.phase(f"[3/4] validation: {len(members) - len(checked)} runner(s) must register for "
                         f"{a.req.run_id} within {timeout:.0f} s"
                         + (f", {len(checked)} relabelled" if checked else ""))
        with a.laps.lap("validation"):
            val = validation.validate(a.pool, a.req.run_id, members, timeout, a.progress, a.clock,
                                      relabelled=checked)
    a.validated_at = val.decided_at
    interruptions.record(a.pool, {m.instance_id: m.resource_class for m in members
                                  if m.instance_id in val.interrupted}, a.clock.now())
    return val


def _spot_breaker(a: _Attempt) -> None:
    """After repeated spot interruptions in the class, create on-demand for its cool-down."""
    breaker = interruptions.breaker(a.pool, a.req.resource_class, a.clock.now())
    if not breaker.open:
        return
    a.usage_class, a.breaker_open = "on-demand", True
    a.progress.phase(f"      spot breaker open for class {a.req.resource_class} ({breaker.count} interruption(s) "
                     f"in {a.pool.config.spot_breaker.window_s} s): creating on-demand until {breaker.until:.0f}")
    event("provision.breaker_open", run_id=a.req.run_id, resource_class=a.req.resource_class,
          interruptions=breaker.count, until=breaker.until)


def _carry_out(a: _Attempt, outcome: Outcome) -> Finalized:
    run_id = a.req.run_id
    if isinstance(outcome, Commit):
        a.progress.phase(f"[4/4] commit: {len(outcome.members)} runner(s) to running")
        with a.laps.lap("commit"):
            return finalize.commit(a.pool, run_id, outcome, a.progress, a.clock, a.github)
    a.progress.phase(f"      {outcome.failure.message}")
    a.progress.phase(f"[4/4] rollback: {len(outcome.keep)} back to the pool, {len(outcome.doomed)} to terminate")
    with a.laps.lap("rollback"):
        back, outcome = _unlabel_kept(a, outcome)
        done = finalize.rollback(a.pool, run_id, outcome, a.progress, a.clock, a.github)
        done.cleanup.returned_to_pool.extend(back)
        doomed = {m.instance_id for m in outcome.doomed}
        jit.delete_runners(a.github, {i: r for i, r in a.jit_runners.items() if i in doomed})
    return done


def _unlabel_kept(a: _Attempt, outcome: Rollback) -> tuple[list[str], Rollback]:
    """Relabelled runners the rollback keeps go back to the pool by losing the run's labels (their
    agents never heard of the run); the rest of ``keep`` takes the draining path."""
    relabelled = {m.instance_id for m in a.relabel.ready}
    listening = [m for m in outcome.keep if m.instance_id in relabelled]
    if not listening:
        return [], outcome
    back, _ = relabel.unlabel(a.pool, a.github, a.req.run_id, listening, a.selection.agents, State.CLAIMED,
                              a.clock)
    returned = {m.instance_id for m in back}
    return sorted(returned), replace(outcome, keep=[m for m in outcome.keep if m.instance_id not in returned])


def _emergency(a: _Attempt, exc: BaseException) -> Cleanup:
    """Terminate everything the attempt touched; say so in the error that is about to propagate."""
    cleanup = emergency(a.pool, a.req.run_id, a.touched.ids, a.clock, a.github)
    jit.delete_runners(a.github, a.jit_runners)
    event("provision.emergency", run_id=a.req.run_id, error=str(exc), terminated=cleanup.terminated)
    if isinstance(exc, RunnerPoolError):
        exc.add_detail(f"emergency cleanup terminated {len(cleanup.terminated)} instance(s)"
                       + (f", {len(cleanup.failed)} left for reconcile" if cleanup.failed else ""))
    return cleanup


def _finish(a: _Attempt, calls: aws.CallCounter, done: Finalized) -> ProvisionResult:
    sel, cr = a.selection, a.creation
    res = ProvisionResult(done.ok, a.req.run_id, a.req.run_id, a.req.resource_class, a.usage_class,
                          instances=done.members, failure=done.failure, timings=a.laps.stop(),
                          api_calls=calls.by_service(), api_calls_by_op=calls.snapshot(),
                          validated_at=a.validated_at, fleet_calls=cr.fleet_calls,
                          capacity_errors=cr.errors_by_code, cleanup=done.cleanup,
                          from_pool=sum(1 for m in sel.claimed if m.source == "pool"),
                          from_stopped=sum(1 for m in sel.claimed if m.source == "stopped"),
                          created=len(cr.members), breaker_open=a.breaker_open, relabelled=len(a.relabel.ready),
                          fallback=a.relabel.reasons)
    event("provision.done", run_id=res.run_id, ok=res.ok, instance_ids=res.instance_ids, reason=res.reason,
          duration_s=res.timings["total"], pool_hit_rate=res.pool_hit_rate, api_calls=res.api_calls,
          capacity_errors=res.capacity_errors, terminated=res.cleanup.terminated,
          returned=res.cleanup.returned_to_pool)
    metrics.publish_provision(res, a.pool.config)
    return res
