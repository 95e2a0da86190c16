"""Benchmark: warm-pool provision latency for N = 1, 10, 50, split by phase.

A warm provision is the product's main promise: the runners wait idle in the
pool, a claim is one conditional write, and the run starts as soon as every
claimed agent has registered its runner for the run. This script fills one
pool with ``max(N)`` idle runners (one cold provision, then a release), then
for each N provisions N runners from the pool and releases them again,
``--repeats`` times, with the simulator's registration delay at zero.

Per N it reports the median and p95 of each phase as the orchestrator
measures it (selection: receive + claim + health check; creation: zero here;
validation: until every agent signalled ``registered`` for the run; commit:
the set to ``running``) and of the total, and the ratio of the N=max median
total to the N=1 one (latency should grow far slower than N). Validation is
split into the instances' side (validation's start to the last agent's
``registered`` signal, as the agents' rows tell it) and the control plane's
side (everything else: selection, seeing the last signal, commit). The
DynamoDB+SQS calls of each provision are counted per runner too.

    PYTHONPATH=. python bench/warm_provision.py [--sizes 1,10,50] [--repeats 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

PHASES = ("selection", "creation", "validation", "commit", "total")
# Validation is mostly the instances' own work: each agent notices its claim, runs config.sh and
# run.sh and signals. On EC2 every instance has its own CPU; here 50 share two cores with the
# emulator, so the split below tells the control plane's part from the instances' part.
SPLIT = ("instance_side", "control_plane")


def measure(loc: h.Local, sizes: list[int], repeats: int) -> dict[str, Any]:
    from controlplane import store
    from controlplane.provision import ProvisionRequest, provision
    from controlplane.release import release

    pool = loc.pool()
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    h.warm_up(pool, max(sizes))
    out: dict[str, Any] = {}
    for n in sizes:
        samples: dict[str, list[float]] = {p: [] for p in PHASES + SPLIT}
        calls: list[dict[str, int]] = []
        releases: list[float] = []
        for i in range(repeats):
            res = provision(pool, ProvisionRequest(h.run_id(f"warm{n}"), "small", n))
            if not res.ok or res.from_pool != n:
                raise SystemExit(f"N={n} repeat {i}: not a warm provision: ok={res.ok} "
                                 f"from_pool={res.from_pool} created={res.created} {res.reason}")
            for p in PHASES:
                samples[p].append(res.timings.get(p, 0.0))
            # instance side: from validation's start (all claims won) to the last agent's signal
            agents = [a for _, a in store.read_set(pool, res.instance_ids).values()]
            last_signal = max(a.signal_at or 0.0 for a in agents if a is not None)
            validation_start = (res.validated_at or 0.0) - res.timings["validation"]
            samples["instance_side"].append(max(0.0, last_signal - validation_start))
            samples["control_plane"].append(res.timings["total"] - samples["instance_side"][-1])
            calls.append(res.api_calls)
            rel = release(pool, res.run_id)
            if len(rel.returned_to_pool) != n:
                raise SystemExit(f"N={n} repeat {i}: release returned {len(rel.returned_to_pool)} of {n}")
            releases.append(rel.duration_s)
            print(f"  N={n:<3} repeat {i + 1}/{repeats}: {res.timings['total']:.2f} s", file=sys.stderr)
        per_runner = [(c.get("dynamodb", 0) + c.get("sqs", 0)) / n for c in calls]
        out[str(n)] = {"phases": {p: h.summary(samples[p]) for p in PHASES + SPLIT},
                       "release_s": h.summary(releases),
                       "dynamodb_sqs_calls_per_runner": h.summary(per_runner)}
    first, last = str(min(sizes)), str(max(sizes))
    out["ratio_total_median"] = {
        f"N={last}/N={first}": round(out[last]["phases"]["total"]["median"]
                                     / max(out[first]["phases"]["total"]["median"], 1e-9), 2),
        "control_plane": round(out[last]["phases"]["control_plane"]["median"]
                               / max(out[first]["phases"]["control_plane"]["median"], 1e-9), 2),
        "size_ratio": max(sizes) / min(sizes)}
    return out


def report(result: dict[str, Any], sizes: list[int]) -> str:
    rows = []
    for n in sizes:
        r = result[str(n)]
        rows.append([n] + [f"{r['phases'][p]['median']:.2f} / {r['phases'][p]['p95']:.2f}" for p in PHASES + SPLIT]
                    + [f"{r['dynamodb_sqs_calls_per_runner']['median']:.2f}", f"{r['release_s']['median']:.2f}"])
    ratio = result["ratio_total_median"]
    key = next(k for k in ratio if k.startswith("N="))
    return (h.table(["N"] + [f"{p} (median / p95 s)" for p in PHASES + SPLIT]
                    + ["DynamoDB+SQS calls / runner", "release median s"], rows)
            + f"\n\nmedian total {key}: {ratio[key]}, control plane alone: {ratio['control_plane']} "
              f"(N grew {ratio['size_ratio']:.0f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with h.local_default() as loc:
        result = measure(loc, sizes, args.repeats)
    path = h.write_result("warm_provision", {"sizes": sizes, "repeats": args.repeats, "result": result})
    print(report(result, sizes))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
