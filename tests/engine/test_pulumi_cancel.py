"""A cancelled provision, as GitHub cancels it, then the example's release job: nothing is left.

GitHub cancels a step by sending SIGINT, then SIGTERM 7.5 s later, then
killing the process tree 2.5 s after that. This test runs the provision step
of ``examples/workflow.yml`` verbatim (it ``exec``s ``pulumi up``), sends
those signals while the RunnerFleet create waits for the runners to register,
and then runs the release job's ``run:`` steps verbatim, with GitHub's
``if:``/``continue-on-error`` semantics. What a user would check afterwards:
no instance of the pool carries the run (each is idle in the pool or
terminated), no runner of the run is on GitHub, the run stack is gone (so no
lock and nothing pending), and the release job succeeded.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import store
from controlplane.apply import pool_instance_ids
from controlplane.config import parse_config
from controlplane.records import LIVE_STATES, State
from tests.conftest import ROOT, Emu, pool_config_dict, wait_for
from tests.engine.project import Project, require_cli
from tests.reliability.invariants import online

pytestmark = [pytest.mark.cli, pytest.mark.timeout(900)]

WORKFLOW = ROOT / "examples" / "workflow.yml"
SIGTERM_AFTER_S = 7.5             # GitHub: SIGINT, 7.5 s, SIGTERM, 2.5 s, kill the tree
KILL_AFTER_S = 2.5
STEP_TIMEOUT_S = 300


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (whatever process group it put itself in), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants, as the runner ends a cancelled step."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def job_steps(job: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load(WORKFLOW.read_text())["jobs"][job]["steps"])


def run_step(step: dict[str, Any], project: Project, env: dict[str, str], log: Path,
             background: bool = False) -> Any:
    """One ``run:`` step as GitHub runs it: ``bash --noprofile --norc -eo pipefail``, in its directory."""
    script = log.with_suffix(".sh")
    script.write_text(step["run"])
    assert "${{" not in step["run"], f"step {step.get('name')!r}: expressions belong in env, not in the script"
    cwd = project.dir if step.get("working-directory") == "runner-pool" else project.tmp
    cmd = ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)]
    if background:
        out = open(log, "wb")
        try:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                         stdin=subprocess.DEVNULL, check=False)
    log.write_text(res.stdout + res.stderr)
    return res


@pytest.fixture
def pool_stack(local: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Project, dict[str, Any], str]]:
    require_cli()
    project = Project(tmp_path)
    pool = pool_config_dict(local, validation_timeout_s=120)
    name = f"pool-{pool['name']}"
    project.new_stack(name, {"kind": "pool", "pool": pool, "protect": False})
    project.pulumi("up", "--yes", "--skip-preview", stack=name)
    yield project, pool, name
    project.pulumi("destroy", "--yes", "--skip-preview", stack=name, check=False)


def test_a_cancelled_pulumi_up_then_the_example_release_job_leaves_nothing(
        pool_stack: tuple[Project, dict[str, Any], str], emu: Emu, tmp_path: Path) -> None:
    project, pool_dict, pool_name = pool_stack
    cfg = parse_config(pool_dict)
    rid = f"cancel-{uuid.uuid4().hex[:8]}"
    env = {**project.env, "POOL_STACK": f"organization/runner-pool/{pool_name}", "RUN_ID": rid,
           "RUN_STACK": f"run-{rid}", "GITHUB_OUTPUT": str(tmp_path / "github_output")}

    # Runners register 60 s late: the cancel lands while the create waits in validation.
    emu.behaviour(match={"pool": cfg.name}, registration="delay", registration_delay_s=60)
    (provision,) = [s for s in job_steps("provision") if s.get("id") == "up"]
    assert "exec pulumi up" in provision["run"], "the provision step must exec pulumi up so signals reach it"
    proc = run_step(provision, project, env, tmp_path / "provision.log", background=True)
    pool = wait_for(lambda: store.load_pool(cfg.name, cfg.region), "the pool")
    wait_for(lambda: [r for r in store.run_records(pool, rid) if r.state in LIVE_STATES],
             f"run {rid} to have instances in validation", timeout_s=180)
    assert proc.poll() is None, (tmp_path / "provision.log").read_text()

    # The step's tree now: pulumi's provider host must not survive as an orphan that cleans up
    # after itself: the runner kills the whole tree, so the release job must do the cleaning.
    tree = descendants(proc.pid)
    assert any(b"pulumi.dynamic" in Path(f"/proc/{p}/cmdline").read_bytes() for p in tree if Path(f"/proc/{p}").exists())
    proc.send_signal(signal.SIGINT)
    time.sleep(SIGTERM_AFTER_S)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    time.sleep(KILL_AFTER_S)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_tree(proc.pid)                              # the runner kills the step's whole tree
    proc.wait(30)
    emu.clear_faults()
    provision_log = (tmp_path / "provision.log").read_text(errors="replace")
    assert proc.returncode != 0, provision_log
    # What the cancel left: the run's instances out of the pool, which the stack does not know.
    left = [r for r in store.run_records(pool, rid) if r.state in LIVE_STATES]

    # The release job, step by step, as GitHub runs it.
    failed = False
    # (`pip install ./runner-pool` is the job's setup; this test runs in the installed project already.)
    steps = [s for s in job_steps("release") if "run" in s and not s["run"].startswith("pip install")]
    assert len(steps) == 2, steps
    for i, step in enumerate(steps):
        if failed and "always()" not in str(step.get("if", "")):
            continue
        res = run_step(step, project, env, tmp_path / f"release-{i}.log")
        if res.returncode != 0 and not step.get("continue-on-error"):
            failed = True
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("release-*.log")))
    left_ids = [(r.instance_id, r.state.value) for r in left]
    assert not failed, f"the release job failed (the cancel left {left_ids}):\n{provision_log[-3000:]}\n{logs[-6000:]}"

    rows = store.all_records(pool)
    assert not [r for r in rows if r.run_id == rid and r.state is not State.TERMINATED], \
        [(r.instance_id, r.state.value) for r in rows if r.run_id == rid]
    live = {r.instance_id: r for r in rows if r.state is not State.TERMINATED}
    assert all(r.state is State.IDLE for r in live.values()), {i: r.state.value for i, r in live.items()}
    wait_for(lambda: set(pool_instance_ids(cfg)) <= set(live), "terminated instances to leave EC2")
    wait_for(lambda: not [r for r in emu.runners() if rid in [lb["name"] for lb in r["labels"]]],
             f"the runners of {rid} to leave GitHub")
    stacks = project.pulumi("stack", "ls", "--json").stdout
    assert f"run-{rid}" not in stacks, stacks               # removed: so neither locked nor pending
    assert not [p for p in project.locks() if f"run-{rid}" in str(p)]
    assert not online(emu, rid)
