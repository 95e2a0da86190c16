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
from typing import Any

from controlplane import store
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.records import State
from controlplane.release import release
from tests.conftest import Emu
from tests.reliability.invariants import check

RUNS, PER_RUN, POOL = 20, 3, 30
# 60 agents share two cores with the emulator and the rest of the suite: a 1 s heartbeat judged
# stale at 4 s starves; these are the product defaults' ratio, and still far inside the timeouts.
TIMINGS = {"heartbeat_interval_s": 2, "heartbeat_stale_s": 15, "validation_timeout_s": 240,
           "claim_timeout_s": 600, "deregistration_timeout_s": 60}


def test_twenty_concurrent_runs_share_a_pool_of_thirty_without_a_double_claim(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**TIMINGS)
    warm = provision(pool, ProvisionRequest(f"warm-{uuid.uuid4().hex[:6]}", "small", POOL))
    assert warm.ok, warm.reason
    assert sorted(release(pool, warm.run_id).returned_to_pool) == sorted(warm.instance_ids)

    barrier = threading.Barrier(RUNS)
    results: list[ProvisionResult] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        res = provision(pool, ProvisionRequest(f"race-{uuid.uuid4().hex[:8]}", "small", PER_RUN))
        with lock:
            results.append(res)

    threads = [threading.Thread(target=one) for _ in range(RUNS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert len(results) == RUNS, "a provision did not return"
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
    online = Counter(lb["name"] for g in emu.runners() if g["status"] == "online" for lb in g["labels"])
    assert all(online[r.label] == PER_RUN for r in results), "a run does not see exactly its 3 runners"
    check(pool, emu)
    for r in results:
        assert release(pool, r.run_id).ok
    check(pool, emu)
