"""Soak: provision and release in a loop; every instance accounted for, nothing leaks.

The 20-cycle soak runs in CI; ``--soak`` adds the 100-cycle one. Each cycle
provisions 3 runners and releases them; the report line gives the pool hit
rate, and the end state is checked against EC2 and the GitHub stand-in.
"""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from controlplane import store
from controlplane.apply import pool_instance_ids
from controlplane.provision import ProvisionRequest, provision
from controlplane.reconcile import reconcile
from controlplane.records import State
from controlplane.release import release
from tests.conftest import RELIABLE, Emu
from tests.reliability.invariants import check, online


def soak(pool: Any, emu: Emu, cycles: int, per_run: int = 3) -> dict[str, Any]:
    hits = total = 0
    seen: set[str] = set()
    runs: list[str] = []
    for c in range(cycles):
        run = f"soak-{c}-{uuid.uuid4().hex[:6]}"
        runs.append(run)
        res = provision(pool, ProvisionRequest(run, "small", per_run))
        assert res.ok, f"cycle {c}: {res.reason}"
        hits += res.from_pool
        total += len(res.instances)
        seen.update(res.instance_ids)
        rel = release(pool, run)
        assert sorted(rel.returned_to_pool + rel.terminated) == sorted(res.instance_ids), f"cycle {c}"
    rows = {r.instance_id: r for r in store.all_records(pool)}
    live = {i for i, r in rows.items() if r.state is not State.TERMINATED}
    running = set(pool_instance_ids(pool.config))
    assert seen <= set(rows), "an instance was used with no row"
    assert running == live, f"EC2 and table disagree: {running ^ live}"
    assert {rows[i].state for i in live} <= {State.IDLE}, "something is still held after its release"
    assert [run for run in runs if online(emu, run)] == [], "a runner is still online for a released run"
    drift = reconcile(pool)
    assert drift.actions == [], drift.summary()
    check(pool, emu)
    rate = hits / total
    print(f"\nsoak: {cycles} cycles x {per_run} runners, {len(seen)} distinct instances, pool hit rate {rate:.0%}")
    return {"hit_rate": rate, "instances": len(seen)}


def test_a_20_cycle_soak_accounts_for_every_instance_and_leaks_nothing(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE)
    out = soak(pool, emu, 20)
    assert out["instances"] == 3 and out["hit_rate"] >= 0.9      # only the first cycle creates


@pytest.mark.soak
def test_a_100_cycle_soak(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE, max_reuse=30)
    out = soak(pool, emu, 100)
    assert out["hit_rate"] >= 0.85
