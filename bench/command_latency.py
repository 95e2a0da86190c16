"""Benchmark: `runner-pool provision` and `release` as commands, wall time from process start.

What a workflow step pays is the whole command: the Python process starting,
its imports, reading the pool, the AWS and GitHub calls, and exiting. This
script runs the real commands (``python -c 'from controlplane.cli import
main; ...'``, which is what the ``runner-pool`` console script does) against
the embedded default and times each one from just before the process is
spawned until it exits. It also notes when each command first connects to the
AWS endpoint (an audit hook on ``socket.connect``, which needs no import and
works on any version of the code), so "start-up before the first AWS call"
is measured from outside too.

Per run of the script, in one embedded default, for each ``--mode``:

* a pool of ``max(--sizes)`` idle runners (one cold provision, then a
  release, in-process), ``--untimed`` provision and release pairs of the
  smallest N that are not measured (the first commands after the warm-up
  meet its aftermath), then for each N: ``--repeats`` times `provision
  --count N` from that pool followed by `release` of that run (the release's
  wall time is "until every runner is claimable again": release requeues
  every runner before it exits);
* ``--repeats`` cold provisions of ``--cold`` runners, each on a fresh pool
  (destroyed afterwards), so the warm/cold ratio is taken inside one run.

Modes: ``relabel`` (the default pool: a warm hit relabels the listening
runner), ``reregister`` (the same pool with ``fresh_registration: true``:
every run registers its runners anew) and ``plain`` (no pool option at all:
for measuring a tree that predates the option, such as main before issue 15).

It counts, per warm runner, the control plane's DynamoDB+SQS calls (the
command's ``--json`` ``api_calls``) and its GitHub REST calls (the stand-in's
request counts; the runners' own pings to the runner service are not REST
calls and are left out).

    PYTHONPATH=. python bench/command_latency.py [--modes relabel,reregister] [--sizes 1,10,50]
        [--cold 10] [--repeats 5] [--untimed 2] [--heartbeat-stale-s 8] [--out command_latency]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

# Runs the CLI exactly as the console script does, after installing an audit hook that notes the
# first connect to each port (stderr line "@@connect <port> <epoch>"). No import happens before
# the CLI's own, so the start-up measured is the CLI's.
WRAPPER = (
    "import sys, time\n"
    "seen = set()\n"
    "def hook(event, args):\n"
    "    if event == 'socket.connect' and isinstance(args[1], tuple) and len(args[1]) >= 2:\n"
    "        port = args[1][1]\n"
    "        if port not in seen:\n"
    "            seen.add(port)\n"
    "            sys.stderr.write('@@connect %s %.6f\\n' % (port, time.time()))\n"
    "sys.addaudithook(hook)\n"
    "from controlplane.cli import entry\n"
    "entry()\n"
)
COMMAND_TIMEOUT_S = 600


def run_command(args: list[str], aws_port: int) -> dict[str, Any]:
    """One command; its wall time, time to the first AWS connect, exit code and --json output."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, env=dict(os.environ))
    wall = time.time() - t0
    first_aws = None
    for line in proc.stderr.splitlines():
        if line.startswith("@@connect "):
            _, port, at = line.split()
            if int(port) == aws_port and first_aws is None:
                first_aws = float(at) - t0
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        out = {}
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.splitlines()[-5:])
        raise SystemExit(f"{' '.join(args[:1])} exited {proc.returncode}: {tail}")
    return {"wall_s": wall, "first_aws_s": first_aws, "json": out}


def github_rest_calls(loc: h.Local) -> int:
    counts = loc.call(f"{loc.github}/_control/state")["requests"]
    return sum(n for k, n in counts.items() if k.split(" ", 1)[-1].startswith(("/repos/", "/orgs/")))


def region_args(pool: Any) -> list[str]:
    return ["--pool", pool.name, "--region", pool.region, "--json"]


def measure_mode(loc: h.Local, mode: str, sizes: list[int], cold: int, repeats: int,
                 stale_s: int, untimed: int = 0) -> dict[str, Any]:
    overrides: dict[str, Any] = {"fresh_registration": True} if mode == "reregister" else (
        {"fresh_registration": False} if mode == "relabel" else {})
    overrides["heartbeat_stale_s"] = stale_s
    aws_port = urlsplit(loc.aws).port or 80
    pool = loc.pool(**overrides)
    loc.behaviour(match={"pool": pool.name}, registration="ok", registration_delay_s=0)
    h.warm_up(pool, max(sizes))
    for _ in range(untimed):        # not measured: the first commands after the warm-up ran slower
        run = h.run_id("untimed")
        run_command(["provision", *region_args(pool), "--run-id", run, "--resource-class", "small",
                     "--count", str(min(sizes))], aws_port)
        run_command(["release", *region_args(pool), "--run-id", run], aws_port)
    out: dict[str, Any] = {"warm": {}, "cold": {}}
    for n in sizes:
        walls, firsts, releases, release_firsts, totals, ddb_sqs, gh_calls, kept = [], [], [], [], [], [], [], []
        for i in range(repeats):
            run = h.run_id(f"w{n}")
            gh_before = github_rest_calls(loc)
            p = run_command(["provision", *region_args(pool), "--run-id", run, "--resource-class", "small",
                             "--count", str(n)], aws_port)
            gh_calls.append((github_rest_calls(loc) - gh_before) / n)
            res = p["json"]
            if not res.get("ok") or res.get("from_pool") != n:
                raise SystemExit(f"{mode} N={n} repeat {i}: not a warm provision: {res.get('reason')} "
                                 f"from_pool={res.get('from_pool')} created={res.get('created')}")
            walls.append(p["wall_s"])
            firsts.append(p["first_aws_s"] or 0.0)
            totals.append(res["timings"]["total"])
            calls = res.get("api_calls", {})
            ddb_sqs.append((calls.get("dynamodb", 0) + calls.get("sqs", 0)) / n)
            kept.append(res.get("relabelled", 0))
            r = run_command(["release", *region_args(pool), "--run-id", run], aws_port)
            if len(r["json"].get("returned_to_pool", [])) != n:
                raise SystemExit(f"{mode} N={n} repeat {i}: release returned "
                                 f"{len(r['json'].get('returned_to_pool', []))} of {n}")
            releases.append(r["wall_s"])
            release_firsts.append(r["first_aws_s"] or 0.0)
            print(f"  {mode} N={n:<3} {i + 1}/{repeats}: provision {p['wall_s']:.2f} s "
                  f"(first AWS call {p['first_aws_s'] or 0:.2f} s), release {r['wall_s']:.2f} s", file=sys.stderr)
        out["warm"][str(n)] = {
            "provision_wall_s": h.summary(walls), "provision_first_aws_call_s": h.summary(firsts),
            "provision_in_process_s": h.summary(totals), "release_wall_s": h.summary(releases),
            "release_first_aws_call_s": h.summary(release_firsts),
            "dynamodb_sqs_calls_per_runner": h.summary(ddb_sqs), "github_calls_per_runner": h.summary(gh_calls),
            "relabelled_per_provision": h.summary([float(k) for k in kept]),
        }
    walls, firsts = [], []
    for i in range(repeats):
        fresh = loc.pool(**overrides)
        loc.behaviour(match={"pool": fresh.name}, registration="ok", registration_delay_s=0)
        p = run_command(["provision", *region_args(fresh), "--run-id", h.run_id("cold"), "--resource-class",
                         "small", "--count", str(cold)], aws_port)
        if not p["json"].get("ok") or p["json"].get("created") != cold:
            raise SystemExit(f"{mode} cold repeat {i}: {p['json'].get('reason')}")
        walls.append(p["wall_s"])
        firsts.append(p["first_aws_s"] or 0.0)
        print(f"  {mode} cold N={cold} {i + 1}/{repeats}: {p['wall_s']:.2f} s", file=sys.stderr)
        from controlplane.apply import destroy_pool
        from controlplane.github import github_client_from_env

        cfg = loc.pools.pop()
        destroy_pool(cfg, github_client_from_env(cfg.github.api_url, cfg.github.scope))
    out["cold"][str(cold)] = {"provision_wall_s": h.summary(walls), "provision_first_aws_call_s": h.summary(firsts)}
    lo, hi = str(min(sizes)), str(max(sizes))
    warm_med = {k: v["provision_wall_s"]["median"] for k, v in out["warm"].items()}
    out["ratios"] = {
        f"warm{hi}/warm{lo}": round(warm_med[hi] / max(warm_med[lo], 1e-9), 2),
        **({f"warm{cold}/cold{cold}": round(warm_med[str(cold)] / max(out['cold'][str(cold)]
                                                                       ['provision_wall_s']['median'], 1e-9), 3)}
           if str(cold) in warm_med else {}),
    }
    return out


def report(result: dict[str, Any]) -> str:
    rows = []
    for mode, r in result.items():
        for n, w in r["warm"].items():
            rows.append([mode, f"warm {n}", f"{w['provision_wall_s']['median']:.2f} / {w['provision_wall_s']['p95']:.2f}",
                         f"{w['provision_first_aws_call_s']['median']:.2f}",
                         f"{w['release_wall_s']['median']:.2f} / {w['release_wall_s']['p95']:.2f}",
                         f"{w['dynamodb_sqs_calls_per_runner']['median']:.2f}",
                         f"{w['github_calls_per_runner']['median']:.2f}"])
        for n, c in r["cold"].items():
            rows.append([mode, f"cold {n}", f"{c['provision_wall_s']['median']:.2f} / {c['provision_wall_s']['p95']:.2f}",
                         f"{c['provision_first_aws_call_s']['median']:.2f}", "", "", ""])
    text = h.table(["mode", "provision", "wall median / p95 s", "first AWS call s", "release wall median / p95 s",
                    "DynamoDB+SQS calls / runner", "GitHub calls / runner"], rows)
    for mode, r in result.items():
        text += f"\n{mode}: " + ", ".join(f"{k} = {v}" for k, v in r["ratios"].items())
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="relabel,reregister")
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="command_latency")
    ap.add_argument("--untimed", type=int, default=2, help="provision/release pairs run before measuring")
    ap.add_argument("--heartbeat-stale-s", type=int, default=h.BENCH_TIMINGS["heartbeat_stale_s"],
                    help="the pools' heartbeat_stale_s (raise it on a loaded machine: 60 agents share 2 cores)")
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    modes = [m for m in args.modes.split(",") if m]
    result: dict[str, Any] = {}
    with h.local_default() as loc:
        for mode in modes:
            result[mode] = measure_mode(loc, mode, sizes, args.cold, args.repeats, args.heartbeat_stale_s,
                                        args.untimed)
            loc.destroy_pools()
    path = h.write_result(args.out, {"sizes": sizes, "cold": args.cold, "repeats": args.repeats, "untimed": args.untimed,
                                     "heartbeat_stale_s": args.heartbeat_stale_s, "load_before": os.getloadavg(),
                                     "result": result})
    print(report(result))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
