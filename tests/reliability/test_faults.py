"""Faults: what breaks in production, injected one at a time, and nothing leaks.

Each test injects one fault into the embedded default (AWS throttling, EC2
capacity, the AWS endpoint going away, an agent or the provisioner killed
with SIGKILL), lets the control plane do what it would do anyway (the
provision's own validation and rollback, release, the scheduled reconcile),
asserts what a user would see (the run's result or exit code, instances and
their subnets and types in EC2, rows in the table, runners on GitHub), and
ends with the reliability invariants: every instance has a row, every live
row an instance, every registered runner a live instance, no instance in two
runs.

Faults are injected where they happen in production, through the emulator
and the GitHub stand-in over HTTP, never by patching the code under test; the
agents run in the same emulator and meet the same faults. Waits are for
conditions with generous deadlines (CI has two busy cores), never for time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from controlplane import aws, store
from controlplane.apply import pool_instance_ids
from controlplane.clock import AheadClock
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.reconcile import ORPHAN_GRACE_S, reconcile
from controlplane.records import Signal, State
from controlplane.release import ReleaseResult, release
from tests.conftest import RELIABLE, ROOT, Emu, run_cli, wait_for
from tests.factories import run_id
from tests.reliability.invariants import check, online

T = TypeVar("T")

# The control plane's own AWS access key where a test must tell its requests from the agents' (the
# simulator signs every agent's requests with "testing"); moto serves any key from the same account.
CONTROL_PLANE_KEY = "AKIDRELIABILITYCP001"


# ---------------------------------------------------------------- helpers


def prov(pool: Any, n: int, rid: str | None = None) -> ProvisionResult:
    return provision(pool, ProvisionRequest(rid or run_id(), "small", n))


def in_background(fn: Callable[..., T], *args: Any) -> Future[T]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def ec2_view(pool: Any, ids: list[str]) -> dict[str, dict[str, str]]:
    """State, type and subnet of instances as EC2 reports them."""
    if not ids:
        return {}
    ec2 = aws.client("ec2", pool.region)
    return {i["InstanceId"]: {"state": i["State"]["Name"], "type": i["InstanceType"], "subnet": i["SubnetId"]}
            for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]}


def gone_from_ec2(pool: Any, iid: str) -> bool:
    return ec2_view(pool, [iid])[iid]["state"] in ("shutting-down", "terminated")


def run_instances(pool: Any, rid: str) -> list[str]:
    """Instances whose row names the run."""
    return [r.instance_id for r in store.run_records(pool, rid)]


def row_state(pool: Any, iid: str) -> str:
    record, _ = store.read_set(pool, [iid])[iid]
    return record.state.value if record else "missing"


def agent_of(pool: Any, iid: str) -> Any:
    return store.read_set(pool, [iid])[iid][1]


def signal_of(pool: Any, iid: str) -> Signal | None:
    agent = agent_of(pool, iid)
    return agent.signal if agent is not None else None


def runners_of(emu: Emu, iid: str) -> list[dict[str, Any]]:
    return [r for r in emu.runners() if r["name"].startswith(f"{iid}-")]


def heartbeat_stale(pool: Any, iid: str) -> bool:
    agent = agent_of(pool, iid)
    return agent is not None and not agent.is_healthy(time.time(), pool.config.heartbeat_stale_s)


AFTER_ORPHAN_GRACE = AheadClock(ORPHAN_GRACE_S + 1)


# ---------------------------------------------------------------- throttling on each AWS service

# The throttling code each service really sends (botocore retries every one of them), where the product
# calls it (only apply and refresh call STS), and whose requests the burst is for. The agents share
# DynamoDB with the control plane (their heartbeats are UpdateItems): the burst is kept to the control
# plane's key so that a heartbeat cannot absorb it. Only the control plane reads SSM (the pool's
# registration token, once per provision); agents have no SSM permission. The EC2 burst is for CreateFleet alone: three throttled CreateFleet requests failed a whole run
# before CreateFleet got the same retries as every call.
THROTTLING = [
    pytest.param("dynamodb", "ThrottlingException", 400, ("provision", "release"),
                 {"access_key": CONTROL_PLANE_KEY}, id="dynamodb"),
    pytest.param("sqs", "RequestThrottled", 400, ("provision", "release"), {"access_key": CONTROL_PLANE_KEY},
                 id="sqs"),
    pytest.param("ec2", "RequestLimitExceeded", 503, ("provision",), {"op": "CreateFleet"}, id="ec2"),
    pytest.param("ssm", "ThrottlingException", 400, ("provision",), {"access_key": CONTROL_PLANE_KEY}, id="ssm"),
    pytest.param("sts", "Throttling", 400, ("apply",), {"access_key": CONTROL_PLANE_KEY}, id="sts"),
]
# The other codes the same services send for throttling (the JSON protocol's name for SQS).
OTHER_THROTTLING_CODES = [("dynamodb", "ProvisionedThroughputExceededException", 400),
                          ("sqs", "ThrottlingException", 400), ("ec2", "RequestLimitExceeded", 503),
                          ("ssm", "ThrottlingException", 400), ("sts", "Throttling", 400)]
BURST = 3                      # throttled requests in a row: all of one CreateFleet's attempts, before the fix
# Each rule draws from its own generator: with this seed a service's 2nd, 8th, 10th, 13th, 20th... requests
# are throttled (a tenth in the long run), so every run meets the same throttles early.
TENTH_SEED = 42


def served_throttles(emu: Emu) -> int:
    """Throttling answers the emulator gave since the last clear; then clear for the next phase."""
    hits = sum(int(r["hits"]) for r in emu.fault_rules()["rules"])
    emu.clear_aws_faults()
    return hits


@pytest.mark.parametrize("service, code, status, phases, scope", THROTTLING)
def test_a_burst_of_throttling_on_each_service_is_retried_and_provision_and_release_succeed(
        make_pool: Any, emu: Emu, monkeypatch: pytest.MonkeyPatch, service: str, code: str, status: int,
        phases: tuple[str, ...], scope: dict[str, str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CONTROL_PLANE_KEY)      # this process's requests, not the agents'
    served: dict[str, int] = {}

    def throttled(phase: str, fn: Callable[..., T], *args: Any) -> T:
        if phase not in phases:
            return fn(*args)
        emu.fault(**{"op": "*", "service": service, "code": code, "status": status, "count": BURST, **scope})
        out = fn(*args)
        served[phase] = served_throttles(emu)
        return out

    pool = throttled("apply", lambda: make_pool(**RELIABLE))
    res = throttled("provision", prov, pool, 2)
    assert res.ok, res.reason
    assert len(online(emu, res.label)) == 2
    rel = throttled("release", release, pool, res.run_id)
    assert sorted(rel.returned_to_pool) == sorted(res.instance_ids) and rel.ok
    assert online(emu, res.label) == []
    assert served == {phase: BURST for phase in phases}          # every throttle was met, and retried
    check(pool, emu)


def test_a_tenth_of_every_services_requests_throttled_at_once_still_provisions_and_releases(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE)
    for service, code, status in OTHER_THROTTLING_CODES:
        emu.fault(op="*", service=service, code=code, status=status, prob=0.1, seed=TENTH_SEED)
    res = prov(pool, 2)
    assert res.ok, res.reason
    rel = release(pool, res.run_id)
    assert sorted(rel.returned_to_pool) == sorted(res.instance_ids) and rel.ok
    assert served_throttles(emu) > 0
    check(pool, emu)


# ---------------------------------------------------------------- CreateFleet capacity per subnet and type

@pytest.mark.parametrize("capacity", [
    pytest.param({0: 0}, id="first-subnet-empty"),
    pytest.param({0: 1}, id="first-subnet-has-one"),
    pytest.param({0: 0, 1: 0}, id="only-the-third-subnet-has-capacity"),
])
def test_subnets_short_of_capacity_get_no_more_than_they_have_and_the_rest_lands_elsewhere(
        make_pool: Any, emu: Emu, local: dict[str, Any], capacity: dict[int, int]) -> None:
    subnets = local["network"]["subnets"]
    pool = make_pool(**RELIABLE)
    for index, available in capacity.items():
        emu.capacity(subnets=[subnets[index]], available=available)
    res = prov(pool, 3)
    assert res.ok, res.reason
    per_subnet = Counter(v["subnet"] for v in ec2_view(pool, res.instance_ids).values())
    assert sum(per_subnet.values()) == 3
    for index, available in capacity.items():            # each got all it had, and no more
        assert per_subnet[subnets[index]] == available, per_subnet
    assert res.capacity_errors.get("InsufficientInstanceCapacity", 0) >= 1, res.capacity_errors
    check(pool, emu)


def test_the_type_ec2_picked_having_no_capacity_gives_another_type_that_meets_the_class(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE)
    first = prov(pool, 1)
    assert first.ok, first.reason
    preferred = ec2_view(pool, first.instance_ids)[first.instance_ids[0]]["type"]
    emu.capacity(instance_types=[preferred], available=0)
    res = prov(pool, 2)
    assert res.ok, res.reason
    types = {v["type"] for v in ec2_view(pool, res.instance_ids).values()}
    assert preferred not in types
    specs = aws.client("ec2", pool.region).describe_instance_types(InstanceTypes=sorted(types))["InstanceTypes"]
    for spec in specs:                                    # the class: 2 vCPU, >= 4 GiB, c* or m*
        assert spec["VCpuInfo"]["DefaultVCpus"] == 2 and spec["MemoryInfo"]["SizeInMiB"] >= 4096
        assert spec["InstanceType"].startswith(("c", "m")), spec["InstanceType"]
    check(pool, emu)


def test_no_capacity_anywhere_fails_the_provision_cleanly_naming_the_error_and_leaves_nothing(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE)
    emu.capacity(available=0)
    rid = run_id()
    out = run_cli("provision", "--pool", pool.name, "--run-id", rid, "--resource-class", "small",
                  "--count", "2", "--json")
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and "InsufficientInstanceCapacity" in doc["reason"], doc["reason"]
    assert doc["instances"] == [] and doc["cleanup"]["failed"] == []
    assert pool_instance_ids(pool.config) == []
    assert store.run_records(pool, rid) == []
    check(pool, emu)


def test_a_run_id_provisioned_again_after_its_release_gets_a_new_instance_when_the_old_one_died(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE, fresh_registration=True)     # release drains: the dead agent is found then
    rid = run_id()
    first = prov(pool, 1, rid)
    assert first.ok, first.reason
    emu.kill_agent(first.instance_ids[0])
    assert release(pool, rid).terminated == first.instance_ids
    reconcile(pool)                                   # the dead agent's runner (see the registered step)
    again = prov(pool, 1, rid)                        # a new CreateFleet for the same run id
    assert again.ok, again.reason
    assert again.instance_ids != first.instance_ids and again.created == 1
    check(pool, emu)


# ---------------------------------------------------------------- the AWS endpoint restarting mid-provision

@pytest.mark.parametrize("phase", ["creation", "validation"])
def test_the_aws_endpoint_restarting_mid_provision_is_ridden_out_by_the_control_plane_and_agents(
        make_pool: Any, emu: Emu, phase: str) -> None:
    assert RELIABLE["heartbeat_stale_s"] >= 15       # 3 s down plus the agents' reconnect backoff is no death
    pool = make_pool(**RELIABLE)
    rid = run_id()
    fleets = emu.count("ec2.CreateFleet")
    if phase == "creation":                   # CreateFleet is in flight when the server goes away
        emu.latency(op="CreateFleet", seconds=3)
    else:                                     # registration outlasts the outage
        emu.behaviour(match={"pool": pool.name}, registration="delay", registration_delay_s=5)
    running = in_background(prov, pool, 2, rid)
    if phase == "creation":
        wait_for(lambda: emu.count("ec2.CreateFleet") > fleets, "CreateFleet to reach the emulator")
    else:
        rows = wait_for(lambda: run_instances(pool, rid) if len(run_instances(pool, rid)) == 2 else None,
                        "the created rows")
        wait_for(lambda: all(signal_of(pool, iid) is Signal.WAITING for iid in rows), "both agents to boot")
    emu.restart(down_s=3)
    res = running.result(timeout=240)
    assert res.ok, res.reason
    assert sorted(pool_instance_ids(pool.config)) == sorted(res.instance_ids)   # one fleet, none leaked
    assert len(online(emu, res.label)) == 2
    check(pool, emu)


# ---------------------------------------------------------------- an agent killed at each step of its life

def kill_while_booting(pool: Any, emu: Emu) -> None:
    """The pre-runner script is still running: validation sees the heartbeat stop and rolls back."""
    rid = run_id()
    running = in_background(prov, pool, 1, rid)
    iid = wait_for(lambda: next(iter(run_instances(pool, rid)), None), "the created row")
    wait_for(lambda: signal_of(pool, iid) is Signal.BOOTING, "the agent to signal booting")
    emu.kill_agent(iid)
    res = running.result(timeout=180)
    assert not res.ok and "heartbeat stopped" in res.reason and iid in res.reason, res.reason
    assert res.cleanup.terminated == [iid]
    assert row_state(pool, iid) == "terminated" and gone_from_ec2(pool, iid)


def kill_while_idle_in_the_pool(pool: Any, emu: Emu) -> None:
    """Idle and deregistered: the next provision's health check terminates it and creates another."""
    first = prov(pool, 1)
    assert first.ok, first.reason
    release(pool, first.run_id)
    iid = first.instance_ids[0]
    assert row_state(pool, iid) == "idle" and signal_of(pool, iid) is Signal.DEREGISTERED
    emu.kill_agent(iid)
    wait_for(lambda: heartbeat_stale(pool, iid), "the dead agent's heartbeat to go stale")
    res = prov(pool, 1)
    assert res.ok, res.reason
    assert iid not in res.instance_ids and res.created == 1
    assert len(online(emu, res.label)) == 1
    assert row_state(pool, iid) == "terminated" and gone_from_ec2(pool, iid)


def kill_while_registering(pool: Any, emu: Emu) -> None:
    """config.sh is talking to GitHub: rollback terminates it; a registration GitHub finishes late is
    removed by the scheduled reconcile."""
    emu.behaviour(match={"pool": pool.name}, registration="hang")
    registers = emu.github_requests("POST /_runner/register")
    rid = run_id()
    running = in_background(prov, pool, 1, rid)
    iid = wait_for(lambda: next(iter(run_instances(pool, rid)), None), "the created row")
    wait_for(lambda: emu.github_requests("POST /_runner/register") > registers, "config.sh to reach GitHub")
    assert runners_of(emu, iid) == [], "GitHub already lists the runner: this would be the registered step"
    assert signal_of(pool, iid) is not Signal.REGISTERED
    emu.kill_agent(iid)
    res = running.result(timeout=180)
    assert not res.ok and "heartbeat stopped" in res.reason, res.reason
    assert res.cleanup.terminated == [iid]
    assert row_state(pool, iid) == "terminated" and gone_from_ec2(pool, iid)
    emu.clear_github_faults()                                  # GitHub finishes the held registration
    wait_for(lambda: runners_of(emu, iid), "GitHub to finish the registration it was holding")
    reconcile(pool)
    assert runners_of(emu, iid) == []


def kill_while_registered(pool: Any, emu: Emu) -> None:
    """Registered for a run: release terminates it (no fresh heartbeat), reconcile removes its runner."""
    res = prov(pool, 2)
    assert res.ok, res.reason
    dead, alive = res.instance_ids
    emu.kill_agent(dead)
    rel = release(pool, res.run_id)
    assert rel.terminated == [dead] and rel.returned_to_pool == [alive]
    assert row_state(pool, dead) == "terminated" and gone_from_ec2(pool, dead)
    assert row_state(pool, alive) == "idle" and runners_of(emu, alive) == []
    assert runners_of(emu, dead) == [], "release deleted the dead agent's runner by the id it reported"


def kill_while_deregistering(pool: Any, emu: Emu) -> None:
    """Release cleared the run and the agent dies before it confirms: release stops waiting for it,
    deletes its runner on GitHub by the id the agent reported, and terminates it."""
    res = prov(pool, 1)
    assert res.ok, res.reason
    iid = res.instance_ids[0]
    emu.kill_agent(iid, signal.SIGSTOP)                        # frozen: it never sees the release
    releasing = in_background(release, pool, res.run_id)
    wait_for(lambda: row_state(pool, iid) == "draining", "release to clear the run from the row")
    assert signal_of(pool, iid) is Signal.REGISTERED
    emu.kill_agent(iid)
    rel: ReleaseResult = releasing.result(timeout=180)
    assert rel.terminated == [iid] and rel.returned_to_pool == []
    assert row_state(pool, iid) == "terminated" and gone_from_ec2(pool, iid)
    assert runners_of(emu, iid) == [], "release deleted the runner itself: no reconcile needed"


AGENT_STEPS = {
    "booting": kill_while_booting, "idle-in-the-pool": kill_while_idle_in_the_pool,
    "registering": kill_while_registering, "registered": kill_while_registered,
    "deregistering": kill_while_deregistering,
}


@pytest.mark.parametrize("step", list(AGENT_STEPS))
def test_an_agent_killed_at_each_step_of_its_life_leaves_a_terminated_instance_and_no_runner(
        make_pool: Any, emu: Emu, step: str) -> None:
    # fresh_registration: these steps are the deregister-and-drain life of an agent (a relabelling
    # pool keeps a listening runner registered across runs and never drains a healthy one).
    pool = make_pool(**RELIABLE, fresh_registration=True,
                     **({"pre_runner_script": "sleep 300\n"} if step == "booting" else {}))
    AGENT_STEPS[step](pool, emu)
    check(pool, emu)


# ---------------------------------------------------------------- the provisioner killed at each phase

class Provisioner:
    """``runner-pool provision`` as a process, its progress lines collected as they come.

    It signs with ``key``, an access key of its own, so the faults set for that key delay its requests
    only and the emulator counts them apart from the agents' and this test's.
    """

    def __init__(self, pool: Any, rid: str, count: int, key: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "provision", "--pool", pool.name, "--run-id", rid,
             "--resource-class", "small", "--count", str(count)],
            cwd=ROOT, env={**os.environ, "RUNNER_POOL_LOG_LEVEL": "WARNING", "AWS_ACCESS_KEY_ID": key},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def reached(self, tag: str) -> bool:
        return any(line.startswith(tag) for line in self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL, self.lines


PHASES = ["[1/4] selection", "[2/4] creation", "[3/4] validation", "[4/4] commit"]
ROLLBACK = "[4/4] rollback"                   # what a failed provision prints instead of the commit
COMMITTING = '"running"'                      # in the body of a commit write (the agents' writes never say it)


@pytest.mark.parametrize("phase", [p.split()[1] for p in PHASES])
def test_a_provisioner_killed_in_each_phase_leaves_nothing_after_reconcile_and_release(
        make_pool: Any, emu: Emu, phase: str) -> None:
    pool = make_pool(**RELIABLE)
    rid = run_id()
    tag = next(p for p in PHASES if p.endswith(phase))
    key = f"AKIDPROV{uuid.uuid4().hex[:12].upper()}"
    warm: list[str] = []
    if phase == "selection":                  # claimed, the message not yet deleted
        first = prov(pool, 1)
        assert first.ok, first.reason
        release(pool, first.run_id)
        warm = first.instance_ids
        emu.latency(op="DeleteMessageBatch", service="sqs", access_key=key, seconds=15)
    elif phase == "creation":                 # CreateFleet in flight: EC2 launches, no row written yet
        emu.latency(op="CreateFleet", access_key=key, seconds=5)
    elif phase == "validation":
        emu.behaviour(match={"pool": pool.name}, registration="hang")
    else:                                     # the commit (one transaction of both rows) in flight
        emu.latency(op="TransactWriteItems", contains=COMMITTING, access_key=key, seconds=8)
    p = Provisioner(pool, rid, 2, key)
    wait_for(lambda: p.reached(tag), f"the provisioner to reach {tag!r}")
    if phase == "selection":
        wait_for(lambda: run_instances(pool, rid) == warm, "the claim of the idle runner")
    elif phase == "creation":
        wait_for(lambda: emu.count("ec2.CreateFleet", access_key=key) >= 1, "CreateFleet to reach EC2")
    elif phase == "validation":
        wait_for(lambda: len(run_instances(pool, rid)) == 2, "the created rows")
    else:
        wait_for(lambda: emu.latency_hits(COMMITTING) >= 1, "the commit transaction to reach the table")
    p.kill()
    following = [*PHASES[PHASES.index(tag) + 1:], ROLLBACK]
    assert not any(p.reached(t) for t in following), p.lines           # it died in that phase
    if phase == "creation":
        wait_for(lambda: len(pool_instance_ids(pool.config)) == 2, "the fleet EC2 was launching")
    elif phase == "commit":
        assert {r.state for r in store.run_records(pool, rid)} == {State.CREATED}
        wait_for(lambda: {r.state for r in store.run_records(pool, rid)} == {State.RUNNING},
                 "the commit transaction in flight to land")
    emu.clear_faults()                                                  # the fault is over; now recover
    fixed = reconcile(pool, clock=AFTER_ORPHAN_GRACE)                   # the scheduled one, later
    rel = release(pool, rid)                                            # the workflow's release step
    assert not fixed.failed and rel.ok
    if phase == "creation":
        assert len([a for a in fixed.applied if a.kind == "terminate_instance"]) == 2 and rel.found == []
    elif phase == "selection":
        assert rel.returned_to_pool == warm
    elif phase == "validation":
        assert len(rel.terminated) == 2
    else:
        assert len(rel.returned_to_pool) == 2
    assert [r for r in store.run_records(pool, rid) if r.state is not State.TERMINATED] == []
    assert {r.state for r in store.all_records(pool)} <= {State.IDLE, State.TERMINATED}
    wait_for(lambda: online(emu, rid) == [], "no runner online for the dead run", 30)
    check(pool, emu)
