"""Pool controls on the embedded default: warm minimum, ceilings, cost tags, status.

Each test checks what a user would: rows in the state table, instances and
their tags in EC2, messages in the class queue, what the CLI printed and its
exit code; and ends with the reliability invariants (nothing leaks, nothing
is shared).
"""
from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from controlplane import aws, ceilings, store
from controlplane import pool as pool_q
from controlplane.apply import pool_instance_ids
from controlplane.ceilings import CeilingReached
from controlplane.clock import AheadClock
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.reconcile import reconcile
from controlplane.records import LIVE_STATES, State
from controlplane.refresh import refresh
from controlplane.release import release
from tests.conftest import Emu, run_cli, wait_for
from tests.reliability import invariants

SMALL = {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "instance_types": ["c*", "m*"]}
LARGE = {"vcpu": {"min": 8, "max": 8}, "memory_mib": {"min": 16384}}


def rid() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


def rows_by_state(pool: Any, cls: str = "small") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in store.all_records(pool):
        if r.resource_class == cls:
            out.setdefault(r.state.value, []).append(r.instance_id)
    return out


def queue_visible(pool: Any, cls: str = "small") -> int:
    return pool_q.depth(pool.region, pool_q.queue_url(pool.config, cls))["visible"]


def tags_of(pool: Any, instance_id: str) -> dict[str, str]:
    ec2 = aws.client("ec2", pool.region)
    inst = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


# ------------------------------------------------------------------ warm minimum

def test_refresh_reaches_the_warm_minimum_with_one_fleet_keeps_it_and_lets_the_surplus_expire(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes={"small": {**SMALL, "min_idle": 2}, "large": LARGE})
    fleets = emu.count("ec2.CreateFleet")

    first = refresh(pool.config)
    assert first.ok, first.summary()
    assert first.warm is not None and len(first.warm.created["small"]) == 2, first.warm
    assert emu.count("ec2.CreateFleet") == fleets + 1                 # one fleet for the whole deficit
    assert sorted(rows_by_state(pool)["idle"]) == sorted(first.warm.created["small"])
    assert sorted(first.warm.promoted) == sorted(first.warm.created["small"])
    assert queue_visible(pool) == 2
    assert sorted(pool_instance_ids(pool.config)) == sorted(first.warm.created["small"])
    assert "large" not in first.warm.targets and rows_by_state(pool, "large") == {}

    again = refresh(pool.config)                                       # at the minimum: nothing counted twice
    assert again.warm is not None and again.warm.created == {} and again.warm.counted == {"small": 2}
    assert emu.count("ec2.CreateFleet") == fleets + 1
    assert len(rows_by_state(pool)["idle"]) == 2

    run = provision(pool, ProvisionRequest(rid(), "small", 3))         # takes both warm runners, creates one
    assert run.ok, run.reason
    assert (run.from_pool, run.created) == (2, 1)
    topped = refresh(pool.config)
    assert topped.warm is not None and len(topped.warm.created["small"]) == 2
    assert emu.count("ec2.CreateFleet") == fleets + 3                  # the run's fleet, and one top-up
    assert len(rows_by_state(pool)["idle"]) == 2 and len(rows_by_state(pool)["running"]) == 3

    back = release(pool, run.run_id)
    assert len(back.returned_to_pool) == 3
    assert len(rows_by_state(pool)["idle"]) == 5
    # Past idle_time_s: the three above the minimum expire, the two youngest stay warm.
    later = AheadClock(pool.config.idle_time_s + 30)
    expired = refresh(pool.config, clock=later)
    assert expired.ok, expired.summary()
    idle_after = rows_by_state(pool)["idle"]
    assert len(idle_after) == 2 and len(expired.expired["idle"]) == 3
    records = {r.instance_id: r for r in store.all_records(pool)}
    assert all(records[i].threshold > later.now() for i in idle_after)
    youngest = sorted((r for r in records.values() if r.resource_class == "small"),
                      key=lambda r: -r.launched_at)[:2]
    assert sorted(idle_after) == sorted(r.instance_id for r in youngest)
    assert expired.warm is not None and expired.warm.created == {}
    wait_for(lambda: sorted(pool_instance_ids(pool.config)) == sorted(idle_after),
             "only the two warm instances to be left in EC2")
    invariants.check(pool, emu)


def test_outside_its_schedule_the_warm_minimum_is_zero(make_pool: Any, emu: Emu) -> None:
    # A window that opens two hours from now and closes an hour later, every day.
    now = datetime.now(timezone.utc)
    start, end = (now + timedelta(hours=2)).strftime("%H:%M"), (now + timedelta(hours=3)).strftime("%H:%M")
    schedule = {"timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                "start": start, "end": end}
    pool = make_pool(resource_classes={"small": {**SMALL, "min_idle": 2, "min_idle_schedule": schedule}})
    fleets = emu.count("ec2.CreateFleet")
    res = refresh(pool.config)
    assert res.ok and res.warm is not None and res.warm.targets == {"small": 0} and res.warm.created == {}
    assert emu.count("ec2.CreateFleet") == fleets and pool_instance_ids(pool.config) == []
    # Inside the window (the clock moved 2.5 h on), the same refresh tops the class up.
    inside = refresh(pool.config, clock=AheadClock(2.5 * 3600))
    assert inside.warm is not None and inside.warm.targets == {"small": 2}
    assert len(inside.warm.created["small"]) == 2
    invariants.check(pool, emu)


# ------------------------------------------------------------------ ceilings

class LiveWatch:
    """Samples live instances in EC2 and live rows in the table until stopped; keeps the maxima."""

    def __init__(self, pool: Any, cls: str | None = None) -> None:
        self.pool, self.cls = pool, cls
        self.max_ec2 = self.max_rows = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ec2 = len(pool_instance_ids(self.pool.config, ("pending", "running", "stopping", "stopped")))
            rows = sum(1 for r in store.all_records(self.pool)
                       if r.state in LIVE_STATES and (self.cls is None or r.resource_class == self.cls))
            self.max_ec2, self.max_rows = max(self.max_ec2, ec2), max(self.max_rows, rows)
            self.samples += 1
            self._stop.wait(0.1)

    def __enter__(self) -> LiveWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_twenty_concurrent_provisions_cannot_pass_a_class_ceiling(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes={"small": {**SMALL, "max_instances": 5}})
    results: dict[str, ProvisionResult | BaseException] = {}
    go = threading.Barrier(20)

    def one(run_id: str) -> None:
        go.wait()
        try:
            results[run_id] = provision(pool, ProvisionRequest(run_id, "small", 1))
        except BaseException as exc:  # noqa: BLE001 - the loser's error is what the test checks
            results[run_id] = exc

    runs = [rid() for _ in range(20)]
    with LiveWatch(pool) as watch:
        threads = [threading.Thread(target=one, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    winners = [r for r in runs if isinstance(results[r], ProvisionResult) and results[r].ok]  # type: ignore[union-attr]
    losers = [results[r] for r in runs if r not in winners]
    assert len(winners) == 5, {r: str(v) if isinstance(v, BaseException) else v.reason for r, v in results.items()}
    assert all(isinstance(e, CeilingReached) for e in losers), [repr(e) for e in losers]
    for e in losers:
        text = str(e)
        assert "\n" not in text and "resource_classes.small.max_instances is 5" in text and "live" in text, text
    assert watch.samples > 0 and watch.max_ec2 <= 5 and watch.max_rows <= 5, (watch.max_ec2, watch.max_rows)
    assert len(pool_instance_ids(pool.config)) == 5
    assert ceilings.read(pool.config, [ceilings.class_sk("small")])[ceilings.class_sk("small")].live == 5
    for r in winners:
        assert release(pool, r).ok
    invariants.check(pool, emu)


def test_a_provision_past_the_pool_ceiling_is_exit_2_with_one_line_and_launches_nothing(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(max_instances=3, resource_classes={"small": SMALL, "large": LARGE})
    first = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert first.ok, first.reason
    fleets = emu.count("ec2.CreateFleet")
    got = run_cli("provision", "--pool", pool.name, "--run-id", rid(), "--resource-class", "large", "--count", "2")
    assert got.returncode == 2, got.stderr
    errors = [line for line in got.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: pool {pool.name} is at its ceiling: max_instances is 3, 2 live, 2 more would pass it "
                      "(release a run, wait for idle runners to expire, or raise max_instances)"], got.stderr
    assert emu.count("ec2.CreateFleet") == fleets and len(pool_instance_ids(pool.config)) == 2
    # What the pool can serve without launching still goes: the released runners fit under any ceiling.
    assert release(pool, first.run_id).ok
    warm_run = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert warm_run.ok and warm_run.from_pool == 2
    assert release(pool, warm_run.run_id).ok
    invariants.check(pool, emu)


def test_reconcile_corrects_a_ceiling_counter_left_off_by_a_dead_process(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes={"small": {**SMALL, "max_instances": 4}})
    run = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert run.ok
    ceilings.reserve(pool.config, "small", 2)         # a provision that died right after its reservation
    key = ceilings.class_sk("small")
    assert ceilings.read(pool.config, [key])[key].live == 4
    refused = run_cli("provision", "--pool", pool.name, "--run-id", rid(), "--resource-class", "small")
    assert refused.returncode == 2 and "4 live" in refused.stderr
    soon = reconcile(pool)                             # the counter just moved: it may still be in flight
    assert soon.ceilings == {} and ceilings.read(pool.config, [key])[key].live == 4
    settled = reconcile(pool, clock=AheadClock(ceilings.SETTLE_S + 10))
    assert settled.ceilings[key] == [4, 2] and settled.ceilings[ceilings.POOL_SK] == [4, 2]
    assert ceilings.read(pool.config, [key])[key].live == 2
    fits = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert fits.ok, fits.reason
    assert release(pool, run.run_id).ok and release(pool, fits.run_id).ok
    invariants.check(pool, emu)


# ------------------------------------------------------------------ cost tags

def test_a_claimed_instance_carries_the_runs_cost_tags_and_loses_them_on_release(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = run_cli("provision", "--pool", pool.name, "--run-id", (run_a := rid()), "--resource-class", "small",
                "--tag", "repository=octo-org/octo-repo", "--tag", "team=platform", "--json")
    assert a.returncode == 0, a.stderr
    iid = json.loads(a.stdout)["instances"][0]["id"]
    tags = tags_of(pool, iid)                                           # created: tagged at launch
    assert tags["runner-pool:run-id"] == run_a and tags["repository"] == "octo-org/octo-repo"
    assert tags["team"] == "platform" and "workflow" not in tags and tags["runner-pool:pool"] == pool.name

    assert run_cli("release", "--pool", pool.name, "--run-id", run_a).returncode == 0
    tags = tags_of(pool, iid)
    assert not {"runner-pool:run-id", "repository", "team"} & set(tags), tags
    assert tags["runner-pool:pool"] == pool.name and tags["runner-pool:class"] == "small"

    b = provision(pool, ProvisionRequest(run_b := rid(), "small", 1, tags={"team": "infra", "workflow": "ci"}))
    assert b.ok and b.instance_ids == [iid] and b.from_pool == 1         # claimed: tagged at commit
    tags = tags_of(pool, iid)
    assert tags["runner-pool:run-id"] == run_b and tags["team"] == "infra" and tags["workflow"] == "ci"
    assert "repository" not in tags
    assert release(pool, run_b).ok
    assert not {"runner-pool:run-id", "team", "workflow"} & set(tags_of(pool, iid))

    fleets = emu.count("ec2.CreateFleet")
    bad = run_cli("provision", "--pool", pool.name, "--run-id", rid(), "--resource-class", "small",
                  "--tag", "cost-center=42")
    assert bad.returncode == 2
    assert [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: tag 'cost-center' is not a run tag key of pool {pool.name} "
        "(use one of the pool's run_tag_keys: repository, workflow, team)"]
    assert emu.count("ec2.CreateFleet") == fleets and rows_by_state(pool) == {"idle": [iid]}
    invariants.check(pool, emu)


# ------------------------------------------------------------------ status

def test_status_shows_each_class_with_its_states_minimum_ceiling_and_hit_rate(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(max_instances=6, resource_classes={"small": {**SMALL, "min_idle": 1, "max_instances": 4},
                                                        "large": LARGE})
    assert refresh(pool.config).ok                                       # one warm small runner
    run = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert run.ok and (run.from_pool, run.created) == (1, 1)

    got = run_cli("status", "--pool", pool.name, "--json")
    assert got.returncode == 0, got.stderr
    st = json.loads(got.stdout)
    small, large = st["classes"]["small"], st["classes"]["large"]
    assert small["by_state"]["running"] == 2 and small["by_state"]["idle"] == 0
    assert set(small["by_state"]) == {s.value for s in State if s is not State.TERMINATED}
    assert (small["min_idle"], small["min_idle_now"], small["max_instances"], small["live"]) == (1, 1, 4, 2)
    assert small["hit_rate"] == 0.5 and small["hit_rate_provisions"] == 1
    assert small["interruptions_last_hour"] == 0
    assert large["live"] == 0 and large["hit_rate"] is None and large["max_instances"] is None
    assert st["max_instances"] == 6 and st["live"] == 2 and st["counted"] == 2

    text = run_cli("status", "--pool", pool.name)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"pool {pool.name}: 2 running; 2 live of max_instances 6"
    header = lines[1].split()
    assert header[:1] == ["class"] and "idle" in header and "running" in header and "min" in header
    row = next(ln.split() for ln in lines if ln.strip().startswith("small"))
    col = {h: row[i] for i, h in enumerate(header[: header.index("min") + 2])}
    assert col["running"] == "2" and col["idle"] == "0" and col["min"] == "1" and col["max"] == "2/4"
    assert row[header.index("interrupted")] == "0" and "50%" in row     # "interrupted 1h": none
    assert release(pool, run.run_id).ok
    invariants.check(pool, emu)
