"""Benchmark: refresh and reconcile with 10,000 rows in the table: how long, and that nothing is missed.

Starts its own AWS emulator and GitHub stand-in in this process (no simulator: no agent
processes; see ``tests/reliability/scale_fixture.py`` for why and for the mix), builds the
local network, applies a pool, then plants ``--rows`` state rows backed by real EC2
instances in moto, in a known mix: healthy idle/running/draining/claimed/created rows,
terminated history, rows refresh must expire (idle, claimed, created, draining and running
past their threshold, idle past its lifetime), rows whose instance is gone, instances with
no row or a terminated row, runners with no instance, and another pool's runners.

Then, per round:

1. **acting pass**: ``refresh`` (without its reconcile step) then ``reconcile``, each timed
   and counted (AWS calls by operation from :class:`controlplane.aws.CallCounter`, GitHub
   requests from the stand-in), and checked item by item against the plan: every planted
   drift item acted on exactly as expected, nothing else;
2. ``--repeat`` **quiet passes** of both: they must find nothing (median and p95 reported);
3. one scheduled ``refresh`` with its reconcile, as the workflow runs it;
4. the end state item by item (healthy rows byte-for-byte as planted), then the reliability
   suite's invariants (``tests/reliability/invariants.check``).

``--rounds`` > 1 resets the emulator and plants again, for a median of the acting pass.
The emulator (moto behind one lock) and the control plane share this process and its GIL
on the machine measured, so times are those of the embedded default, not of AWS: the
breakdown row says which part is moto answering DescribeInstances.

    PYTHONPATH=. .venv/bin/python bench/scale.py --rows 10000 [--repeat 5] [--rounds 1] [--batch 50]

Prints a markdown table and writes ``bench/results/scale.json``; exits 2 if anything was
missed or touched that should not have been.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane import aws, store  # noqa: E402
from controlplane.apply import apply_pool  # noqa: E402
from controlplane.reconcile import reconcile, snapshot  # noqa: E402
from controlplane.refresh import refresh  # noqa: E402
from tests.reliability import invariants  # noqa: E402
from tests.reliability.scale_fixture import (  # noqa: E402
    KINDS,
    World,
    ahead_clock,
    check_end_state,
    check_reconcile,
    check_refresh,
    expected_actions,
    expected_expired,
    local_world,
    plant,
    pool_config,
)

RESULTS = ROOT / "bench" / "results" / "scale.json"
T = TypeVar("T")


def p95(xs: list[float]) -> float:
    """Nearest-rank p95: with fewer than 20 samples it is the maximum."""
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 2), "p95": round(p95(xs), 2), "n": len(xs)}


def timed(world: World, fn: Callable[[], T]) -> tuple[T, float, dict[str, int], dict[str, int]]:
    """Run ``fn``: its result, wall seconds, AWS calls by operation, GitHub requests by endpoint."""
    before = Counter(world.github.state()["requests"])
    with aws.counted() as counter:
        started = time.perf_counter()
        try:
            out = fn()
        finally:
            elapsed = time.perf_counter() - started
    github = Counter(world.github.state()["requests"])
    github.subtract(before)
    calls = dict(sorted(counter.snapshot().items()))
    return out, elapsed, calls, {k: n for k, n in sorted(github.items()) if n}


def acted_on(p: Any, refreshed: Any, reconciled: Any) -> dict[str, dict[str, int]]:
    """Per kind: how many planted, how many the plan says must be acted on, how many were."""
    expired = {iid for ids in refreshed.expired.values() for iid in ids}
    fixed = {(a.kind, a.target) for a in reconciled.applied}
    want_exp = {iid for ids in expected_expired(p).values() for iid in ids}
    want_fix = expected_actions(p)
    out = {}
    for k in KINDS:
        ids = p.ids[k.name]
        keys = [(k.reconcile, iid) for iid in ids] if k.reconcile else []
        runners = [("delete_runner", str(r)) for r in p.runners.get(k.name, {}).values()]
        want = (sum(i in want_exp for i in ids) + sum(x in want_fix for x in keys)
                + sum(x in want_fix for x in runners))
        done = (sum(i in expired for i in ids) + sum(x in fixed for x in keys)
                + sum(x in fixed for x in runners))
        out[k.name] = {"planted": len(ids), "must_act": want, "acted": done}
    return out


def one_round(world: World, rows: int, repeat: int, batch: int, name: str, breakdown: bool) -> dict[str, Any]:
    gh = world.client
    clock = ahead_clock()
    cfg = pool_config(world, name)
    apply_pool(cfg, github=gh)
    pool = store.load_pool(cfg.name, cfg.region)
    planted, plant_s, plant_calls, _ = timed(world, lambda: plant(pool, world, rows, batch=batch,
                                                                  clock=clock))
    problems: list[str] = []
    print(f"[{name}] planted {planted.rows_total} rows, {planted.instances_total} instances "
          f"({planted.reservations} reservations), "
          f"{sum(len(v) for v in planted.runners.values())} runners in {plant_s:.1f} s", file=sys.stderr)

    ref, ref_s, ref_calls, ref_gh = timed(world, lambda: refresh(cfg, github=gh, clock=clock,
                                                                 run_reconcile=False))
    problems += check_refresh(planted, ref)
    rec, rec_s, rec_calls, rec_gh = timed(world, lambda: reconcile(pool, github=gh, clock=clock))
    problems += check_reconcile(planted, rec)
    print(f"[{name}] acting pass: refresh {ref_s:.1f} s, reconcile {rec_s:.1f} s", file=sys.stderr)

    quiet: dict[str, list[float]] = {"refresh": [], "reconcile": []}
    quiet_calls: dict[str, dict[str, int]] = {}
    for _ in range(repeat):
        r2, s, calls, _ = timed(world, lambda: refresh(cfg, github=gh, clock=clock, run_reconcile=False))
        problems += check_refresh(planted, r2, acting=False)
        quiet["refresh"].append(s)
        quiet_calls["refresh"] = calls
        c2, s, calls, gh_calls = timed(world, lambda: reconcile(pool, github=gh, clock=clock))
        problems += check_reconcile(planted, c2, acting=False)
        quiet["reconcile"].append(s)
        quiet_calls["reconcile"] = {**calls, **{f"github {k}": n for k, n in gh_calls.items()}}
    full, full_s, full_calls, _ = timed(world, lambda: refresh(cfg, github=gh, clock=clock))
    problems += check_refresh(planted, full, acting=False)
    if full.reconcile is not None:
        problems += check_reconcile(planted, full.reconcile, acting=False)

    end, counts = check_end_state(planted, world)
    problems += end
    try:
        invariants.check(pool, world, settle_s=0)
    except AssertionError as exc:
        problems.append(f"invariants: {exc}")

    out: dict[str, Any] = {
        "pool": name, "rows": planted.rows_total, "instances_launched": planted.instances_total,
        "reservations": planted.reservations,
        "runners_planted": sum(len(v) for v in planted.runners.values()),
        "plant_s": round(plant_s, 1), "plant_calls": plant_calls,
        "acting": {
            "refresh_s": round(ref_s, 2), "reconcile_s": round(rec_s, 2),
            "refresh_calls": ref_calls, "refresh_github": ref_gh,
            "reconcile_calls": rec_calls, "reconcile_github": rec_gh,
            "refresh_expired": {k: len(v) for k, v in sorted(ref.expired.items())},
            "reconcile_checked": rec.checked, "reconcile_found": rec.by_kind(rec.actions),
            "reconcile_fixed": rec.by_kind(rec.applied),
        },
        "quiet": {k: stats(v) for k, v in quiet.items()}, "quiet_samples_s": quiet,
        "quiet_calls": quiet_calls,
        "scheduled_refresh_s": round(full_s, 2), "scheduled_refresh_calls": full_calls,
        "by_kind": acted_on(planted, ref, rec),
        "end_state": counts, "problems": problems,
    }
    if breakdown:
        _, rows_s, rows_calls, _ = timed(world, lambda: store.all_records(pool))
        _, runners_s, _, _ = timed(world, lambda: gh.list_runners())
        _, snap_s, snap_calls, _ = timed(world, lambda: snapshot(pool, gh, clock))
        out["reconcile_breakdown_s"] = {
            "snapshot": round(snap_s, 2), "table_scan": round(rows_s, 2), "github_list": round(runners_s, 2),
            "ec2_describe": round(snap_s - rows_s - runners_s, 2),
            "scan_pages": rows_calls.get("dynamodb.Scan", 0),
            "describe_pages": snap_calls.get("ec2.DescribeInstances", 0)}
    return out


def fmt_calls(calls: dict[str, int]) -> str:
    return ", ".join(f"{k.split('.', 1)[-1]} {n}" for k, n in sorted(calls.items(), key=lambda kv: -kv[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000, help="state rows to plant")
    ap.add_argument("--repeat", type=int, default=5, help="quiet passes of refresh and reconcile per round")
    ap.add_argument("--rounds", type=int, default=1, help="plant-and-act rounds (emulator reset between)")
    ap.add_argument("--batch", type=int, default=50, help="instances per RunInstances (one reservation)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("RUNNER_POOL_LOG_LEVEL", "WARNING")

    started = time.time()
    rounds = []
    with local_world() as world:
        for r in range(args.rounds):
            if r:
                world.reset()
            rounds.append(one_round(world, args.rows, args.repeat, args.batch, f"scale{r}",
                                    breakdown=(r == 0)))
    first = rounds[0]
    load = os.getloadavg()
    result: dict[str, Any] = {
        "command": "PYTHONPATH=. .venv/bin/python bench/scale.py " + " ".join(sys.argv[1:]),
        "rows": args.rows, "repeat": args.repeat, "rounds": args.rounds, "batch": args.batch,
        "acting": {"refresh_s": stats([x["acting"]["refresh_s"] for x in rounds]),
                   "reconcile_s": stats([x["acting"]["reconcile_s"] for x in rounds])},
        "quiet": {k: stats([s for x in rounds for s in x["quiet_samples_s"][k]])
                  for k in ("refresh", "reconcile")},
        "missed_or_wrong": sum(len(x["problems"]) for x in rounds),
        "rounds_detail": rounds,
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 "loadavg_at_end": [round(v, 2) for v in load]},
        "wall_s": round(time.time() - started, 1),
    }

    a, q = result["acting"], result["quiet"]
    print(f"\n{first['rows']} rows, {first['instances_launched']} instances in {first['reservations']} "
          f"reservations, {first['runners_planted']} runners; planted in {first['plant_s']} s\n")
    print("| pass | refresh (no reconcile) | reconcile |\n|---|---|---|")
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']} / {s['p95']} s"

    print(f"| acting (median / p95 of {a['refresh_s']['n']}) | {cell(a['refresh_s'])} "
          f"| {cell(a['reconcile_s'])} |")
    print(f"| quiet (median / p95 of {q['refresh']['n']}) | {cell(q['refresh'])} | {cell(q['reconcile'])} |")
    print(f"| scheduled refresh incl. reconcile (quiet) | {first['scheduled_refresh_s']} s | |")
    print(f"| AWS calls, acting | {fmt_calls(first['acting']['refresh_calls'])} "
          f"| {fmt_calls(first['acting']['reconcile_calls'])} |")
    print(f"| GitHub requests, acting | {fmt_calls(first['acting']['refresh_github'])} "
          f"| {fmt_calls(first['acting']['reconcile_github'])} |")
    print(f"| AWS calls, quiet | {fmt_calls(first['quiet_calls']['refresh'])} "
          f"| {fmt_calls(first['quiet_calls']['reconcile'])} |")
    if "reconcile_breakdown_s" in first:
        b = first["reconcile_breakdown_s"]
        print(f"| reconcile snapshot, quiet | | {b['snapshot']} s: table scan {b['table_scan']} s "
              f"({b['scan_pages']} pages), EC2 {b['ec2_describe']} s ({b['describe_pages']} pages), "
              f"GitHub {b['github_list']} s |")
    print("\n| kind | planted | must be acted on | acted on |\n|---|---|---|---|")
    for name, c in first["by_kind"].items():
        print(f"| {name} | {c['planted']} | {c['must_act']} | {c['acted']} |")
    print(f"\nmissed or wrong: {result['missed_or_wrong']}")
    for x in rounds:
        for prob in x["problems"]:
            print(f"  [{x['pool']}] {prob}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if result["missed_or_wrong"] == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
