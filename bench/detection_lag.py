"""Benchmark: how long the control plane takes to notice what an instance did.

Two lags, each measured against what the agent itself wrote in its row:

* **registration**: from the last instance's ``registered`` signal
  (``signal_at`` in its agent row) to validation's poll that saw the whole
  set ready (``ProvisionResult.validated_at``). Bounded by validation's poll
  interval plus one batched read.
* **heartbeat loss**: an instance whose registration hangs is frozen
  (SIGSTOP, so it stops heartbeating but its process and instance stay)
  during validation; the lag runs from its last heartbeat (``heartbeat_at``)
  to validation judging it unhealthy and failing the set. Bounded below by
  the pool's ``heartbeat_stale_s`` (the age at which a heartbeat counts as
  stopped), so the figure reported is the lag and the lag minus that
  threshold (what detection adds).

Each repeat of the heartbeat case is a cold provision of one instance on a
fresh pool (the behaviour rule that makes registration hang applies at
boot). The registration case uses warm provisions of ``--count``.

    PYTHONPATH=. python bench/detection_lag.py [--count 10] [--repeats 10]
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

FREEZE_TIMEOUT_S = 120


def registration_lags(loc: h.Local, count: int, repeats: int) -> list[float]:
    from controlplane import store
    from controlplane.provision import ProvisionRequest, provision
    from controlplane.release import release

    pool = loc.pool()
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    h.warm_up(pool, count)
    lags = []
    for i in range(repeats):
        res = provision(pool, ProvisionRequest(h.run_id("reg"), "small", count))
        if not res.ok or res.validated_at is None:
            raise SystemExit(f"warm provision failed: {res.reason}")
        agents = [a for _, a in store.read_set(pool, res.instance_ids).values()]
        last = max(a.signal_at or 0.0 for a in agents if a is not None and a.registered_for(res.run_id))
        lags.append(res.validated_at - last)
        release(pool, res.run_id)
        print(f"  registration repeat {i + 1}/{repeats}: {lags[-1]:.3f} s", file=sys.stderr)
    loc.destroy_pools()
    return lags


def heartbeat_lag(loc: h.Local) -> float:
    from controlplane import store
    from controlplane.clock import Deadline, wait_until
    from controlplane.provision import ProvisionRequest, ProvisionResult, provision

    pool = loc.pool(validation_timeout_s=FREEZE_TIMEOUT_S)
    loc.behaviour(match={"pool": pool.name}, registration="hang")
    rid = h.run_id("hb")
    out: list[ProvisionResult] = []
    worker = threading.Thread(target=lambda: out.append(provision(pool, ProvisionRequest(rid, "small", 1))))
    worker.start()

    def beating() -> str | None:
        rows = store.run_records(pool, rid)
        if not rows:
            return None
        _, agent = store.read_set(pool, [rows[0].instance_id])[rows[0].instance_id]
        return rows[0].instance_id if agent is not None and agent.heartbeat_at else None

    iid = wait_until(beating, Deadline(FREEZE_TIMEOUT_S), 0.1)
    if iid is None:
        raise SystemExit("the instance never heartbeat")
    loc.kill_agent(iid, signal.SIGSTOP)
    # Watch the row until validation gives up: the rollback deletes the agent row, so keep the
    # newest heartbeat seen (a frozen agent writes none after the freeze).
    last_beat = 0.0
    while worker.is_alive():
        _, agent = store.read_set(pool, [iid])[iid]
        if agent is not None and agent.heartbeat_at:
            last_beat = max(last_beat, agent.heartbeat_at)
        worker.join(0.05)
    res = out[0]
    if res.ok or "heartbeat stopped" not in res.reason or res.validated_at is None or not last_beat:
        raise SystemExit(f"expected a heartbeat failure, got ok={res.ok}: {res.reason}")
    loc.destroy_pools()            # the frozen agent gets SIGTERM, then SIGKILL, as its instance terminates
    return res.validated_at - last_beat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--heartbeat-repeats", type=int, default=5)
    args = ap.parse_args(argv)
    stale_s = h.BENCH_TIMINGS["heartbeat_stale_s"]
    with h.local_default() as loc:
        reg = registration_lags(loc, args.count, args.repeats)
        hb = []
        for i in range(args.heartbeat_repeats):
            hb.append(heartbeat_lag(loc))
            print(f"  heartbeat repeat {i + 1}/{args.heartbeat_repeats}: {hb[-1]:.2f} s", file=sys.stderr)
    from controlplane.provision.validation import POLL_INTERVAL_S

    result: dict[str, Any] = {
        "registration_to_seen_s": h.summary(reg),
        "heartbeat_stop_to_unhealthy_s": h.summary(hb),
        "heartbeat_stop_to_unhealthy_minus_stale_s": h.summary([x - stale_s for x in hb]),
        "heartbeat_stale_s": stale_s, "heartbeat_interval_s": h.BENCH_TIMINGS["heartbeat_interval_s"],
        "validation_poll_interval_s": POLL_INTERVAL_S,
    }
    path = h.write_result("detection_lag", {"count": args.count, "repeats": args.repeats,
                                            "heartbeat_repeats": args.heartbeat_repeats, "result": result})
    rows = [[k, f"{v['median']:.3f}", f"{v['p95']:.3f}", v["n"]] for k, v in result.items() if isinstance(v, dict)]
    print(h.table(["lag (s)", "median", "p95", "n"], rows))
    print(f"\nheartbeat_stale_s {stale_s}, validation poll every {POLL_INTERVAL_S} s")
    print(f"results: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
