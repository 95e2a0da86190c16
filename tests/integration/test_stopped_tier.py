"""The stopped tier end to end: an idle runner past its idle time is stopped (not terminated), and
the next provision starts it, its agent comes back on the new boot and registers for that run.

Refresh runs with a clock ahead of the wall clock by more than the idle time, so the idle runner
is past its threshold without the test waiting for it.
"""
from __future__ import annotations

from typing import Any

from controlplane import store
from controlplane.clock import AheadClock
from controlplane.config import PoolConfig
from controlplane.refresh import refresh
from controlplane.release import release
from tests.conftest import FAST, Emu, wait_for
from tests.integration.test_provision import ec2_states, online_runners, prov, states
from tests.reliability import invariants

PAST_IDLE = AheadClock(FAST["idle_time_s"] + 30)


def tiered(**small: Any) -> dict[str, Any]:
    return {"small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "instance_types": ["c*", "m*"],
                      "stopped_time_s": 900, **small}}


def idle_runner(pool: Any, emu: Emu, usage: str | None = None) -> str:
    """One runner, used by a run and released back to the pool: its instance id."""
    res = prov(pool, 1, usage=usage)
    assert res.ok, res.reason
    iid = res.instance_ids[0]
    rel = release(pool, res.run_id)
    assert rel.returned_to_pool == [iid], rel.to_dict()
    return iid


def refresh_past_idle(cfg: PoolConfig) -> Any:
    return refresh(cfg, clock=PAST_IDLE, run_reconcile=False)


def test_an_idle_runner_past_its_idle_time_is_stopped_and_the_next_provision_starts_and_uses_it(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes=tiered())
    iid = idle_runner(pool, emu)

    res = refresh_past_idle(pool.config)
    assert res.stopped == [iid] and iid not in res.terminated, res.to_dict()
    assert states(pool, [iid]) == {iid: "stopped"}
    assert ec2_states(pool, [iid]) == {iid: "stopped"}
    wait_for(lambda: emu.machines()[iid]["phase"] == "halted", f"{iid}'s processes to stop with the instance")
    _, agent = store.read_set(pool, [iid])[iid]
    assert agent is not None and str(agent.signal) != "shutdown", "a stop is not a shutdown: the row must not read dead"

    starts = emu.count("ec2.StartInstances")
    fleets = emu.count("ec2.CreateFleet")
    got = prov(pool, 1)
    assert got.ok, got.reason
    assert got.instance_ids == [iid] and [m.source for m in got.instances] == ["stopped"]
    assert (got.from_pool, got.from_stopped, got.created, got.fleet_calls) == (0, 1, 0, 0)
    assert emu.count("ec2.StartInstances") == starts + 1 and emu.count("ec2.CreateFleet") == fleets
    assert ec2_states(pool, [iid]) == {iid: "running"} and states(pool, [iid]) == {iid: "running"}
    assert emu.machines()[iid]["boots"] == 2, "the agent came back from the per-boot script, not the user data"
    runners = online_runners(emu, got.run_id)
    assert [r["name"].rsplit("-", 1)[0] for r in runners] == [iid], runners

    assert release(pool, got.run_id).returned_to_pool == [iid]
    invariants.check(pool, emu)


def test_several_stopped_runners_are_started_with_one_call_and_the_rest_is_created(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes=tiered())
    first = prov(pool, 2)
    assert first.ok, first.reason
    assert sorted(release(pool, first.run_id).returned_to_pool) == sorted(first.instance_ids)
    assert sorted(refresh_past_idle(pool.config).stopped) == sorted(first.instance_ids)
    wait_for(lambda: all(emu.machines()[i]["phase"] == "halted" for i in first.instance_ids), "both to stop")

    starts = emu.count("ec2.StartInstances")
    got = prov(pool, 3)
    assert got.ok, got.reason
    assert sorted(m.instance_id for m in got.instances if m.source == "stopped") == sorted(first.instance_ids)
    assert (got.from_stopped, got.created) == (2, 1)
    assert emu.count("ec2.StartInstances") == starts + 1, "one StartInstances for the batch"
    assert set(states(pool, got.instance_ids).values()) == {"running"}
    assert len(online_runners(emu, got.run_id)) == 3
    release(pool, got.run_id)
    invariants.check(pool, emu)


def test_a_spot_runner_is_not_stopped_but_terminated_as_ec2_would_refuse_to_stop_it(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes=tiered())
    iid = idle_runner(pool, emu, usage="spot")
    res = refresh_past_idle(pool.config)
    assert res.stopped == [] and iid in res.expired.get("idle", []), res.to_dict()
    assert states(pool, [iid]) == {iid: "terminated"}
    assert ec2_states(pool, [iid]) == {iid: "terminated"}
    invariants.check(pool, emu)


def test_a_stopped_runner_past_its_stopped_time_is_terminated(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes=tiered(stopped_time_s=60))
    iid = idle_runner(pool, emu)
    assert refresh_past_idle(pool.config).stopped == [iid]
    later = refresh(pool.config, clock=AheadClock(FAST["idle_time_s"] + 30 + 60 + 30), run_reconcile=False)
    assert iid in later.expired.get("stopped", []), later.to_dict()
    assert states(pool, [iid]) == {iid: "terminated"} and ec2_states(pool, [iid]) == {iid: "terminated"}
    invariants.check(pool, emu)


def test_a_class_without_a_stopped_tier_still_terminates_its_expired_idle_runners(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    iid = idle_runner(pool, emu)
    res = refresh_past_idle(pool.config)
    assert res.stopped == [] and iid in res.expired.get("idle", [])
    assert ec2_states(pool, [iid]) == {iid: "terminated"}
    invariants.check(pool, emu)
