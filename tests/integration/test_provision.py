"""Provision end to end: emulator, simulator running the real agent, GitHub stand-in.

Every assertion reads what a user would check: rows in the state table,
instances in EC2, runners in the GitHub stand-in, messages in the queues.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from controlplane import aws, store
from controlplane import pool as pool_q
from controlplane.apply import pool_instance_ids
from controlplane.errors import CommitRaced
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.reconcile import reconcile
from controlplane.records import State
from controlplane.release import release
from controlplane.state import transition
from tests.conftest import ROOT, Emu, run_cli_with_own_key, wait_for
from tests.factories import provision_rolled_back_by_one_failed_registration, run_id, warm_pool


def prov(pool: Any, n: int, cls: str = "small", usage: str | None = None, rid: str | None = None) -> ProvisionResult:
    return provision(pool, ProvisionRequest(rid or run_id(), cls, n, usage))


def states(pool: Any, ids: list[str]) -> dict[str, str]:
    return {i: (r.state.value if r else "missing") for i, (r, _) in store.read_set(pool, ids).items()}


def ec2_states(pool: Any, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    ec2 = aws.client("ec2", pool.region)
    out = {}
    for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
        for i in r["Instances"]:
            out[i["InstanceId"]] = i["State"]["Name"]
    return out


def online_runners(emu: Emu, label: str) -> list[dict[str, Any]]:
    return [r for r in emu.runners() if label in [lb["name"] for lb in r["labels"]] and r["status"] == "online"]


def no_runner_left(emu: Emu, label: str, timeout_s: float = 20) -> bool:
    """True once no runner with ``label`` is online (terminated instances' agents deregister as they stop)."""
    deadline = time.monotonic() + timeout_s
    while online_runners(emu, label):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_invariants(pool: Any) -> None:
    """Every instance in EC2 has a live row and every live row has a running instance."""
    rows = {r.instance_id: r for r in store.all_records(pool)}
    live_rows = {i for i, r in rows.items() if r.state is not State.TERMINATED}
    running = set(pool_instance_ids(pool.config))
    assert running <= live_rows, f"instances with no live row: {running - live_rows}"
    assert live_rows <= running, f"live rows with no instance: {live_rows - running}"


def test_cold_pool_creates_every_runner_and_they_register_with_the_run_label(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    res = prov(pool, 3)
    assert res.ok, res.reason
    assert [m.source for m in res.instances] == ["created"] * 3 and res.fleet_calls == 1
    assert set(states(pool, res.instance_ids).values()) == {"running"}
    assert set(ec2_states(pool, res.instance_ids).values()) == {"running"}
    assert len(online_runners(emu, res.label)) == 3
    d = res.to_dict()
    assert set(d) >= {"run_id", "label", "instances", "timings"}
    assert set(d["instances"][0]) >= {"id", "source", "instance_type", "subnet"}
    assert d["instances"][0]["instance_type"].startswith(("c", "m"))
    assert_invariants(pool)


def test_warm_pool_serves_the_next_run_without_creating(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    first = prov(pool, 2)
    assert first.ok, first.reason
    rel = release(pool, first.run_id)
    assert sorted(rel.returned_to_pool) == sorted(first.instance_ids)
    assert set(states(pool, first.instance_ids).values()) == {"idle"}
    assert online_runners(emu, first.label) == []               # deregistered before going back
    second = prov(pool, 2)
    assert second.ok, second.reason
    assert sorted(second.instance_ids) == sorted(first.instance_ids)
    assert {m.source for m in second.instances} == {"pool"} and second.fleet_calls == 0
    assert len(online_runners(emu, second.label)) == 2
    assert pool_q.depth(pool.region, pool_q.queue_url(pool.config, "small")) == {"visible": 0, "in_flight": 0}


def test_partly_warm_pool_claims_what_it_has_and_creates_the_rest(make_pool: Any) -> None:
    pool = make_pool()
    first = prov(pool, 1)
    assert first.ok
    release(pool, first.run_id)
    res = prov(pool, 3)
    assert res.ok, res.reason
    assert sorted(m.source for m in res.instances) == ["created", "created", "pool"]
    assert first.instance_ids[0] in res.instance_ids


def test_one_instance_never_registers_rolls_back_the_whole_set(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    warm, res = provision_rolled_back_by_one_failed_registration(pool, emu)
    assert not res.ok and "failed validation" in res.reason
    created = [i for i in res.cleanup.terminated]
    assert len(created) == 2
    assert res.cleanup.returned_to_pool == warm.instance_ids      # the claimed one went back to the pool
    assert states(pool, warm.instance_ids) == {warm.instance_ids[0]: "idle"}
    assert set(states(pool, created).values()) == {"terminated"}
    assert set(ec2_states(pool, created).values()) <= {"terminated", "shutting-down"}
    assert no_runner_left(emu, res.label)
    assert_invariants(pool)


def test_heartbeat_stopping_during_validation_fails_fast(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(validation_timeout_s=60)
    emu.behaviour(match={"pool": pool.name}, count=1, registration="hang", freeze_after_s=6)
    t = time.monotonic()
    res = prov(pool, 2)
    assert not res.ok and "heartbeat stopped" in res.reason
    assert time.monotonic() - t < 45                               # did not wait for the whole timeout
    assert set(ec2_states(pool, res.cleanup.terminated).values()) <= {"terminated", "shutting-down"}
    assert_invariants(pool)


@pytest.mark.parametrize("fallback", [True, False], ids=["with-fallback", "without-fallback"])
def test_spot_capacity_shortfall_falls_back_to_on_demand_only_when_allowed(make_pool: Any, emu: Emu,
                                                                           fallback: bool) -> None:
    pool = make_pool(spot_fallback=fallback)
    emu.capacity(lifecycle="spot", available=0)
    before = emu.requests()["counts"].get("ec2.CreateFleet", 0)
    res = prov(pool, 2, usage="spot")
    fleets = emu.requests()["counts"].get("ec2.CreateFleet", 0) - before
    assert res.capacity_errors.get("InsufficientInstanceCapacity", 0) >= 1
    if fallback:
        assert res.ok, res.reason
        assert fleets == 2 and {m.usage_class for m in res.instances} == {"on-demand"}
    else:
        assert not res.ok and "could not supply 2 of 2" in res.reason
        assert fleets == 1 and pool_instance_ids(pool.config) == []
    assert_invariants(pool)


def test_throttling_is_retried_and_the_provision_succeeds(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    emu.fault(op="CreateFleet", code="RequestLimitExceeded", status=503, count=1)
    emu.fault(op="UpdateItem", code="ThrottlingException", status=400, count=2)
    emu.fault(op="TransactWriteItems", code="ThrottlingException", status=400, count=2)   # the commit
    emu.fault(op="ReceiveMessage", code="ThrottlingException", status=400, count=1)
    res = prov(pool, 2)
    assert res.ok, res.reason
    assert res.fleet_calls == 1 and len(pool_instance_ids(pool.config)) == 2
    hits = {r["op"]: r["hits"] for r in emu.fault_rules()["rules"]}
    assert hits["TransactWriteItems"] == 2 and hits["CreateFleet"] == 1    # the commit was throttled, and retried
    assert set(states(pool, res.instance_ids).values()) == {"running"}


def test_a_stale_message_loses_only_its_own_claim_and_the_warm_run_takes_the_live_runners(
        make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 3)
    url = pool_q.queue_url(pool.config, "small")
    by_id = {m.instance_id: m for m in pool_q.drain(pool.region, url)}
    assert sorted(by_id) == sorted(first.instance_ids)
    stale, *live = first.instance_ids
    assert transition(pool, stale, from_=State.IDLE, to=State.CLAIMED, expect_run=None, set_run="run-rival",
                      now=time.time()).won                      # its message is now stale
    pool_q.send(pool.region, url, [by_id[stale], *(by_id[i] for i in live)])   # the stale one comes first

    res, key = run_cli_with_own_key("provision", "--pool", pool.name, "--region", pool.region, "--run-id",
                                    run_id(), "--resource-class", "small", "--count", "2", "--json")

    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["from_pool"] == 2 and out["created"] == 0
    assert sorted(i["id"] for i in out["instances"]) == sorted(live)
    counts = emu.requests(access_key=key)["counts"]
    # The first batch's claim transaction was cancelled by the stale row and redone row by row (2
    # writes: the stale one lost); the next batch's claim and the commit were one transaction each.
    assert counts.get("dynamodb.TransactWriteItems") == 3 and counts.get("dynamodb.UpdateItem") == 2, counts
    assert states(pool, live) == {i: "running" for i in live}
    got = store.get_record(pool, stale)
    assert got is not None and got.state is State.CLAIMED and got.run_id == "run-rival"
    assert pool_q.depth(pool.region, url)["visible"] == 0
    transition(pool, stale, from_=State.CLAIMED, to=State.IDLE, expect_run="run-rival", set_run=None,
               now=time.time())                                 # the rival gives it back; destroy tidies up


def test_a_row_that_moves_on_while_the_commit_is_in_flight_gives_the_whole_set_up(
        make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 2)
    lost, kept = first.instance_ids
    rid = run_id()
    emu.latency(op="TransactWriteItems", contains='"running"', seconds=3)     # hold the commit
    box: dict[str, ProvisionResult] = {}
    worker = threading.Thread(target=lambda: box.update(res=prov(pool, 2, rid=rid)))
    worker.start()
    wait_for(lambda: emu.latency_hits('"running"') >= 1, "the commit transaction to reach the emulator", 120)
    # Meanwhile something else (refresh, for a claim past its deadline) takes one row out of the run.
    assert transition(pool, lost, from_=State.CLAIMED, to=State.TERMINATED, expect_run=rid, set_run=None,
                      now=time.time(), when="any").won
    worker.join(180)
    res = box["res"]

    assert not res.ok and "changed state before commit" in res.reason and lost in res.reason, res.reason
    assert states(pool, [kept, lost]) == {kept: "idle", lost: "terminated"}        # all or nothing
    assert ec2_states(pool, [lost])[lost] in ("shutting-down", "terminated")
    assert ec2_states(pool, [kept])[kept] == "running"
    url = pool_q.queue_url(pool.config, "small")
    assert [m.instance_id for m in pool_q.drain(pool.region, url)] == [kept]      # back in the pool, once
    assert isinstance(res.failure, CommitRaced) and res.failure.lost == [lost]
    assert no_runner_left(emu, res.label), "a runner still carries the failed run's label"


def test_a_provisioner_killed_mid_run_leaves_no_orphan_after_reconcile(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    rid = run_id()
    emu.behaviour(match={"pool": pool.name}, registration="hang")
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "provision", "--pool", pool.name,
                             "--run-id", rid, "--resource-class", "small", "--count", "2"],
                            cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(store.run_records(pool, rid)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    res = reconcile(pool)
    assert_invariants(pool)                                         # every instance tracked, every row real
    rel = release(pool, rid)                                        # and the dead run can be cleaned up
    assert len(rel.found) == 2 and sorted(rel.terminated) == sorted(rel.found)
    assert pool_instance_ids(pool.config) == []
    assert not res.failed


def test_eight_concurrent_provisions_share_a_pool_of_five_without_double_claims(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    warm = prov(pool, 5)
    assert warm.ok
    release(pool, warm.run_id)
    results: list[ProvisionResult] = []
    lock = threading.Lock()

    def one() -> None:
        r = prov(pool, 2)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert len(results) == 8
    held = [i for r in results if r.ok for i in r.instance_ids]
    assert len(held) == len(set(held)), "an instance is in two runs"
    assert sum(r.from_pool for r in results if r.ok) <= 5
    for r in results:
        if r.ok:
            assert set(states(pool, r.instance_ids).values()) == {"running"}
            assert {rec.run_id for rec in store.run_records(pool, r.run_id)} == {r.run_id}
        else:
            assert store.run_records(pool, r.run_id) == []          # cleanly rolled back
    assert_invariants(pool)


def test_bad_input_changes_nothing_in_aws(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    before = emu.requests()["mutations"]
    for bad in (ProvisionRequest("r1", "huge", 1), ProvisionRequest("r1", "small", 0),
                ProvisionRequest("r1", "small", 1, "cheap")):
        with pytest.raises(Exception) as err:
            provision(pool, bad)
        assert getattr(err.value, "exit_code", None) == 2
    assert emu.requests()["mutations"] == before


def test_an_error_after_claims_won_terminates_what_selection_claimed(make_pool: Any, emu: Emu) -> None:
    # Selection claims, then deletes the messages; an AWS error there must not strand the claimed rows
    # (the run id would stay blocked and the instances burn until their claim timeout).
    pool = make_pool()
    warm = prov(pool, 2)
    assert warm.ok, warm.reason
    release(pool, warm.run_id)
    emu.fault(op="DeleteMessageBatch", code="AccessDenied", status=400, count=1)
    rid = run_id()
    with pytest.raises(aws.AwsError) as err:
        prov(pool, 2, rid=rid)
    assert "emergency cleanup terminated 2 instance(s)" in err.value.message
    assert set(states(pool, warm.instance_ids).values()) == {"terminated"}
    assert set(ec2_states(pool, warm.instance_ids).values()) <= {"terminated", "shutting-down"}
    assert store.run_records(pool, rid) == []                        # the run id is free again
    assert_invariants(pool)
