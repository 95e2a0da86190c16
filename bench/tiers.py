"""Benchmark: claim-to-ready of one runner from each tier -- running idle, stopped, created.

Claim-to-ready is a provision's total: from the request to every runner
registered for the run and committed (what a workflow's provision job waits
for). Side by side, in one run of this script, ``--repeats`` times each:

* **running tier**: an idle runner waiting in the class's queue (claim, the
  agent registers);
* **stopped tier**: the same runner after refresh stopped it (claim the
  stopped row, one StartInstances, the instance boots, the per-boot script
  starts the agent, it registers);
* **creation**: an empty class (one CreateFleet, boot from the user data,
  the agent registers).

Each sample's validation phase is reported too (the instances' side: boot and
registration). On the embedded default a "boot" is a process start, so the
stopped tier's figure is a floor: on EC2, starting a stopped instance takes
tens of seconds of EC2's own (still well under a launch, which adds AMI and
volume provisioning).

    PYTHONPATH=. python bench/tiers.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

TIERS = ("running", "stopped", "created")
HALT_WAIT_S = 60.0


def measure(loc: h.Local, repeats: int) -> dict[str, Any]:
    from controlplane.clock import AheadClock
    from controlplane.provision import ProvisionRequest, provision
    from controlplane.refresh import refresh
    from controlplane.release import release

    small = {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "instance_types": ["c*", "m*"]}
    pool = loc.pool(resource_classes={"small": {**small, "stopped_time_s": 7200}, "cold": small})
    past_idle = AheadClock(h.BENCH_TIMINGS["idle_time_s"] + 30)
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    h.warm_up(pool, 1)
    samples: dict[str, dict[str, list[float]]] = {t: {"total": [], "validation": []} for t in TIERS}
    calls: dict[str, list[dict[str, int]]] = {t: [] for t in TIERS}

    def one(tier: str, cls: str, i: int) -> None:
        res = provision(pool, ProvisionRequest(h.run_id(f"{tier}{i}"), cls, 1))
        got = {"running": res.from_pool, "stopped": res.from_stopped, "created": res.created}[tier]
        if not res.ok or got != 1:
            raise SystemExit(f"{tier} repeat {i}: ok={res.ok} from_pool={res.from_pool} "
                             f"from_stopped={res.from_stopped} created={res.created} {res.reason}")
        samples[tier]["total"].append(res.timings["total"])
        samples[tier]["validation"].append(res.timings.get("validation", 0.0))
        calls[tier].append(res.api_calls_by_op)
        release(pool, res.run_id)
        print(f"  {tier:<8} repeat {i + 1}/{repeats}: {res.timings['total']:.2f} s", file=sys.stderr)

    for i in range(repeats):
        one("running", "small", i)
        parked = refresh(pool.config, clock=past_idle, run_reconcile=False)   # also ends the cold class's idle one
        if len(parked.stopped) != 1:
            raise SystemExit(f"repeat {i}: refresh stopped {parked.stopped}")
        wait_halted(loc, parked.stopped[0])
        one("stopped", "small", i)
        one("created", "cold", i)
    return {t: {"claim_to_ready_s": h.summary(samples[t]["total"]),
                "validation_s": h.summary(samples[t]["validation"]),
                "ec2_calls": _ec2_calls(calls[t][-1])} for t in TIERS}


def wait_halted(loc: h.Local, iid: str) -> None:
    """The stopped instance's processes are gone (what a stop means), so the start is a real boot."""
    deadline = time.monotonic() + HALT_WAIT_S
    while not any(m["instance_id"] == iid and m["phase"] == "halted" for m in loc.sim_status()):
        if time.monotonic() > deadline:
            raise SystemExit(f"{iid} did not stop within {HALT_WAIT_S:.0f} s")
        time.sleep(0.2)


def _ec2_calls(by_op: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(by_op.items()) if k.startswith("ec2.")}


def report(result: dict[str, Any]) -> str:
    rows = [[t, f"{result[t]['claim_to_ready_s']['median']:.2f} / {result[t]['claim_to_ready_s']['p95']:.2f}",
             f"{result[t]['validation_s']['median']:.2f}",
             ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in result[t]["ec2_calls"].items()) or "none"]
            for t in TIERS]
    return h.table(["tier", "claim-to-ready (median / p95 s)", "validation median s", "EC2 calls"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with h.local_default() as loc:
        result = measure(loc, args.repeats)
    path = h.write_result("tiers", {"repeats": args.repeats, "result": result})
    print(report(result))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
