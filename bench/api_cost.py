"""Benchmark: AWS API calls per provisioned runner, and CreateFleet calls per provision.

Calls are what a control plane costs in AWS (and what it risks in
throttling), so they are counted where the control plane makes them: every
boto3 call of a provision or release goes through :mod:`controlplane.aws`,
which counts it by ``service.Operation`` (the agents' own calls are not in
these figures: they are each instance's business and appear in the agent
footprint benchmark).

Cases, each repeated ``--repeats`` times on the embedded default:

* **warm**: N runners all from the pool (target: at most 4 DynamoDB+SQS
  calls per runner at N=10);
* **cold**: N runners all created (one CreateFleet);
* **spot fallback**: N spot runners with no spot capacity (two CreateFleet
  calls: spot, then on-demand);
* the **release** of the warm runs.

    PYTHONPATH=. python bench/api_cost.py [--count 10] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h


def per_runner(calls: dict[str, int], n: int, services: tuple[str, ...] = ("dynamodb", "sqs")) -> float:
    return sum(v for k, v in calls.items() if k.split(".", 1)[0] in services) / n


def github_api_calls(loc: h.Local) -> int:
    """REST API requests the stand-in has served (the control plane's; runners use /_runner/*)."""
    reqs = loc.call(f"{loc.github}/_control/state")["requests"]
    return sum(v for k, v in reqs.items() if k.split(" ", 1)[-1].startswith(("/repos/", "/orgs/", "/app/")))


def case(loc: h.Local, kind: str, n: int, repeats: int) -> dict[str, Any]:
    from controlplane.provision import ProvisionRequest, provision
    from controlplane.release import release

    per: list[float] = []
    total_per: list[float] = []
    fleets: list[int] = []
    rel_per: list[float] = []
    gh_per: list[float] = []
    gh_rel_per: list[float] = []
    ops: Counter[str] = Counter()
    pool = loc.pool(spot_fallback=True)
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    if kind == "warm":
        h.warm_up(pool, n)
    for _ in range(repeats):
        if kind == "spot_fallback":
            loc.capacity(lifecycle="spot", available=0, count=1)
        gh_before = github_api_calls(loc)
        res = provision(pool, ProvisionRequest(h.run_id(kind), "small", n,
                                               "spot" if kind == "spot_fallback" else None))
        gh_per.append((github_api_calls(loc) - gh_before) / n)
        if not res.ok:
            raise SystemExit(f"{kind}: provision failed: {res.reason}")
        if kind == "warm" and res.from_pool != n or kind != "warm" and res.created != n:
            raise SystemExit(f"{kind}: {res.from_pool} from the pool, {res.created} created")
        per.append(per_runner(res.api_calls_by_op, n))
        total_per.append(sum(res.api_calls_by_op.values()) / n)
        fleets.append(res.fleet_calls)
        ops.update(res.api_calls_by_op)
        gh_before = github_api_calls(loc)
        rel = release(pool, res.run_id)
        gh_rel_per.append((github_api_calls(loc) - gh_before) / n)
        rel_per.append(sum(v for k, v in rel.api_calls.items() if k in ("dynamodb", "sqs")) / n)
        if kind != "warm":                          # keep every repeat cold: drop what was just returned
            loc.destroy_pools()
            pool = loc.pool(spot_fallback=True)
            loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
        print(f"  {kind} N={n}: {per[-1]:.2f} DynamoDB+SQS calls per runner, {fleets[-1]} CreateFleet",
              file=sys.stderr)
    loc.destroy_pools()
    return {"dynamodb_sqs_per_runner": h.summary(per), "all_calls_per_runner": h.summary(total_per),
            "create_fleet_per_provision": h.summary([float(f) for f in fleets]),
            "release_dynamodb_sqs_per_runner": h.summary(rel_per),
            "github_per_runner": h.summary(gh_per), "release_github_per_runner": h.summary(gh_rel_per),
            "calls_by_operation_per_provision": {k: round(v / repeats, 2) for k, v in sorted(ops.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with h.local_default() as loc:
        result = {kind: case(loc, kind, args.count, args.repeats) for kind in ("warm", "cold", "spot_fallback")}
    path = h.write_result("api_cost", {"count": args.count, "repeats": args.repeats, "result": result})
    rows = [[kind, f"{r['dynamodb_sqs_per_runner']['median']:.2f}", f"{r['all_calls_per_runner']['median']:.2f}",
             f"{r['create_fleet_per_provision']['median']:.0f}", f"{r['release_dynamodb_sqs_per_runner']['median']:.2f}",
             f"{r['github_per_runner']['median']:.2f}", f"{r['release_github_per_runner']['median']:.2f}"]
            for kind, r in result.items()]
    print(h.table([f"N={args.count}", "DynamoDB+SQS calls / runner", "all calls / runner",
                   "CreateFleet / provision", "release DynamoDB+SQS / runner", "GitHub API / runner",
                   "release GitHub API / runner"], rows))
    for kind, r in result.items():
        print(f"\n{kind}, calls per provision: " + ", ".join(
            f"{k} {v:g}" for k, v in r["calls_by_operation_per_provision"].items()))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
