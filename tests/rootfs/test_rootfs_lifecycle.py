"""The pool's life on rootfs instances: a Debian root with its own users, processes and network.

Each instance here boots the launch template's user data, unchanged, in a
debootstrapped bookworm root with mount, PID and network namespaces of its own
(controlplane/local/rootfs.py): the bootstrap installs the distribution's
python3 and boto3 with apt, creates the runner user and blocks IMDS for it.
The tests drive the pool through the real CLI and check what a user would:
the command's exit code and JSON, rows, EC2, runners on GitHub, and -- from
inside the instance -- which Python and boto3 run the agent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane import aws, store
from controlplane.records import State
from tests.conftest import ROOT, Emu, pool_config_dict, run_cli, wait_for
from tests.factories import run_id
from tests.reliability.invariants import check, online
from tests.rootfs.conftest import inside, rootfs_pool, sim_status

pytestmark = pytest.mark.usefixtures("rootfs_root")
BOOT_S = 240.0                         # first boots install python3 and boto3: generous on a busy 2-core machine



def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    p = run_cli(*args, "--json", timeout=600)
    assert p.stdout.strip(), p.stderr[-2000:]
    return p.returncode, json.loads(p.stdout)


def settled(emu: Emu, iid: str, phase: str) -> dict[str, Any] | None:
    """The simulator's view of ``iid`` once it is in ``phase`` with no boot or teardown still running."""
    m = sim_status(emu).get(iid)
    return m if m is not None and m["phase"] == phase and not m["busy"] else None


def rows(pool: Any) -> dict[str, str]:
    return {r.instance_id: r.state.value for r in store.all_records(pool)}


def test_rootfs_instances_provision_release_and_roll_back_through_the_cli_with_the_invariants_holding(
        make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu)
    name = pool.config.name

    first = run_id()
    code, out = cli_json("provision", "--pool", name, "--run-id", first, "--resource-class", "small", "--count", "2")
    assert code == 0 and out["ok"], out
    ids = [m["id"] for m in out["instances"]]
    assert len(ids) == 2 and {sim_status(emu)[i]["kind"] for i in ids} == {"rootfs"}
    assert {r["name"].rsplit("-", 1)[0] for r in online(emu, first)} == set(ids)
    check(pool, emu)

    # The agent runs on the distribution's Python and boto3, not the project's: asked inside the instance.
    for iid in ids:
        p = inside(emu, iid, ["python3", "-c", "import boto3, botocore, sys; "
                              "print(boto3.__version__, botocore.__version__, boto3.__file__, sys.version.split()[0])"])
        assert p.returncode == 0, p.stderr
        boto3_v, botocore_v, path, py = p.stdout.split()
        assert boto3_v.startswith("1.26.") and botocore_v.startswith("1.29."), p.stdout
        assert path.startswith("/usr/lib/python3/dist-packages/") and py.startswith("3.11."), p.stdout
        agent = inside(emu, iid, ["sh", "-c", "p=$(pgrep -xf 'python3 /opt/runner-pool/agent.py'); "
                                              "readlink /proc/$p/exe; ps -o user= -p $p; "
                                              "ps -o user= -p $(pgrep -f '^python3 -S .*standin_runner.py run')"])
        assert agent.stdout.split() == ["/usr/bin/python3.11", "root", "runner"], agent.stdout + agent.stderr

    code, out = cli_json("release", "--pool", name, "--run-id", first)
    assert code == 0 and out["ok"] and sorted(out["returned_to_pool"]) == sorted(ids), out
    assert wait_for(lambda: not online(emu, first), "the first run's runners to leave GitHub")
    assert {rows(pool)[i] for i in ids} == {State.IDLE.value}
    check(pool, emu)

    # Rollback: a run of 3 claims the 2 idle instances and creates 1, whose registration fails.
    emu.behaviour(match={"pool": name}, count=1, kind="rootfs", registration="fail")
    second = run_id()
    code, out = cli_json("provision", "--pool", name, "--run-id", second, "--resource-class", "small", "--count", "3")
    assert code == 1 and not out["ok"] and "failed validation" in (out["reason"] or ""), out
    assert sorted(out["cleanup"]["returned_to_pool"]) == sorted(ids), out
    (created,) = out["cleanup"]["terminated"]
    assert rows(pool)[created] == State.TERMINATED.value
    assert {rows(pool)[i] for i in ids} == {State.IDLE.value}
    assert wait_for(lambda: not online(emu, second), "the rolled-back run's runners to leave GitHub")
    check(pool, emu)
    # Terminated in EC2: its namespaces, mounts and layer are gone with it.
    gone = wait_for(lambda: settled(emu, created, "terminated"), "the rolled-back instance to be torn down")
    home = Path(gone["home"])
    assert not (home / "layer").exists() and not os.path.ismount(home / "root")


def test_a_stopped_rootfs_instance_keeps_its_layer_and_its_agent_comes_back_when_started(
        make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu)
    rid = run_id()
    code, out = cli_json("provision", "--pool", pool.config.name, "--run-id", rid, "--resource-class", "small")
    assert code == 0, out
    (iid,) = [m["id"] for m in out["instances"]]
    code, out = cli_json("release", "--pool", pool.config.name, "--run-id", rid)
    assert code == 0, out
    home = Path(sim_status(emu)[iid]["home"])
    netns = (home / "netns").read_text().strip()
    ec2 = aws.client("ec2", pool.region)

    ec2.stop_instances(InstanceIds=[iid])
    wait_for(lambda: settled(emu, iid, "halted"), f"{iid} to halt", 60)
    assert not Path("/run/netns", netns).exists(), "stop leaves no network namespace"
    assert not os.path.ismount(home / "root"), "stop leaves no mount"
    assert (home / "layer/upper/opt/runner-pool/agent.py").exists(), "stop keeps the instance's layer"
    stopped_at = time.time()

    ec2.start_instances(InstanceIds=[iid])

    def beating() -> bool:
        agent = store.read_set(pool, [iid])[iid][1]
        return agent is not None and (agent.heartbeat_at or 0) > stopped_at + 1
    wait_for(beating, f"{iid}'s agent to heartbeat again after the start", BOOT_S)
    log = (home / "layer/upper/var/log/runner-pool.log").read_text()
    assert log.count("runner-pool bootstrap ") == 2, "the bootstrap ran again, from cloud-init's per-boot directory"
    assert log.count("installing python3 and boto3") == 1, "python3 and boto3 stayed installed in the layer"
    rules = inside(emu, iid, ["iptables", "-S", "OUTPUT"]).stdout
    assert "-d 169.254.169.254/32 -m owner --uid-owner" in rules and "-j REJECT" in rules, rules
    assert sim_status(emu)[iid]["boots"] == 2

    # The pool serves the next run on it again.
    rid = run_id()
    code, out = cli_json("provision", "--pool", pool.config.name, "--run-id", rid, "--resource-class", "small")
    assert code == 0 and [m["id"] for m in out["instances"]] == [iid], out
    check(pool, emu)


def launch_from_the_template(pool: Any) -> str:
    """One instance from the pool's launch template, outside any provision (RunInstances, as a user could)."""
    resp = aws.client("ec2", pool.region).run_instances(
        LaunchTemplate={"LaunchTemplateName": pool.config.launch_template_name}, MinCount=1, MaxCount=1,
        SubnetId=pool.config.subnets[0], TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "runner-pool:pool", "Value": pool.config.name}]}])
    return str(resp["Instances"][0]["InstanceId"])


def test_the_agents_power_off_terminates_a_rootfs_instance_like_ec2s_shutdown_behaviour(
        make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu)
    emu.behaviour(match={"pool": pool.config.name}, kind="rootfs", env={"RP_NO_ROW_TIMEOUT_S": "5"})
    ec2 = aws.client("ec2", pool.region)
    iid = launch_from_the_template(pool)
    wait_for(lambda: settled(emu, iid, "shutdown"), f"{iid} to power off", BOOT_S)

    def state() -> str:
        found = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
        return str(found["State"]["Name"])
    assert state() in ("shutting-down", "terminated")
    home = Path(sim_status(emu)[iid]["home"])
    assert not (home / "layer").exists() and not os.path.ismount(home / "root")
    assert not Path("/run/netns", (home / "netns").read_text().strip()).exists()


def test_local_stop_leaves_no_namespace_mount_or_process_of_rootfs_instances(
        tmp_path: Path, rootfs_root: str) -> None:
    from controlplane.local import rootfs

    state_dir = tmp_path / "local"
    env = {"RUNNER_POOL_LOCAL_DIR": str(state_dir)}
    started = run_cli("local", "start", env=env)
    assert started.returncode == 0, started.stderr
    try:
        state = json.loads((state_dir / "state.json").read_text())
        emu = Emu(state)
        local_env = {**env, "AWS_ENDPOINT_URL": state["aws_url"], "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "RUNNER_POOL_GITHUB_TOKEN": state["github_pat"],
                     "RUNNER_POOL_GITHUB_URL": state["github_url"], "RUNNER_POOL_GITHUB_API_URL": state["github_url"]}
        cfg = pool_config_dict(state, validation_timeout_s=240, claim_timeout_s=600)
        (tmp_path / "pool.json").write_text(json.dumps(cfg))
        applied = run_cli("pool", "apply", "--config", str(tmp_path / "pool.json"), env=local_env)
        assert applied.returncode == 0, applied.stderr
        emu.behaviour(match={"pool": cfg["name"]}, kind="rootfs")
        got = run_cli("provision", "--pool", cfg["name"], "--run-id", "run-stop-1", "--resource-class", "small",
                      "--count", "2", env=local_env, timeout=600)
        assert got.returncode == 0, got.stdout + got.stderr
        assert len(rootfs.processes_rooted_below(state_dir)) > 4 and rootfs.mounts_below(state_dir)
        names = [p.read_text().strip() for p in state_dir.glob("instances/*/netns")]
        assert len(names) == 3 and all(Path("/run/netns", n).exists() for n in names)      # two instances, a hub
    finally:
        stopped = run_cli("local", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert rootfs.processes_rooted_below(state_dir) == []
    assert rootfs.mounts_below(state_dir) == []
    assert [n for n in names if Path("/run/netns", n).exists()] == []


def test_local_stop_cleans_up_rootfs_instances_even_after_the_daemon_was_killed(
        tmp_path: Path, rootfs_root: str) -> None:
    """The daemon gets SIGKILL (no chance to clean up); ``local stop`` still leaves nothing behind."""
    from controlplane.local import control, rootfs
    from controlplane.local.daemon import LOCAL_REGION

    state_dir = tmp_path / "local"
    state, _ = control.start(state_dir)
    emu = Emu(state)
    emu.behaviour(kind="rootfs")
    env = {**os.environ, "AWS_ENDPOINT_URL": state["aws_url"], "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": LOCAL_REGION}
    net = state["network"]
    script = ("import boto3; ec2 = boto3.client('ec2'); "
              f"ec2.run_instances(ImageId='{net['ami']}', MinCount=1, MaxCount=1, SubnetId='{net['subnets'][0]}', "
              "UserData='#!/bin/bash\\nsleep 600\\n', TagSpecifications=[{'ResourceType': 'instance', "
              "'Tags': [{'Key': 'runner-pool:pool', 'Value': 'killed'}]}])")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=ROOT, timeout=60)
    wait_for(lambda: any(b"sleep" in rootfs.cmdline(p) for p in rootfs.processes_rooted_below(state_dir)),
             "the instance's user data to run", BOOT_S)
    os.kill(state["pid"], 9)
    wait_for(lambda: not control._alive(state["pid"]), "the daemon to die")
    names = [p.read_text().strip() for p in state_dir.glob("instances/*/netns")]
    assert names and all(Path("/run/netns", n).exists() for n in names)
    assert rootfs.processes_rooted_below(state_dir) and rootfs.mounts_below(state_dir)
    control.stop(state_dir)
    assert rootfs.processes_rooted_below(state_dir) == []
    assert rootfs.mounts_below(state_dir) == []
    assert [n for n in names if Path("/run/netns", n).exists()] == []


def test_a_killed_agent_leaves_a_rootfs_instance_running_and_silent_like_a_wedged_ec2_instance(
        make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu)
    ec2 = aws.client("ec2", pool.region)
    iid = launch_from_the_template(pool)

    def heartbeat() -> float:
        agent = store.read_set(pool, [iid])[iid][1]
        return float(agent.heartbeat_at or 0) if agent is not None else 0.0
    wait_for(heartbeat, f"{iid}'s agent to heartbeat", BOOT_S)
    emu.kill_agent(iid)
    assert sim_status(emu)[iid]["phase"] == "killed"
    last = heartbeat()
    time.sleep(3 * pool.config.heartbeat_interval_s + 1)
    assert heartbeat() == last, "a killed agent heartbeats no more"
    found = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert found["State"]["Name"] == "running", "the instance stays up without its agent: reconcile's to find"
    assert inside(emu, iid, ["pgrep", "-c", "-x", "rp-init"]).stdout.strip() == "1"
    ec2.terminate_instances(InstanceIds=[iid])
