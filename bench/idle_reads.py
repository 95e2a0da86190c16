"""Benchmark: DynamoDB reads an idle runner's agent makes, per instance per minute.

An idle agent reads its state row to learn what the control plane wants of
it. With re-registration it must notice a claim within a fraction of a second
(it then registers), so it polls every 0.5 s; with relabelling a claim needs
nothing of it, and it reads the row only as often as release and shutdown
require (``RP_RUN_POLL_S``, 5 s). This fills a pool of ``--instances``
runners (one cold provision, then a release: the real path to idle), lets
the agents settle, then counts the emulator's ``dynamodb.GetItem`` and
``dynamodb.UpdateItem`` requests over ``--seconds`` (nothing else runs: every
request of the window is an agent's) and divides by instances and minutes.

Modes as in ``bench/command_latency.py``: ``relabel``, ``reregister``
(``fresh_registration: true``), ``plain`` (no pool option: a tree before it).

    PYTHONPATH=. python bench/idle_reads.py [--modes relabel,reregister] [--instances 20] [--seconds 60]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

SETTLE_S = 10           # after the release: the last deregistrations and signals land


def measure_mode(loc: h.Local, mode: str, instances: int, seconds: float, stale_s: int) -> dict[str, Any]:
    overrides: dict[str, Any] = {"fresh_registration": True} if mode == "reregister" else (
        {"fresh_registration": False} if mode == "relabel" else {})
    # The product's heartbeat (5 s), so the writes are what a real pool pays too.
    pool = loc.pool(**overrides, heartbeat_interval_s=5, heartbeat_stale_s=max(stale_s, 15))
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    h.warm_up(pool, instances)
    time.sleep(SETTLE_S)
    before = loc.requests()["counts"]
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = loc.requests()["counts"]
    per = {op: (after.get(op, 0) - before.get(op, 0)) / instances / (elapsed / 60)
           for op in ("dynamodb.GetItem", "dynamodb.UpdateItem")}
    loc.destroy_pools()
    return {"instances": instances, "seconds": round(elapsed, 1),
            "getitem_per_instance_per_min": round(per["dynamodb.GetItem"], 1),
            "updateitem_per_instance_per_min": round(per["dynamodb.UpdateItem"], 1),
            "getitem_per_s_at_50": round(per["dynamodb.GetItem"] * 50 / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="relabel,reregister")
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--heartbeat-stale-s", type=int, default=30)
    ap.add_argument("--out", default="idle_reads")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {}
    with h.local_default() as loc:
        for mode in [m for m in args.modes.split(",") if m]:
            result[mode] = measure_mode(loc, mode, args.instances, args.seconds, args.heartbeat_stale_s)
            print(f"  {mode}: {result[mode]}", file=sys.stderr)
    path = h.write_result(args.out, {"result": result})
    rows = [[m, r["getitem_per_instance_per_min"], r["updateitem_per_instance_per_min"], r["getitem_per_s_at_50"]]
            for m, r in result.items()]
    print(h.table(["mode", "GetItem / idle instance / min", "UpdateItem / idle instance / min",
                   "GetItem / s at 50 idle"], rows))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
