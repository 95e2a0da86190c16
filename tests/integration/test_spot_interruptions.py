"""Spot interruptions end to end: the IMDS stand-in announces EC2's notice to one instance, its agent
stops its runner and signals ``interrupted``, the control plane ends the instance (row closed,
runner removed from GitHub), counts it for the class, and once the class's breaker opens, new
creations go on-demand (what EC2 launched, per its lifecycle).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from controlplane import aws, interruptions, store
from controlplane.provision import ProvisionResult
from controlplane.reconcile import reconcile
from controlplane.refresh import refresh
from controlplane.release import release
from tests.conftest import Emu, run_cli, wait_for
from tests.integration.test_provision import ec2_states, online_runners, prov, run_id, states
from tests.reliability import invariants


def lifecycles(pool: Any, ids: list[str]) -> dict[str, str]:
    """EC2's purchase option of each instance: ``spot`` or ``on-demand`` (no InstanceLifecycle)."""
    ec2 = aws.client("ec2", pool.region)
    return {i["InstanceId"]: i.get("InstanceLifecycle", "on-demand")
            for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]}


def signal_of(pool: Any, iid: str) -> str | None:
    _, agent = store.read_set(pool, [iid])[iid]
    return str(agent.signal) if agent is not None and agent.signal else None


def spot_pool(make_pool: Any, trip_after: int) -> Any:
    return make_pool(usage_class="spot",
                     spot_breaker={"interruptions": trip_after, "window_s": 3600, "cooldown_s": 600})


def test_a_spot_notice_during_a_run_stops_the_runner_and_the_instance_is_closed_and_counted(
        make_pool: Any, emu: Emu) -> None:
    pool = spot_pool(make_pool, trip_after=3)
    res = prov(pool, 2)
    assert res.ok, res.reason
    assert set(lifecycles(pool, res.instance_ids).values()) == {"spot"}
    hit, other = res.instance_ids

    emu.spot_notice(hit, "instance-action")
    wait_for(lambda: signal_of(pool, hit) == "interrupted", f"{hit}'s agent to signal interrupted")
    wait_for(lambda: [r["name"] for r in online_runners(emu, res.run_id)] == [f"{other}-1"],
             "the interrupted runner to stop taking jobs")

    swept = refresh(pool.config, run_reconcile=False)
    assert swept.interrupted == [hit], swept.to_dict()
    assert states(pool, [hit]) == {hit: "terminated"} and ec2_states(pool, [hit]) == {hit: "terminated"}
    assert not [r for r in emu.runners() if r["name"].startswith(hit)], "its runner is removed from GitHub"
    assert interruptions.last_hour(pool, time.time()) == {"large": 0, "small": 1}
    shown = run_cli("status", "--pool", pool.name, "--region", pool.region, "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"interruptions_last_hour": {"large": 0, "small": 1}' in shown.stdout

    rel = release(pool, res.run_id)
    assert rel.returned_to_pool == [other], rel.to_dict()
    assert not interruptions.breaker(pool, "small", time.time()).open, "one interruption of three: still closed"
    invariants.check(pool, emu)


def test_a_spot_notice_during_validation_fails_the_set_and_opens_the_breaker_so_the_next_creation_is_on_demand(
        make_pool: Any, emu: Emu) -> None:
    pool = spot_pool(make_pool, trip_after=1)
    # config.sh takes a few seconds for this pool's runners, so the notice arrives mid-validation.
    emu.behaviour(match={"pool": pool.name}, registration="delay", registration_delay_s=6)
    rid = run_id()
    noticed: list[str] = []

    def inject() -> None:
        created = wait_for(lambda: [r.instance_id for r in store.run_records(pool, rid)
                                    if str(r.state) == "created"] or None, "the fleet's rows")
        wait_for(lambda: created[0] in emu.machines() and emu.machines()[created[0]]["phase"] == "running",
                 "its agent to boot")
        emu.spot_notice(created[0], "rebalance")
        noticed.append(created[0])

    t = threading.Thread(target=inject)
    t.start()
    res: ProvisionResult = prov(pool, 2, rid=rid)
    t.join(120)
    assert noticed, "the notice was injected"
    assert not res.ok and "interrupted" in res.reason, res.reason
    assert noticed[0] in res.cleanup.terminated and len(res.cleanup.terminated) == 2, res.cleanup
    assert set(states(pool, res.cleanup.terminated).values()) == {"terminated"}, "all or nothing: the set is gone"
    assert interruptions.breaker(pool, "small", time.time()).open
    # The other member's config.sh may still register its runner as the rollback terminates it; once
    # its processes are gone, reconcile removes what is left on GitHub (the invariants' premise).
    wait_for(lambda: all(emu.machines()[i]["phase"] == "terminated" for i in res.cleanup.terminated),
             "the rolled-back instances to power off")
    reconcile(pool)

    emu.clear_faults()
    fleets_before = emu.count("ec2.CreateFleet")
    nxt = prov(pool, 1, usage="spot")
    assert nxt.ok and nxt.breaker_open and nxt.usage_class == "on-demand", nxt.reason
    assert emu.count("ec2.CreateFleet") == fleets_before + 1
    assert lifecycles(pool, nxt.instance_ids) == {nxt.instance_ids[0]: "on-demand"}
    release(pool, nxt.run_id)
    invariants.check(pool, emu)
