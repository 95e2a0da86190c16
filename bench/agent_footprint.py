"""Benchmark: what an idle agent costs, and whether 50 of them keep their heartbeat.

Starts the embedded default in this process (AWS emulator, GitHub stand-in,
IMDS stand-in, simulator), launches ``--instances`` instances with one
CreateFleet call, writes their rows as ``idle`` (no run: the agents poll their
row every 0.5 s and heartbeat every ``--heartbeat`` s), waits until every
agent has signalled ``waiting``, then measures for ``--seconds``:

* CPU % per instance: utime+stime of every process of the instance (found by
  its ``RUNNER_POOL_HOME`` in ``/proc/<pid>/environ``) plus the time of
  children it already reaped (cutime+cstime), from ``/proc/<pid>/stat``;
* RSS per instance: the sum of ``VmRSS`` (``/proc/<pid>/status``) over the
  same processes, sampled every second;
* missed heartbeats: from the table, gaps between successive ``heartbeat_at``
  values (and from the last one to the end) longer than twice the interval.

Prints a markdown table and writes ``bench/results/agent_footprint.json``.
The emulator shares the host with the agents, so the CPU figures are an upper
bound for an agent alone on an instance.

    PYTHONPATH=. python bench/agent_footprint.py [--instances 50] [--seconds 60]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane import aws, launch_template, store, token  # noqa: E402
from controlplane.clock import Deadline, wait_until  # noqa: E402
from controlplane.config import PoolConfig  # noqa: E402
from controlplane.github import GitHubClient  # noqa: E402
from controlplane.local.emulator import REQUESTS, Emulator  # noqa: E402
from controlplane.local.github_standin import GitHubStandIn  # noqa: E402
from controlplane.local.imds import ImdsStandIn  # noqa: E402
from controlplane.local.simulator import Simulator  # noqa: E402
from controlplane.records import InstanceRecord, Signal, State  # noqa: E402
from controlplane.userdata import render_user_data  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BOOT_TIMEOUT_S = 300
RESULTS = ROOT / "bench" / "results" / "agent_footprint.json"


def cpu_ticks(pid: int, with_children: bool) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    ticks = int(fields[11]) + int(fields[12])              # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])         # cutime, cstime: children already reaped
    return ticks


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def instance_cpu(sim: Simulator, iid: str, agent_pid: int) -> int:
    """Ticks used so far by the instance: live processes, plus children the agent reaped."""
    return sum(cpu_ticks(p, with_children=(p == agent_pid)) for p in sim.pids(iid))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def fleet_request(cfg: PoolConfig, n: int) -> dict[str, Any]:
    """One CreateFleet: attribute-based requirements, one override per subnet, the pool tag."""
    req = {"VCpuCount": {"Min": 2, "Max": 2}, "MemoryMiB": {"Min": 4096}}
    return {
        "Type": "instant",
        "TargetCapacitySpecification": {"TotalTargetCapacity": n, "OnDemandTargetCapacity": n,
                                        "DefaultTargetCapacityType": "on-demand"},
        "LaunchTemplateConfigs": [{
            "LaunchTemplateSpecification": {"LaunchTemplateName": cfg.launch_template_name,
                                            "Version": "$Default"},
            "Overrides": [{"SubnetId": s, "InstanceRequirements": req} for s in cfg.subnets]}],
        "TagSpecifications": [{"ResourceType": "instance",
                               "Tags": [{"Key": "runner-pool:pool", "Value": cfg.name}]}],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--heartbeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    emu = Emulator().start()
    github = GitHubStandIn(pat="bench").start()
    imds = ImdsStandIn().start()
    os.environ.update({"AWS_ENDPOINT_URL": emu.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    work_dir = Path(tempfile.mkdtemp(prefix="agent-footprint-"))
    sim = Simulator(aws_endpoint=emu.url, work_dir=work_dir, imds=imds, github_url=github.url)
    try:
        ec2 = aws.client("ec2", "us-east-1")
        subnets = sorted(s["SubnetId"] for s in ec2.describe_subnets()["Subnets"] if s["DefaultForAz"])[:3]
        cfg = PoolConfig.model_validate({
            "name": "bench",
            "github": {"repository": "bench/footprint", "url": github.url, "api_url": github.url},
            "resource_classes": {"small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}}},
            "subnets": subnets, "ami": ec2.describe_images()["Images"][0]["ImageId"],
            "instance_profile": "bench", "heartbeat_interval_s": args.heartbeat,
            "heartbeat_stale_s": args.heartbeat * 3,
        })
        store.ensure_table(cfg)
        token.ensure_tokens(cfg, GitHubClient(api_url=github.url, token="bench", scope="bench/footprint"))
        launch_template.ensure(cfg)
        account, partition = aws.account_and_partition(cfg.region)
        pool = store.Pool(cfg, account, partition)
        sim.start()

        booted = time.monotonic()
        resp = ec2.create_fleet(**fleet_request(cfg, args.instances))
        ids = [i for e in resp["Instances"] for i in e["InstanceIds"]]
        now = time.time()
        for e in resp["Instances"]:
            for iid in e["InstanceIds"]:
                store.put_record(pool, InstanceRecord(
                    arn=pool.arn(iid), state=State.IDLE, threshold=now + 3600, resource_class="small",
                    instance_type=e["InstanceType"], usage_class="on-demand", subnet_id=subnets[0],
                    launched_at=now, updated_at=now))

        def all_waiting() -> bool:
            agents = store.read_set(pool, ids)
            return all(a is not None and a.signal == Signal.WAITING for _, a in agents.values())

        if not wait_until(all_waiting, Deadline(BOOT_TIMEOUT_S), 1.0):
            print("not every agent reached 'waiting' in time", file=sys.stderr)
            return 1
        boot_s = time.monotonic() - booted
        agent_pid = {s["instance_id"]: s["pid"] for s in sim.status()}

        REQUESTS.reset()
        start_ticks = {iid: instance_cpu(sim, iid, agent_pid[iid]) for iid in ids}
        t0 = time.monotonic()
        rss: dict[str, list[int]] = {iid: [] for iid in ids}
        beats: dict[str, list[float]] = {iid: [] for iid in ids}
        window_start = time.time()
        while time.monotonic() - t0 < args.seconds:
            for iid in ids:
                rss[iid].append(sum(rss_kib(p) for p in sim.pids(iid)))
            for iid, (_, agent) in store.read_set(pool, ids).items():
                beat = agent.heartbeat_at if agent is not None else None
                if beat and (not beats[iid] or beats[iid][-1] != beat):
                    beats[iid].append(beat)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
        elapsed = time.monotonic() - t0
        window_end = time.time()
        end_ticks = {iid: instance_cpu(sim, iid, agent_pid[iid]) for iid in ids}
        requests = REQUESTS.snapshot()

        cpu = {iid: 100.0 * (end_ticks[iid] - start_ticks[iid]) / CLK_TCK / elapsed for iid in ids}
        rss_mean = {iid: statistics.mean(v) / 1024 for iid, v in rss.items() if v}
        rss_max = {iid: max(v) / 1024 for iid, v in rss.items() if v}
        limit = 2 * args.heartbeat
        missed, worst_gap = 0, 0.0
        for ts in beats.values():
            points = [window_start, *ts, window_end]
            gaps = [b - a for a, b in itertools.pairwise(points)]
            missed += sum(1 for g in gaps if g > limit)
            worst_gap = max([worst_gap] + gaps[1:-1])
        counts = requests["counts"]
        result: dict[str, Any] = {
            "instances": len(ids), "seconds": round(elapsed, 1), "heartbeat_interval_s": args.heartbeat,
            "boot_to_all_waiting_s": round(boot_s, 1),
            "cpu_percent_per_agent": {"mean": round(statistics.mean(cpu.values()), 3),
                                      "p95": round(percentile(list(cpu.values()), 0.95), 3),
                                      "max": round(max(cpu.values()), 3)},
            "rss_mib_per_agent": {"mean": round(statistics.mean(rss_mean.values()), 1),
                                  "p95": round(percentile(list(rss_max.values()), 0.95), 1),
                                  "max": round(max(rss_max.values()), 1)},
            "heartbeats_seen": sum(len(v) for v in beats.values()),
            "missed_heartbeats": missed, "worst_heartbeat_gap_s": round(worst_gap, 2),
            "dynamodb_requests_per_s": {op: round(n / elapsed, 1) for op, n in sorted(counts.items())
                                        if op.startswith("dynamodb.")},
            "user_data_bytes": len(render_user_data(cfg).encode()),
            "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                     "machine": platform.machine()},
        }
    finally:
        sim.stop()
        imds.stop()
        github.stop()
        emu.stop()

    rows = [
        ("instances (idle agents)", result["instances"]),
        ("window", f"{result['seconds']} s, heartbeat every {args.heartbeat} s"),
        ("boot to all `waiting`", f"{result['boot_to_all_waiting_s']} s"),
        ("CPU per agent (mean / p95 / max)",
         "{mean} / {p95} / {max} %".format(**result["cpu_percent_per_agent"])),
        ("RSS per agent (mean / p95 / max)",
         "{mean} / {p95} / {max} MiB".format(**result["rss_mib_per_agent"])),
        ("heartbeats seen", result["heartbeats_seen"]),
        (f"missed heartbeats (gap > {limit} s)", result["missed_heartbeats"]),
        ("worst heartbeat gap", f"{result['worst_heartbeat_gap_s']} s"),
        ("DynamoDB requests/s (all agents)",
         ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in result["dynamodb_requests_per_s"].items())),
        ("user data", f"{result['user_data_bytes']} bytes"),
    ]
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if result["missed_heartbeats"] == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
