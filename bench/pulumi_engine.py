"""Benchmark: what the Pulumi engine costs on top of a warm provision of 3.

In one run on the embedded default, one pool with 3 idle runners (one cold
provision, then a release), alternating ``--repeats`` times:

* ``pulumi up`` of a run stack of 3 (``poolName`` + ``region``; the real CLI
  built by ``.ci/build-pulumi``, the program served inline by
  ``tests/engine/inline.py``, a file backend), then ``pulumi destroy`` (not
  timed in the split);
* ``runner-pool provision --count 3`` as a command (``python -m controlplane``),
  then ``runner-pool release``.

``pulumi up`` end to end (process start to exit) is split into: **CLI start**
(the wrapper's start until the engine asks the program to run: Python and
CLI start-up, backend, stack and config load, plugins), **program** (the
program's body: config, validation, registrations), **RunnerFleet create**
(the provision inside the provider host, its ``provision.done`` line's
``duration_s``), and **rest** (what is left), itself split into the part
while the program waits for its registrations (provider host start, Check,
the engine's bookkeeping around the create) and the part after the program
returned (checkpoint, summary, CLI exit). Beside it: the
CLI command's wall time and the provision's own ``duration_s``.

    PYTHONPATH=. python bench/pulumi_engine.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

COUNT = 3


def provision_duration(text: str) -> float:
    """``duration_s`` of the ``provision.done`` JSON line (the provider host's log, in pulumi's output)."""
    for line in text.splitlines():
        m = re.search(r'(\{"ts".*"provision\.done".*\})', line)
        if m:
            return float(json.loads(m.group(1))["duration_s"])
    raise SystemExit(f"no provision.done line in:\n{text[-3000:]}")


def marks(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["mark"]] = rec["t"]
    return out


def pulumi_round(project: Any, pool: Any, i: int, tmp: Path) -> dict[str, float]:
    name = f"run-bench-{i}"
    rid = h.run_id("pulumi")
    project.new_stack(name, {"kind": "run", "poolName": pool.name, "region": pool.region, "runId": rid,
                             "resourceClass": "small", "count": COUNT})
    timing = tmp / f"timing-{i}.jsonl"
    env = {**project.env, "RUNNER_POOL_INLINE_TIMING": str(timing), "RUNNER_POOL_LOG_LEVEL": "INFO",
           "RUNNER_POOL_LOG_FORMAT": "json"}
    t0 = time.time()
    res = subprocess.run(project.command("up", "--yes", "--skip-preview", stack=name), cwd=project.dir, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    t1 = time.time()
    if res.returncode != 0:
        raise SystemExit(f"pulumi up failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}")
    m = marks(timing)
    end_to_end = t1 - t0
    cli_start = m["program_start"] - t0
    program = m["program_end"] - m["program_start"]
    create = provision_duration(res.stdout + res.stderr)
    waiting = m["run_end"] - m["program_end"]          # provider host start, Check, the create, outputs
    after = t1 - m["run_end"]                          # the engine finishing: checkpoint, summary, exit
    out = project.outputs(name)
    assert len(out["instanceIds"]) == COUNT, out
    t2 = time.time()
    project.pulumi("destroy", "--yes", "--skip-preview", "--remove", stack=name)
    destroy = time.time() - t2
    return {"end_to_end": end_to_end, "cli_start": cli_start, "program": program, "fleet_create": create,
            "host_and_engine_during_create": waiting - create, "after_program": after,
            "rest": end_to_end - cli_start - program - create, "destroy": destroy}


def cli_round(pool: Any) -> dict[str, float]:
    rid = h.run_id("cli")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "controlplane", "provision", "--pool", pool.name, "--region",
                          pool.region, "--run-id", rid, "--resource-class", "small", "--count", str(COUNT),
                          "--json"], capture_output=True, text=True, timeout=600, check=False, cwd=h.ROOT)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"runner-pool provision failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    doc = json.loads(res.stdout)
    t1 = time.time()
    rel = subprocess.run([sys.executable, "-m", "controlplane", "release", "--pool", pool.name, "--region",
                          pool.region, "--run-id", rid, "--json"], capture_output=True, text=True, timeout=600,
                         check=False, cwd=h.ROOT)
    if rel.returncode != 0:
        raise SystemExit(f"runner-pool release failed:\n{rel.stdout[-3000:]}")
    return {"wall": wall, "provision": float(doc["timings"]["total"]) if "timings" in doc
            else float(doc["duration_s"]), "release_wall": time.time() - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from tests.engine.inline import find_pulumi
    from tests.engine.project import Project

    if find_pulumi() is None:
        raise SystemExit("pulumi CLI not built: bash .ci/build-pulumi")
    with h.local_default() as loc:
        pool = loc.pool()
        h.warm_up(pool, COUNT)
        project = Project(Path(tempfile.mkdtemp(prefix="runner-pool-bench-pulumi-")))
        pulumi_rounds, cli_rounds = [], []
        for i in range(args.repeats):
            pulumi_rounds.append(pulumi_round(project, pool, i, project.tmp))
            cli_rounds.append(cli_round(pool))
            print(f"round {i + 1}/{args.repeats}: pulumi up {pulumi_rounds[-1]['end_to_end']:.2f} s, "
                  f"runner-pool provision {cli_rounds[-1]['wall']:.2f} s", file=sys.stderr)
    keys = ("end_to_end", "cli_start", "program", "fleet_create", "rest", "host_and_engine_during_create",
            "after_program", "destroy")
    payload = {
        "count": COUNT, "repeats": args.repeats, "cli_version": os.popen(f"{find_pulumi()} version").read().strip(),
        "pulumi_up": {k: h.summary([r[k] for r in pulumi_rounds]) for k in keys},
        "runner_pool_provision": {k: h.summary([r[k] for r in cli_rounds]) for k in ("wall", "provision",
                                                                                     "release_wall")},
        "rounds": {"pulumi": pulumi_rounds, "cli": cli_rounds},
    }
    path = h.write_result("pulumi_engine", payload)
    rows = [[k, payload["pulumi_up"][k]["median"], payload["pulumi_up"][k]["p95"]] for k in keys]
    rows += [[f"runner-pool provision: {k}", payload["runner_pool_provision"][k]["median"],
              payload["runner_pool_provision"][k]["p95"]] for k in ("wall", "provision", "release_wall")]
    print(h.table(["warm run of 3", "median s", "p95 s"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
