"""The `runner-pool` command as a user runs it: output, exit codes, nothing touched on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Emu, run_cli, run_cli_with_own_key


def test_local_start_pool_apply_and_local_stop_work_in_a_row_from_a_new_shell(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNER_POOL_"))}
    env["RUNNER_POOL_LOCAL_DIR"] = str(state)
    script = f"""
set -euo pipefail
{sys.executable} -m controlplane local start
eval "$({sys.executable} -m controlplane local env)"
{sys.executable} -m controlplane pool apply --config examples/pool.yaml
{sys.executable} -m controlplane status --pool demo --json > {tmp_path}/status.json
{sys.executable} -m controlplane local stop
"""
    p = subprocess.run(["bash", "-c", script], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "local AWS emulator started" in p.stdout
    assert "applied pool demo: table runner-pool-demo (created), queues large, small" in p.stdout
    assert "stopped the local emulator" in p.stdout
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["pool"] == "demo" and set(status["queues"]) == {"small", "large"}
    assert not (state / "state.json").exists()


def test_local_stop_never_signals_a_process_that_took_a_dead_daemons_pid(tmp_path: Path) -> None:
    """A state.json left by a killed daemon (or a reboot) names a pid that may belong to anything now."""
    state = tmp_path / "state"
    state.mkdir()
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        (state / "state.json").write_text(json.dumps({"pid": stranger.pid, "aws_url": "http://127.0.0.1:9"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNER_POOL_"))}
        env["RUNNER_POOL_LOCAL_DIR"] = str(state)
        stopped = subprocess.run([sys.executable, "-m", "controlplane", "local", "stop"], check=False, cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert stranger.poll() is None, "local stop killed a process that is not its daemon"
        shown = subprocess.run([sys.executable, "-m", "controlplane", "local", "env"], check=False, cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode != 0 and str(stranger.pid) not in shown.stdout
    finally:
        stranger.kill()
        stranger.wait()


def test_config_check_prints_every_problem_and_exits_2_without_touching_aws(tmp_path: Path, emu: Emu) -> None:
    bad = tmp_path / "pool.yaml"
    bad.write_text("name: Bad_Name\nregion: mars-1\nsubnets: []\nami: nope\nbogus: 1\n")
    p, key = run_cli_with_own_key("config", "check", str(bad))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("error: ") for line in lines)
    for field in ("name:", "region:", "subnets:", "ami:", "bogus:", "github:", "resourceClasses:", "instanceProfile:"):
        assert any(line.startswith(f"error: {field}") for line in lines), field
    assert emu.requests(access_key=key)["total"] == 0


def test_config_check_accepts_the_example(local: dict[str, Any]) -> None:
    p = run_cli("config", "check", "examples/pool.yaml")
    assert p.returncode == 0 and p.stdout.startswith("ok: pool 'demo'")


@pytest.mark.parametrize("args,message", [
    (["--resource-class", "huge", "--count", "1"], "resource class 'huge' is not in pool"),
    (["--resource-class", "small", "--count", "0"], "--count 0 is not valid"),
    (["--resource-class", "small", "--count", "-3"], "--count -3 is not valid"),
    (["--resource-class", "small", "--count", "1", "--run-id", "bad id!"], "--run-id 'bad id!' is not valid"),
])
def test_bad_provision_arguments_are_one_line_exit_2_and_change_nothing(make_pool: Any, emu: Emu,
                                                                        args: list[str], message: str) -> None:
    pool = make_pool()
    run = [] if "--run-id" in args else ["--run-id", "r1"]
    p, key = run_cli_with_own_key("provision", "--pool", pool.name, *run, *args)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and message in p.stderr
    assert emu.requests(access_key=key)["mutations"] == 0


def test_an_unknown_pool_is_a_clear_error(local: dict[str, Any]) -> None:
    p = run_cli("status", "--pool", "nosuchpool")
    assert p.returncode == 2
    assert "pool 'nosuchpool' not found" in p.stderr and "pool apply" in p.stderr


def test_provision_json_prints_one_object_and_release_gives_the_runners_back(make_pool: Any) -> None:
    pool = make_pool()
    p = run_cli("provision", "--pool", pool.name, "--run-id", "cli-run-1", "--resource-class", "small",
                "--count", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert {"run_id", "label", "instances", "timings"} <= set(out) and out["label"] == "cli-run-1"
    assert [i["source"] for i in out["instances"]] == ["created", "created"]
    again = run_cli("provision", "--pool", pool.name, "--run-id", "cli-run-1", "--resource-class", "small",
                    "--count", "1")
    assert again.returncode == 2 and "already holds 2 instance(s)" in again.stderr
    r = run_cli("release", "--pool", pool.name, "--run-id", "cli-run-1", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["returned_to_pool"]) == 2
    r2 = run_cli("release", "--pool", pool.name, "--run-id", "cli-run-1")
    assert r2.returncode == 0 and "nothing to release" in r2.stdout


def test_a_rolled_back_provision_exits_1_and_says_what_it_cleaned(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    emu.capacity(available=0)
    p = run_cli("provision", "--pool", pool.name, "--run-id", "cli-run-2", "--resource-class", "small",
                "--count", "2")
    assert p.returncode == 1
    assert "provision of run cli-run-2 failed: EC2 could not supply 2 of 2" in p.stdout
    assert "rolled back:" in p.stdout


def test_the_demo_runs_end_to_end_and_serves_the_second_run_from_the_pool(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNER_POOL_"))}
    p = subprocess.run([sys.executable, "-m", "controlplane", "demo", "--json", "--state-dir", str(tmp_path / "d")],
                       check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    runs = {r["run_id"]: r for r in report["runs"]}
    assert set(runs["demo-run-1"]["sources"]) == {"created"} and set(runs["demo-run-2"]["sources"]) == {"pool"}
    assert runs["demo-run-3"]["ok"] is False
    assert report["pool_hit_rate"] == 0.5 and all(ph["ok"] for ph in report["phases"])
