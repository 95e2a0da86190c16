"""Benchmark: cold provision, and what the control plane adds beyond the instances.

A cold provision waits for EC2 and for every new instance to boot and
register its runner; that part belongs to the instance. What belongs to the
control plane is everything else, and the figure this script reports is the
part of it that the user waits for *after* the slowest instance registered:

    overhead = provision returned (wall clock) - latest ``registered`` signal

which is the time validation needs to see the last signal (its poll
interval) plus the commit of the whole set. Target: under one heartbeat
interval. The instance side (launch to registered, as each agent's row tells
it) and the creation phase (CreateFleet plus the row writes) are reported
alongside, and the total.

Every repeat uses a fresh pool, so every instance is created. The
simulator's boot and registration delays are zero: the instance side is
just the real agent's start and the runner stand-in.

    PYTHONPATH=. python bench/cold_provision.py [--count 10] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h


def one(loc: h.Local, count: int) -> dict[str, float]:
    from controlplane import store
    from controlplane.provision import ProvisionRequest, provision

    pool = loc.pool()
    loc.behaviour(match={"pool": pool.name}, boot_delay_s=0, registration="ok", registration_delay_s=0)
    started = time.time()
    res = provision(pool, ProvisionRequest(h.run_id("cold"), "small", count))
    returned = time.time()
    if not res.ok or res.created != count:
        raise SystemExit(f"cold provision failed: {res.reason}")
    agents = [agent for _, agent in store.read_set(pool, res.instance_ids).values()]
    registered = [a.signal_at for a in agents if a is not None and a.registered_for(res.run_id)]
    if len(registered) != count or any(t is None for t in registered):
        raise SystemExit(f"only {len(registered)} of {count} agents show registered")
    last = max(t for t in registered if t is not None)
    records = {r.instance_id: r for r in store.run_records(pool, res.run_id)}
    launched = min(r.launched_at for r in records.values())
    loc.destroy_pools()
    return {"total_s": res.timings["total"], "creation_s": res.timings["creation"],
            "validation_s": res.timings["validation"], "commit_s": res.timings["commit"],
            "instance_side_s": last - launched, "overhead_after_last_registration_s": returned - last,
            "provision_start_to_launch_s": launched - started}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    samples: list[dict[str, float]] = []
    with h.local_default() as loc:
        for i in range(args.repeats):
            samples.append(one(loc, args.count))
            print(f"  repeat {i + 1}/{args.repeats}: total {samples[-1]['total_s']:.2f} s, overhead "
                  f"{samples[-1]['overhead_after_last_registration_s']:.2f} s", file=sys.stderr)
    heartbeat_s = h.BENCH_TIMINGS["heartbeat_interval_s"]
    result: dict[str, Any] = {k: h.summary([s[k] for s in samples]) for k in samples[0]}
    result["heartbeat_interval_s"] = heartbeat_s
    result["overhead_over_heartbeat_interval"] = round(
        result["overhead_after_last_registration_s"]["median"] / heartbeat_s, 2)
    path = h.write_result("cold_provision", {"count": args.count, "repeats": args.repeats, "result": result})
    rows = [[k, f"{v['median']:.3f}", f"{v['p95']:.3f}"] for k, v in result.items() if isinstance(v, dict)]
    print(h.table([f"cold provision of {args.count} (s)", "median", "p95"], rows))
    print(f"\noverhead after the last registration: {result['overhead_over_heartbeat_interval']} "
          f"heartbeat intervals ({heartbeat_s} s)")
    print(f"results: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
