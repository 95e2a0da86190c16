"""EC2 is eventually consistent: a fresh instance may be unknown to DescribeInstances and TerminateInstances.

Reconcile leaves a young row alone while its instance is not listed, and
TerminateInstances' InvalidInstanceID.NotFound is retried with backoff, then
reported -- never taken as "already gone" on the first answer.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from controlplane import store
from controlplane.clock import AheadClock, SystemClock
from controlplane.provision import ProvisionRequest, provision
from controlplane.reconcile import VISIBILITY_GRACE_S, reconcile
from controlplane.records import InstanceRecord, State
from controlplane.termination import terminate_ec2
from tests.conftest import Emu
from tests.integration.test_provision import ec2_states, states


class SkippingClock(SystemClock):
    """Real time, except that sleeping moves the monotonic clock forward instead of waiting."""

    def __init__(self) -> None:
        self.skipped = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return super().monotonic() + self.skipped

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.skipped += seconds


def ghost_row(pool: Any, iid: str, launched_at: float) -> None:
    store.put_record(pool, InstanceRecord(arn=pool.arn(iid), state=State.CREATED, threshold=time.time() + 300,
                                          resource_class="small", instance_type="c5a.large", usage_class="on-demand",
                                          subnet_id="subnet-1", launched_at=launched_at, run_id="run-fresh"))


def test_reconcile_leaves_a_fresh_row_alone_until_its_grace_has_passed(make_pool: Any) -> None:
    pool = make_pool()
    fresh = "i-0123456789abcdef1"              # as if CreateFleet had just returned it, not yet listed
    ghost_row(pool, fresh, launched_at=time.time())
    now = reconcile(pool)
    assert [a for a in now.actions if a.target == fresh] == []
    assert states(pool, [fresh])[fresh] == "created"
    later = reconcile(pool, clock=AheadClock(VISIBILITY_GRACE_S + 5))
    assert [(a.kind, a.target) for a in later.applied] == [("close_row", fresh)]
    assert states(pool, [fresh])[fresh] == "terminated"


def test_a_not_found_on_terminate_is_retried_until_ec2_knows_the_instance(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(f"run-{uuid.uuid4().hex[:8]}", "small", 1))
    assert a.ok, a.reason
    iid = a.instance_ids[0]
    emu.fault(op="TerminateInstances", code="InvalidInstanceID.NotFound", status=400, count=3, contains=iid,
              message=f"The instance ID '{iid}' does not exist")
    clock = SkippingClock()
    res = terminate_ec2(pool.region, [iid], clock)
    assert res.terminated == [iid] and res.not_found == []
    assert len(clock.sleeps) >= 2 and clock.sleeps == sorted(clock.sleeps)     # backing off
    assert sum(r["hits"] for r in emu.fault_rules()["rules"]) == 3
    assert ec2_states(pool, [iid])[iid] in ("shutting-down", "terminated")


def test_an_instance_ec2_never_knows_is_reported_not_found_after_the_retries(make_pool: Any) -> None:
    pool = make_pool()
    never = "i-0fedcba987654321f"
    clock = SkippingClock()
    res = terminate_ec2(pool.region, [never], clock, not_found_retry_s=20)
    assert res.terminated == [] and res.not_found == [never]
    assert 15 <= clock.skipped <= 20 and len(clock.sleeps) >= 4              # it kept trying, for 20 s


def test_reconcile_reports_an_orphan_it_could_not_terminate_as_failed(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(f"run-{uuid.uuid4().hex[:8]}", "small", 1))
    assert a.ok, a.reason
    iid = a.instance_ids[0]
    store.delete_rows(pool, [pool.arn(iid)])                  # an orphan: reconcile terminates it
    emu.fault(op="TerminateInstances", code="InvalidInstanceID.NotFound", status=400, contains=iid)
    import controlplane.termination as termination_mod

    saved = termination_mod.NOT_FOUND_RETRY_S
    termination_mod.NOT_FOUND_RETRY_S = 2.0
    try:
        res = reconcile(pool, clock=AheadClock(600))
    finally:
        termination_mod.NOT_FOUND_RETRY_S = saved
    assert [f for f in res.failed if f.startswith(iid)] == [f"{iid}: InvalidInstanceID.NotFound after retries"]
    emu.clear_aws_faults()
    assert [(x.kind, x.target) for x in reconcile(pool, clock=AheadClock(600)).applied] == [
        ("terminate_instance", iid)]
