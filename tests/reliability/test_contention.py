"""Contention: 20 workflow runs start at once, 3 runners each, against a warm pool of 30.

Every idle runner must go to exactly one run (the claim is one conditional
write); the runs that find the pool empty create what they miss. The test
holds every provision to what its user would check: it got 3 registered
runners for its label, its rows name its run and no other run holds them,
and afterwards the pool's table, EC2 and GitHub agree (the invariant check).
The same scenario, timed, is ``bench/contention.py``.
"""
from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from controlplane import store
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.records import State
from controlplane.release import release
from tests.conftest import RELIABLE, Emu
from tests.reliability.invariants import check, online

RUNS, PER_RUN, POOL = 20, 3, 30
PROVISION_DEADLINE_S = 400     # for all twenty; each is bounded by its own validation timeout anyway


def test_twenty_concurrent_runs_share_a_pool_of_thirty_without_a_double_claim(make_pool: Any, emu: Emu) -> None:
    # Thirty agents and twenty provisions on a busy 2-core CI machine: an agent starved of CPU for 15 s
    # is no death here, and this test is about claims, not health (test_faults owns staleness).
    pool = make_pool(**{**RELIABLE, "heartbeat_stale_s": 60})
    warm = provision(pool, ProvisionRequest(f"warm-{uuid.uuid4().hex[:6]}", "small", POOL))
    assert warm.ok, warm.reason
    assert sorted(release(pool, warm.run_id).returned_to_pool) == sorted(warm.instance_ids)

    barrier = threading.Barrier(RUNS)

    def one() -> ProvisionResult:
        barrier.wait(PROVISION_DEADLINE_S)
        return provision(pool, ProvisionRequest(f"race-{uuid.uuid4().hex[:8]}", "small", PER_RUN))

    with ThreadPoolExecutor(RUNS) as runs:
        futures = [runs.submit(one) for _ in range(RUNS)]
        results = [f.result(timeout=PROVISION_DEADLINE_S) for f in futures]   # a provision's exception is raised here
    failed = [r.reason for r in results if not r.ok]
    assert not failed, failed
    held = Counter(i for r in results for i in r.instance_ids)
    assert [i for i, n in held.items() if n > 1] == [], "an instance was handed to two runs"
    from_pool = sum(r.from_pool for r in results)
    assert from_pool + sum(r.created for r in results) == RUNS * PER_RUN
    # Each warm runner went to exactly one run, or is still idle in the pool: none lost in the race.
    warm_rows = {i: rec for i, (rec, _) in store.read_set(pool, warm.instance_ids).items()}
    still_idle = [i for i, rec in warm_rows.items() if rec is not None and rec.state is State.IDLE]
    assert from_pool + len(still_idle) == POOL, (from_pool, still_idle)
    assert from_pool >= POOL // 2, f"only {from_pool} of {POOL} idle runners were used"
    for r in results:
        rows = store.run_records(pool, r.run_id)
        assert sorted(x.instance_id for x in rows) == sorted(r.instance_ids)
        assert {x.state for x in rows} == {State.RUNNING} and {x.run_id for x in rows} == {r.run_id}
    seen = {r.label: len(online(emu, r.label)) for r in results}
    assert all(n == PER_RUN for n in seen.values()), f"a run does not see exactly its {PER_RUN} runners: {seen}"
    check(pool, emu)
    for r in results:
        assert release(pool, r.run_id).ok
    check(pool, emu)
