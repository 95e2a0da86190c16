"""``RunnerFleet``: N registered runners for one workflow run, or nothing.

Inputs: ``poolName``, ``region``, ``runId``, ``resourceClass``, ``count``,
``usageClass`` (optional: ``spot`` or ``on-demand``; unset takes any runner
from the pool and creates with the pool's default). Outputs: ``label`` (what
jobs put in ``runs-on``), ``instanceIds``, ``instances`` (id, source,
instance type, subnet, usage class of each), ``poolName``, ``region``,
``runId``, ``resourceClass``, ``count``, ``usageClass``.

* create -> :func:`controlplane.provision.provision` on the pool that
  :func:`controlplane.store.load_pool` finds. All or nothing: a provision that
  does not get every runner registered rolls back (claimed runners back to
  the pool, created ones terminated) and returns ``ok=False`` with a typed
  ``failure``; create then raises :func:`failure_error`, one line built from
  that failure and the cleanup (:class:`~controlplane.errors.RollbackIncomplete`
  when something was left for reconcile), so nothing lands in the stack and
  nothing keeps running.
* delete -> :func:`controlplane.release.release`: the runners deregister and
  go back to the pool (``idle``), or are terminated (reuse cap, lifetime,
  dead agent). Idempotent: a second delete finds nothing carrying the run and
  succeeds; so does a delete after the whole pool was destroyed. A release
  that could not terminate something raises, naming the instances.
* diff -> replace (delete first: a run id holds one live fleet) when the
  pool, region, run id, class, count or usage class changes; output-only
  fields are ignored.
* read -> the run's rows in the state table: live rows give the fleet
  (``instanceIds`` of those running; ``count`` stays the requested count),
  none (or no pool) give an empty id.
* check -> one clear message per bad input: count a whole number from 1 to
  500, the run id pattern of the CLI, a known usage class, pool and class
  names of the right shape.
"""
from __future__ import annotations

from typing import Any

import pulumi
import pulumi.dynamic
from pulumi.dynamic import CheckResult, CreateResult, DiffResult, ReadResult, UpdateResult

from controlplane import inputs, store
from controlplane.config import CLASS_RE, NAME_RE, REGION_RE, RUN_ID_RE, USAGE_CLASSES
from controlplane.errors import ConfigError, ConfigErrors, RollbackIncomplete, RunnerPoolError
from controlplane.logs import Progress
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.records import LIVE_STATES, State
from controlplane.release import release
from dynamic_providers import _base

REPLACE_KEYS = ("poolName", "region", "runId", "resourceClass", "count", "usageClass")


def load_pool_or_none(name: str, region: str) -> store.Pool | None:
    """The stored pool, or None when the pool (its table or stored config) is gone."""
    try:
        return store.load_pool(name, region)
    except ConfigErrors:
        raise                                   # a stored config this code cannot read: say so
    except ConfigError:
        return None


def request_of(props: dict[str, Any]) -> ProvisionRequest:
    return ProvisionRequest(run_id=props["runId"], resource_class=props["resourceClass"],
                            count=_base.as_int(props["count"], "count"), usage_class=props.get("usageClass"))


def failure_error(res: ProvisionResult) -> RunnerPoolError:
    """The error a failed create raises, in one line, from the result's typed failure and its cleanup."""
    c = res.cleanup
    why = res.failure.message if res.failure is not None else "it did not complete"
    message = (f"{why}; rolled back: {len(c.terminated)} terminated, "
               f"{len(c.returned_to_pool)} returned to the pool")
    if c.failed:
        return RollbackIncomplete(f"{message}, {len(c.failed)} left for reconcile ({', '.join(c.failed)})",
                                  c.failed)
    return RunnerPoolError(message)


class RunnerFleetProvider(pulumi.dynamic.ResourceProvider):
    serialize_as_secret_always = False          # nothing secret is pickled (see _base)

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = (
            _base.check_pattern(news, "poolName", NAME_RE, "a pool name: lowercase letters, digits, '-' (max 30)")
            + _base.check_pattern(news, "region", REGION_RE, inputs.REGION_RULE)
            + _base.check_pattern(news, "runId", RUN_ID_RE,
                                  f"{inputs.RUN_ID_RULE} (e.g. ${{{{ github.run_id }}}}-${{{{ github.run_attempt }}}})")
            + _base.check_pattern(news, "resourceClass", CLASS_RE,
                                  "a resource class of the pool: lowercase letters, digits, '-'")
            + _base.check_int(news, "count", inputs.MIN_COUNT, inputs.MAX_COUNT)
            + _base.check_choice(news, "usageClass", USAGE_CLASSES, required=False)
        )
        checked = dict(news)
        if not failures and not _base.is_unknown(news.get("count")):
            checked["count"] = _base.as_int(news["count"], "count")
        return CheckResult(checked, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = _base.changed(olds, news, REPLACE_KEYS)
        # A run id holds one live fleet at a time: the old one must be released first.
        return DiffResult(changes=bool(replaces), replaces=replaces, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        run_id = props["runId"]
        with _base.mapped_errors(f"provision run {run_id}"):
            pool = store.load_pool(props["poolName"], props["region"])
            res = provision(pool, request_of(props), Progress())
            if not res.ok:
                # The provision already rolled back; raising keeps the fleet out of the stack.
                raise failure_error(res)
        instances = [{"id": m.instance_id, "source": m.source, "instanceType": m.instance_type,
                      "subnet": m.subnet_id, "usageClass": m.usage_class} for m in res.instances]
        return CreateResult(run_id, _base.outputs(
            props, label=res.label, instanceIds=res.instance_ids, instances=instances,
            count=len(res.instances)))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # diff replaces on every input change, so the engine never asks for an in-place update.
        raise _base.ProviderError("a RunnerFleet cannot be updated in place; it is replaced")

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        run_id = props.get("runId") or id_
        with _base.mapped_errors(f"release run {run_id}"):
            pool = load_pool_or_none(props["poolName"], props["region"])
            if pool is None:
                return                              # the pool is gone, and its instances with it
            res = release(pool, run_id, Progress())
        if not res.ok:
            raise _base.ProviderError(
                f"release run {run_id}: could not clean {len(res.failed)} instance(s) "
                f"({', '.join(res.failed)}); they are marked terminated and "
                f"`runner-pool reconcile --pool {pool.name}` finishes them; run destroy again to drop the fleet")

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        run_id = props.get("runId") or id_
        with _base.mapped_errors(f"read run {run_id}"):
            pool = load_pool_or_none(props["poolName"], props["region"])
            rows = [] if pool is None else store.run_records(pool, run_id)
        live = sorted((r for r in rows if r.state in LIVE_STATES), key=lambda r: r.instance_id)
        if not live:
            return ReadResult("", {})
        running = [r for r in live if r.state is State.RUNNING]
        by_id = {i.get("id"): i for i in props.get("instances") or []}
        instances = [by_id.get(r.instance_id) or {
            "id": r.instance_id, "source": "", "instanceType": r.instance_type, "subnet": r.subnet_id,
            "usageClass": r.usage_class} for r in running]
        # ``count`` stays the requested count: a refresh that finds an instance gone must not
        # turn the next `up` into a replacement of the whole fleet mid-run.
        return ReadResult(id_, _base.outputs(props, instanceIds=[r.instance_id for r in running],
                                             instances=instances))


class RunnerFleetArgs:
    """Inputs of :class:`RunnerFleet`: which pool, which run, how many of which class."""

    def __init__(self, pool_name: pulumi.Input[str], region: pulumi.Input[str], run_id: pulumi.Input[str],
                 resource_class: pulumi.Input[str], count: pulumi.Input[int],
                 usage_class: pulumi.Input[str] | None = None) -> None:
        self.pool_name = pool_name
        self.region = region
        self.run_id = run_id
        self.resource_class = resource_class
        self.count = count
        self.usage_class = usage_class


class RunnerFleet(pulumi.dynamic.Resource, module="runnerpool", name="RunnerFleet"):
    label: pulumi.Output[str]
    instanceIds: pulumi.Output[list[str]]
    instances: pulumi.Output[list[dict[str, Any]]]
    count: pulumi.Output[int]
    resourceClass: pulumi.Output[str]
    runId: pulumi.Output[str]
    poolName: pulumi.Output[str]
    region: pulumi.Output[str]
    usageClass: pulumi.Output[str | None]

    def __init__(self, name: str, args: RunnerFleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(RunnerFleetProvider(), name, {
            "poolName": args.pool_name, "region": args.region, "runId": args.run_id,
            "resourceClass": args.resource_class, "count": args.count, "usageClass": args.usage_class,
            "label": None, "instanceIds": None, "instances": None,
        }, opts)
