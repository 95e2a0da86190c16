"""``runner-pool demo``: the whole product on the embedded default, then clean up.

Phases: start the local emulator, GitHub stand-in and instance simulator;
apply a pool (two resource classes, three subnets) with the same functions
the Pulumi resources call; provision a run of 3 from a cold pool; run a
stand-in job on its runners; release; provision a second run (served from
the pool); release; refresh and reconcile; show a rollback (one instance set
never to register); stop everything and check nothing is left running.
Every phase ends with a one-line result; the demo ends with a table (or one
JSON document) and exits 0 only if every phase did what it should.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPECTED_PHASES = 11
DEMO_TIMINGS = {"heartbeat_interval_s": 2, "heartbeat_stale_s": 8, "validation_timeout_s": 60,
                "deregistration_timeout_s": 30}


@dataclass
class Phase:
    name: str
    ok: bool
    seconds: float
    result: str
    data: dict[str, Any] = field(default_factory=dict)


class Demo:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.phases: list[Phase] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, name: str, fn: Any) -> Any:
        self.say(f"== {name}")
        t = time.monotonic()
        try:
            ok, result, data, value = fn()
        except Exception as exc:  # noqa: BLE001 - a failed phase is reported, then the demo cleans up
            ok, result, data, value = False, f"{type(exc).__name__}: {exc}", {}, None
        p = Phase(name, ok, round(time.monotonic() - t, 2), result, data)
        self.phases.append(p)
        self.say(f"   {'ok' if ok else 'FAILED'}: {result} ({p.seconds:.1f} s)")
        return value


def _post(url: str, body: Any) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def run_demo(json_output: bool = False, state_dir: Path | None = None) -> int:
    from controlplane import store
    from controlplane.apply import apply_pool, destroy_pool, pool_instance_ids
    from controlplane.config import load_config, with_env_overrides
    from controlplane.github import github_client_for
    from controlplane.local import control
    from controlplane.logs import Progress
    from controlplane.provision import ProvisionRequest, provision
    from controlplane.refresh import refresh
    from controlplane.release import release

    out = sys.stderr if json_output else sys.stdout
    demo = Demo(out)
    progress = Progress(True, out)
    own_dir = state_dir is None
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="runner-pool-demo-"))
    saved_env = dict(os.environ)
    runs: list[dict[str, Any]] = []
    ctx: dict[str, Any] = {}

    def start() -> Any:
        state, _ = control.start(state_dir)
        os.environ.update(control.env_vars(state))
        ctx["state"] = state
        return True, f"AWS emulator {state['aws_url']}, GitHub stand-in {state['github_url']}", {}, True

    def apply() -> Any:
        example = Path(__file__).resolve().parents[1] / "examples" / "pool.yaml"
        cfg = with_env_overrides(load_config(example))
        cfg = cfg.model_copy(update={"name": "demo", **DEMO_TIMINGS})
        res = apply_pool(cfg, progress=progress)
        ctx["cfg"] = cfg
        ctx["pool"] = store.load_pool(cfg.name, cfg.region)
        return True, (f"pool demo: {len(res.queues)} classes ({', '.join(sorted(res.queues))}), "
                      f"{len(cfg.subnets)} subnets, launch template v{res.launch_template_version}"), res.to_dict(), None

    def prov(run_id: str, n: int, expect_source: str | None) -> Any:
        def fn() -> Any:
            res = provision(ctx["pool"], ProvisionRequest(run_id, "small", n), progress=progress)
            d = res.to_dict()
            runs.append(d)
            ok = res.ok and (expect_source is None or {m.source for m in res.instances} == {expect_source})
            return ok, (f"{len(res.instances)} runner(s) for {run_id}: {res.from_pool} from the pool, "
                        f"{res.created} created" if res.ok else res.reason), d, res
        return fn

    def job(run_id: str, ids: list[str]) -> Any:
        def fn() -> Any:
            gh = json.loads(urllib.request.urlopen(f"{ctx['state']['github_url']}/_control/state", timeout=10).read())
            online = [r for r in gh["runners"] if r["status"] == "online"
                      and run_id in [lb["name"] for lb in r["labels"]]]
            picked = sorted({r["name"].rsplit("-", 1)[0] for r in online})
            ok = picked == sorted(ids)
            return ok, f"stand-in job found {len(online)} online runner(s) labelled {run_id}: {', '.join(picked)}", {}, None
        return fn

    def rel(run_id: str, expect_back: int) -> Any:
        def fn() -> Any:
            res = release(ctx["pool"], run_id, progress=progress)
            ok = len(res.returned_to_pool) == expect_back and not res.failed
            return ok, res.summary(), res.to_dict(), res
        return fn

    def do_refresh() -> Any:
        res = refresh(ctx["cfg"], progress=progress)
        drift = len(res.reconcile.actions) if res.reconcile else 0
        return res.ok, f"template v{res.launch_template_version}, tokens fresh, {drift} drift(s) found", \
            res.to_dict(), res

    def rollback() -> Any:
        _post(f"{ctx['state']['aws_url']}/_emulator/sim/behaviour",
              {"match": {"pool": "demo"}, "count": 1, "registration": "fail"})
        res = provision(ctx["pool"], ProvisionRequest("demo-run-3", "small", 4), progress=progress)
        d = res.to_dict()
        runs.append(d)
        ok = not res.ok and bool(res.cleanup.terminated) and not res.cleanup.failed
        return ok, (f"rolled back as it should: {res.reason}; {len(res.cleanup.returned_to_pool)} back to the "
                    f"pool, {len(res.cleanup.terminated)} terminated"), d, res

    def stop() -> Any:
        cfg = ctx.get("cfg")
        left = 0
        if cfg is not None:
            gh = github_client_for(cfg.github)
            destroy_pool(cfg, gh)
            left = len(pool_instance_ids(cfg))
        res = control.stop(state_dir)
        gone = control.read_state(state_dir) is None and not control._stray_agents(state_dir)
        return gone and left == 0, f"pool destroyed, emulator stopped, {left} instance(s) and no process left", res, None

    try:
        if demo.run("start the embedded default", start):
            demo.run("apply pool (2 resource classes, 3 subnets)", apply)
            first = demo.run("provision run 1: 3 runners from a cold pool", prov("demo-run-1", 3, "created"))
            if first is not None and first.ok:
                demo.run("stand-in job on run 1", job("demo-run-1", first.instance_ids))
                demo.run("release run 1", rel("demo-run-1", 3))
                second = demo.run("provision run 2: 3 runners, served from the pool", prov("demo-run-2", 3, "pool"))
                if second is not None and second.ok:
                    demo.run("stand-in job on run 2", job("demo-run-2", second.instance_ids))
                    demo.run("release run 2", rel("demo-run-2", 3))
            demo.run("refresh and reconcile", do_refresh)
            demo.run("rollback: 4 runners, one set never to register", rollback)
    finally:
        demo.run("stop everything", stop)
        os.environ.clear()
        os.environ.update(saved_env)
        if own_dir:
            import shutil

            shutil.rmtree(state_dir, ignore_errors=True)

    ok = all(p.ok for p in demo.phases) and len(demo.phases) == EXPECTED_PHASES
    hits = sum(r["from_pool"] for r in runs if r["ok"])
    total = sum(r["from_pool"] + r["created"] for r in runs if r["ok"])
    report = {
        "ok": ok,
        "phases": [p.__dict__ for p in demo.phases],
        "runs": [{"run_id": r["run_id"], "ok": r["ok"], "sources": [i["source"] for i in r["instances"]],
                  "timings": r["timings"], "api_calls_per_runner": r["api_calls_per_runner"],
                  "reason": r["reason"]} for r in runs],
        "pool_hit_rate": round(hits / total, 3) if total else 0.0,
    }
    if json_output:
        print(json.dumps(report))
    else:
        print(render_table(report))
    return 0 if ok else 1


def render_table(report: dict[str, Any]) -> str:
    lines = ["", f"{'run':<12} {'ok':<4} {'sources':<28} {'select':>7} {'create':>7} {'validate':>9} "
             f"{'commit':>7} {'total':>7} {'calls/runner':>13}"]
    for r in report["runs"]:
        t = r["timings"]
        src = ",".join(sorted(set(r["sources"]))) + f" x{len(r['sources'])}" if r["sources"] else "-"
        lines.append(f"{r['run_id']:<12} {'yes' if r['ok'] else 'no':<4} {src:<28} "
                     + " ".join(f"{t.get(k, 0):>{w}.2f}" for k, w in (("selection", 7), ("creation", 7),
                                                                       ("validation", 9), ("commit", 7), ("total", 7)))
                     + f" {r['api_calls_per_runner']:>13}")
    lines.append(f"pool hit rate (successful runs): {report['pool_hit_rate']:.0%}")
    lines.append("demo " + ("passed: every phase did what it should" if report["ok"] else
                            "FAILED: " + ", ".join(p["name"] for p in report["phases"] if not p["ok"])))
    return "\n".join(lines)
