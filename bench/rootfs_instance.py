"""Benchmark: what a rootfs instance costs beside a process instance, and how many fit on this machine.

One command:

    PYTHONPATH=. python bench/rootfs_instance.py [--instances 4] [--seconds 30] [--cold-build]

1. **The root.** With ``--cold-build`` it times a first build of the Debian
   root (debootstrap + the package cache, from Debian's registry) into a
   scratch cache directory; it always times the warm start (finding the
   cached root) and reports the cached root's size.
2. **Boot to registered.** On the embedded default (``runner-pool local
   start``), one pool per kind; each provisions ``--instances`` runners
   cold, in one run. Per instance: seconds from the simulator's boot (the
   instance left ``booting``) to the agent's ``registered`` signal, and the
   CPU seconds the instance spent getting there (its live processes and every
   child they reaped: for rootfs apt, dpkg and useradd are among them).
3. **Idle footprint.** With every runner registered and idle for
   ``--seconds``: CPU % (utime+stime deltas of the instance's processes),
   memory (PSS from ``/proc/<pid>/smaps_rollup``, so pages shared between
   instances -- the root's python3 and libraries -- are split fairly, and
   RSS), and disk (the instance's writable layer; for the process kind its
   home directory).
4. **How many fit** on this machine: free memory / PSS, free disk / layer,
   and what the boot's CPU seconds mean for starting many at once on 2
   cores.

Prints a markdown table and writes ``bench/results/rootfs_instance.json``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._harness import local_default, median, run_id, summary, table, write_result  # noqa: E402
from controlplane import store  # noqa: E402
from controlplane.local import rootfs  # noqa: E402
from controlplane.local.simulator import processes_of  # noqa: E402
from controlplane.logs import QUIET  # noqa: E402
from controlplane.provision import ProvisionRequest, provision  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def ticks(pid: int, children: bool = False) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)


def pss_rss_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def du_kib(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sk", "-x", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out.strip() else 0


def pids_of(machine: dict[str, Any]) -> list[int]:
    home = Path(machine["home"])
    if machine.get("kind") == "rootfs":
        return rootfs.processes_rooted_below(home / "root")
    return processes_of(home)


def measure_kind(loc: Any, kind: str, n: int, seconds: float) -> dict[str, Any]:
    pool = loc.pool()
    loc.behaviour(match={"pool": pool.config.name}, kind=kind)
    started = time.monotonic()
    res = provision(pool, ProvisionRequest(run_id(f"bench-{kind}"), "small", n), QUIET)
    if not res.ok:
        raise SystemExit(f"{kind}: provision of {n} failed: {res.reason}")
    wall = time.monotonic() - started
    status = {m["instance_id"]: m for m in loc.sim_status()}
    agents = store.read_set(pool, res.instance_ids)
    boot_to_registered = [float(agents[i][1].signal_at) - float(status[i]["started_at"])   # type: ignore[union-attr]
                          for i in res.instance_ids]
    # CPU seconds so far: every live process of the instance with the children it reaped (apt, dpkg,
    # useradd... were reaped by the bootstrap, which then became the agent), so nothing counts twice.
    boot_cpu = [sum(ticks(p, children=True) for p in pids_of(status[i])) / CLK_TCK for i in res.instance_ids]
    before = {i: sum(ticks(p) for p in pids_of(status[i])) for i in res.instance_ids}
    time.sleep(seconds)
    cpu, pss, rss, procs, disk = [], [], [], [], []
    for i in res.instance_ids:
        pids = pids_of(status[i])
        cpu.append(100.0 * (sum(ticks(p) for p in pids) - before[i]) / CLK_TCK / seconds)
        mem = [pss_rss_kib(p) for p in pids]
        pss.append(sum(m[0] for m in mem) / 1024)
        rss.append(sum(m[1] for m in mem) / 1024)
        procs.append(len(pids))
        home = Path(status[i]["home"])
        disk.append(du_kib(home / "layer" / "upper" if kind == "rootfs" else home) / 1024)
    return {"kind": kind, "instances": n, "provision_wall_s": round(wall, 1),
            "boot_to_registered_s": summary(boot_to_registered), "boot_cpu_s": summary(boot_cpu),
            "idle_cpu_pct": summary(cpu), "pss_mib": summary(pss), "rss_mib": summary(rss),
            "processes": summary([float(p) for p in procs]), "disk_mib": summary(disk)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--cold-build", action="store_true", help="also time a first build of the root (network)")
    args = ap.parse_args()
    why = rootfs.available()
    if why:
        raise SystemExit(f"rootfs instances cannot run here: {why}")

    build: dict[str, Any] = {}
    if args.cold_build:
        scratch = Path(tempfile.mkdtemp(prefix="rootfs-cold-"))
        saved = os.environ.get("RUNNER_POOL_ROOTFS_CACHE")
        os.environ["RUNNER_POOL_ROOTFS_CACHE"] = str(scratch)
        try:
            t = time.monotonic()
            rootfs.build_root(lambda m: print(m, flush=True))
            build["cold_build_s"] = round(time.monotonic() - t, 1)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if saved is None:
                os.environ.pop("RUNNER_POOL_ROOTFS_CACHE", None)
            else:
                os.environ["RUNNER_POOL_ROOTFS_CACHE"] = saved
    path, built = rootfs.build_root(lambda m: print(m, flush=True))
    t = time.monotonic()
    rootfs.build_root(lambda m: None)
    build.update({"warm_start_s": round(time.monotonic() - t, 4), "root": str(path), "built_now": built,
                  "root_mib": du_kib(path) // 1024, "package_cache_mib": du_kib(path / rootfs.DEB_DIR.lstrip("/")) // 1024})

    kinds = []
    with local_default() as loc:
        for kind in ("process", "rootfs"):
            print(f"{kind}: provisioning {args.instances} cold, then {args.seconds:.0f} s idle", flush=True)
            kinds.append(measure_kind(loc, kind, args.instances, args.seconds))
    with open("/proc/meminfo") as fh:
        avail_mib = next(int(x.split()[1]) for x in fh if x.startswith("MemAvailable")) / 1024
    free_disk_mib = shutil.disk_usage(rootfs.cache_dir()).free / 2**20
    fit = {}
    for k in kinds:
        by_mem = avail_mib / max(0.1, k["pss_mib"]["median"])
        by_disk = free_disk_mib / max(0.1, k["disk_mib"]["median"])
        by_cpu = 200.0 / max(0.01, k["idle_cpu_pct"]["median"])
        fit[k["kind"]] = {"by_memory": int(by_mem), "by_disk": int(by_disk), "by_idle_cpu": int(by_cpu),
                          "boots_per_minute_on_2_cores": round(120.0 / max(0.01, k["boot_cpu_s"]["median"]), 1)}
    rows = [[k["kind"], k["boot_to_registered_s"]["median"], k["boot_to_registered_s"]["max"],
             round(k["boot_cpu_s"]["median"], 2), round(k["idle_cpu_pct"]["median"], 2),
             round(k["pss_mib"]["median"], 1), round(k["rss_mib"]["median"], 1), round(k["disk_mib"]["median"], 1),
             int(k["processes"]["median"]), fit[k["kind"]]["by_memory"], fit[k["kind"]]["boots_per_minute_on_2_cores"]]
            for k in kinds]
    print(table(["kind", "boot→registered median s", "max s", "boot CPU s", "idle CPU %", "PSS MiB", "RSS MiB",
                 "disk MiB", "processes", "fit by memory", "boots/min (2 cores)"], rows))
    print(f"root: {build}")
    out = write_result("rootfs_instance", {"build": build, "kinds": kinds, "fit": fit,
                                           "mem_available_mib": round(avail_mib), "disk_free_mib": round(free_disk_mib),
                                           "median_ratio_boot": round(median([kinds[1]["boot_to_registered_s"]["median"]])
                                                                      / max(0.001, kinds[0]["boot_to_registered_s"]["median"]), 1)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
