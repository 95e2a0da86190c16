"""Benchmark: 20 concurrent provisions of 3 runners against a warm pool of 30.

Many workflow runs start at once (a push to a monorepo, a matrix), and they
all race for the same idle runners. The claim is one conditional write, so
each idle runner must go to exactly one run; the runs that find the pool
empty create what they miss. Each round fills a fresh pool with ``--pool``
idle runners, starts ``--runs`` provisions of ``--per-run`` at the same
instant (threads released by a barrier, each provision with its own run id,
as separate workflow runs would be), and waits for all of them.

Per round it reports throughput (runners handed out per second of the
round's wall time), each provision's latency, how many runners came from the
pool, and **double claims**: an instance handed to two runs, or a row whose
run is not the one holding it (must be 0). Latencies are pooled over rounds
for the median and p95.

    PYTHONPATH=. python bench/contention.py [--runs 20] [--per-run 3] [--pool 30] [--rounds 3]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h


def double_claims(pool: Any, results: list[Any]) -> int:
    """Instances held by two successful runs, plus rows that name another run than their holder."""
    from controlplane import store

    held = Counter(i for r in results if r.ok for i in r.instance_ids)
    doubles = sum(n - 1 for n in held.values() if n > 1)
    for r in results:
        if r.ok:
            rows = {rec.instance_id: rec for rec in store.run_records(pool, r.run_id)}
            doubles += sum(1 for i in r.instance_ids if i not in rows or rows[i].run_id != r.run_id)
    return doubles


def one_round(loc: h.Local, runs: int, per_run: int, pool_size: int) -> dict[str, Any]:
    from controlplane.provision import ProvisionRequest, ProvisionResult, provision
    from controlplane.release import release

    pool = loc.pool()
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    h.warm_up(pool, pool_size)
    barrier = threading.Barrier(runs)
    results: list[ProvisionResult] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def run_one() -> None:
        barrier.wait()
        t = time.monotonic()
        res = provision(pool, ProvisionRequest(h.run_id("race"), "small", per_run))
        with lock:
            results.append(res)
            latencies.append(time.monotonic() - t)

    threads = [threading.Thread(target=run_one) for _ in range(runs)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.monotonic() - started
    ok = [r for r in results if r.ok]
    out = {"wall_s": round(wall, 3), "provisions": len(results), "succeeded": len(ok),
           "runners": sum(len(r.instances) for r in ok), "from_pool": sum(r.from_pool for r in ok),
           "created": sum(r.created for r in ok), "double_claims": double_claims(pool, results),
           "throughput_runners_per_s": round(sum(len(r.instances) for r in ok) / wall, 2),
           "latencies_s": [round(x, 3) for x in latencies],
           "failures": [r.reason for r in results if not r.ok]}
    for r in ok:
        release(pool, r.run_id)
    loc.destroy_pools()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--per-run", type=int, default=3)
    ap.add_argument("--pool", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    rounds = []
    with h.local_default() as loc:
        for i in range(args.rounds):
            rounds.append(one_round(loc, args.runs, args.per_run, args.pool))
            r = rounds[-1]
            print(f"  round {i + 1}/{args.rounds}: {r['succeeded']}/{r['provisions']} ok, {r['from_pool']} from "
                  f"the pool, {r['created']} created, {r['double_claims']} double claims, {r['wall_s']:.1f} s",
                  file=sys.stderr)
    lat = [x for r in rounds for x in r["latencies_s"]]
    result = {
        "rounds": rounds, "latency_s": h.summary(lat),
        "throughput_runners_per_s": h.summary([r["throughput_runners_per_s"] for r in rounds]),
        "double_claims": sum(r["double_claims"] for r in rounds),
        "failed_provisions": sum(r["provisions"] - r["succeeded"] for r in rounds),
        "from_pool_per_round": h.summary([float(r["from_pool"]) for r in rounds]),
    }
    path = h.write_result("contention", {**vars(args), "result": result})
    print(h.table(["metric", "value"], [
        ["provisions (ok / all)", f"{sum(r['succeeded'] for r in rounds)} / {sum(r['provisions'] for r in rounds)}"],
        ["latency median / p95 (s)", f"{result['latency_s']['median']:.2f} / {result['latency_s']['p95']:.2f}"],
        ["throughput, runners/s (median of rounds)", f"{result['throughput_runners_per_s']['median']:.2f}"],
        ["runners from the pool per round (median)", f"{result['from_pool_per_round']['median']:.0f} of {args.pool}"],
        ["double claims", result["double_claims"]],
    ]))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 1 if result["double_claims"] else 0


if __name__ == "__main__":
    sys.exit(main())
