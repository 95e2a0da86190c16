"""The instance side end to end: user data -> agent -> table, EC2 and GitHub.

Everything runs in this process over HTTP: the AWS emulator (moto), the
GitHub stand-in, the IMDS stand-in and the simulator, which boots every
instance CreateFleet launches by running the launch template's user data --
so the agent under test is the exact script an EC2 instance would run.

Assertions read what the control plane would read: the agent rows in the
state table, instance states in EC2, runners in the GitHub stand-in. Never the
agent's own log.
"""
from __future__ import annotations

import gzip
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controlplane import aws, launch_template, store, termination, token
from controlplane.clock import Deadline, wait_until
from controlplane.config import USER_DATA_LIMIT_BYTES, PoolConfig
from controlplane.github import GitHubClient
from controlplane.local.emulator import FAULTS, REQUESTS, Emulator
from controlplane.local.github_standin import GitHubStandIn
from controlplane.local.imds import ImdsStandIn
from controlplane.local.simulator import Simulator, processes_of
from controlplane.records import (
    REGISTRATION_ATTRIBUTES,
    REGISTRATION_TOKEN,
    AgentRecord,
    LaunchedInstance,
    Signal,
    State,
)
from controlplane.state import transition
from controlplane.userdata import pre_runner_room, render_user_data, user_data_bytes, user_data_size

PAT = "test-pat"
SCOPE = "octo/instance-side"
HEARTBEAT_S = 1
STALE_S = 3
T = TypeVar("T")
REQUIREMENTS = {"VCpuCount": {"Min": 2, "Max": 2}, "MemoryMiB": {"Min": 4096},
                "AllowedInstanceTypes": ["c*", "m*"]}


@dataclass
class World:
    cfg: PoolConfig
    pool: store.Pool
    github: GitHubStandIn
    imds: ImdsStandIn
    sim: Simulator
    subnets: list[str]
    work_dir: Path

    # -- actions ------------------------------------------------------------------

    def launch(self, n: int, run_id: str | None, threshold_in_s: float = 300.0) -> list[str]:
        """CreateFleet (attribute-based, one override per subnet), then the ``created`` rows."""
        resp = aws.client("ec2", self.cfg.region).create_fleet(
            Type="instant",
            TargetCapacitySpecification={"TotalTargetCapacity": n, "OnDemandTargetCapacity": n,
                                         "DefaultTargetCapacityType": "on-demand"},
            LaunchTemplateConfigs=[{
                "LaunchTemplateSpecification": {"LaunchTemplateName": self.cfg.launch_template_name,
                                                "Version": "$Default"},
                "Overrides": [{"SubnetId": s, "InstanceRequirements": REQUIREMENTS} for s in self.subnets]}],
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "runner-pool:pool", "Value": self.cfg.name},
                {"Key": "runner-pool:run-id", "Value": run_id or "none"}]}])
        launched = [LaunchedInstance(iid, e["InstanceType"], self.subnets[0], "on-demand")
                    for e in resp["Instances"] for iid in e["InstanceIds"]]
        assert len(launched) == n, resp.get("Errors")
        if run_id is not None:
            now = time.time()
            store.put_created(self.pool, launched, run_id, "small", now + threshold_in_s, now,
                              registration=self.registration())
        return [li.instance_id for li in launched]

    def registration(self) -> dict[str, str]:
        """What the control plane hands an agent that must register: the pool's token."""
        stored = token.read_tokens(self.cfg)
        assert stored is not None
        return {REGISTRATION_TOKEN: stored.registration}

    def state_row(self, iid: str) -> dict[str, Any]:
        item = aws.client("dynamodb", self.cfg.region).get_item(
            TableName=self.cfg.table_name, Key={"pk": {"S": self.pool.arn(iid)}, "sk": {"S": "state"}},
            ConsistentRead=True).get("Item")
        return dict(item or {})

    def runner_files(self, iid: str) -> list[str]:
        runner_dir = self.work_dir / iid / "actions-runner"
        return sorted(n for n in (".runner", ".credentials", ".credentials_rsaparams") if (runner_dir / n).exists())

    def move(self, iid: str, from_: State, to: State, run_id: str | None, **kw: Any) -> None:
        result = transition(self.pool, iid, from_=from_, to=to, expect_run=run_id, now=time.time(), **kw)
        assert result.won, result.reason

    def terminate(self, iid: str) -> None:
        aws.client("ec2", self.cfg.region).terminate_instances(InstanceIds=[iid])

    # -- observations -------------------------------------------------------------

    def agent(self, iid: str) -> AgentRecord | None:
        return store.read_set(self.pool, [iid])[iid][1]

    def ec2_state(self, iid: str) -> str:
        resp = aws.client("ec2", self.cfg.region).describe_instances(InstanceIds=[iid])
        return str(resp["Reservations"][0]["Instances"][0]["State"]["Name"])

    def runners_of(self, iid: str) -> list[dict[str, Any]]:
        return [r for r in self.github.state()["runners"] if r["name"].startswith(f"{iid}-")]

    def wait_signal(self, iid: str, sig: Signal, run_id: str | None = None,
                    timeout_s: float = 20) -> AgentRecord:
        def probe() -> AgentRecord | None:
            a = self.agent(iid)
            if a is None or a.signal != sig or (run_id is not None and a.signal_run != run_id):
                return None
            return a
        return waited(probe, timeout_s, f"{iid}: signal {sig} for {run_id}, last {self.agent(iid)}")

    def wait_ec2(self, iid: str, state: str, timeout_s: float = 20) -> None:
        waited(lambda: self.ec2_state(iid) == state, timeout_s, f"{iid}: EC2 {state}")


def waited(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    result = wait_until(probe, Deadline(timeout_s), 0.2)
    assert result, f"timed out after {timeout_s} s waiting for {what}"
    return result


def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    emu = Emulator().start()
    github = GitHubStandIn(pat=PAT).start()
    imds = ImdsStandIn().start()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", emu.url)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        ec2 = aws.client("ec2", "us-east-1")
        subnets = sorted(s["SubnetId"] for s in ec2.describe_subnets()["Subnets"] if s["DefaultForAz"])[:3]
        ami = ec2.describe_images()["Images"][0]["ImageId"]
        cfg = PoolConfig.model_validate({
            "name": "inst", "region": "us-east-1",
            "github": {"repository": SCOPE, "url": github.url, "api_url": github.url},
            "resource_classes": {"small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}}},
            "subnets": subnets, "ami": ami, "instance_profile": "runner-pool-test",
            "heartbeat_interval_s": HEARTBEAT_S, "heartbeat_stale_s": STALE_S,
        })
        store.ensure_table(cfg)
        token.ensure_tokens(cfg, GitHubClient(api_url=github.url, token=PAT, scope=SCOPE))
        launch_template.ensure(cfg)
        account, partition = aws.account_and_partition(cfg.region)
        work_dir = tmp_path_factory.mktemp("instances")
        sim = Simulator(aws_endpoint=emu.url, work_dir=work_dir, imds=imds, github_url=github.url).start()
        try:
            yield World(cfg, store.Pool(cfg, account, partition), github, imds, sim, subnets, work_dir)
        finally:
            sim.stop()
            imds.stop()
            github.stop()
            emu.stop()


@pytest.fixture(autouse=True)
def no_leftover_behaviours(world: World) -> Iterator[None]:
    yield
    world.sim.clear_behaviours()
    world.github.clear_faults()


def test_user_data_is_small_deterministic_and_holds_no_token(world: World) -> None:
    user_data = render_user_data(world.cfg)
    size = user_data_size(world.cfg)                  # gzipped, as the launch template carries it
    room = pre_runner_room(world.cfg, USER_DATA_LIMIT_BYTES)
    print(f"user data with an empty pre-runner script: {size} bytes gzipped; room for a pre-runner script: {room}")
    assert size < 12 * 1024
    assert room >= 4 * 1024
    assert gzip.decompress(user_data_bytes(world.cfg)).decode() == user_data
    assert render_user_data(world.cfg) == user_data
    stored = token.read_tokens(world.cfg)
    assert stored is not None
    assert stored.registration not in user_data


def test_agents_heartbeat_from_boot_and_register_for_their_run(world: World) -> None:
    rid = run_id()
    ids = world.launch(2, rid)
    for iid in ids:
        world.wait_signal(iid, Signal.REGISTERED, rid)
    first = {iid: world.agent(iid) for iid in ids}
    time.sleep(HEARTBEAT_S * 2.5)
    for iid in ids:
        now = time.time()
        agent = world.agent(iid)
        assert agent is not None and first[iid] is not None
        assert agent.is_healthy(now, STALE_S)
        assert agent.heartbeat_at is not None and agent.heartbeat_at > (first[iid].heartbeat_at or 0)
        assert agent.runner_name == f"{iid}-1"
        (runner,) = world.runners_of(iid)
        assert runner["status"] == "online"
        assert {lb["name"] for lb in runner["labels"]} == {rid, world.cfg.pool_label}
    assert REQUESTS.snapshot()["counts"].get("dynamodb.PutItem", 0) == 0, "agents only ever UpdateItem"
    for iid in ids:
        world.terminate(iid)


def test_release_deregisters_first_then_the_runner_serves_the_next_run(world: World) -> None:
    rid, next_rid = run_id(), run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    (runner,) = world.runners_of(iid)
    assert world.agent(iid).runner_id == runner["id"], "the agent reports its runner's GitHub id"
    world.move(iid, State.CREATED, State.RUNNING, rid)
    assert not set(world.state_row(iid)) & set(REGISTRATION_ATTRIBUTES), "commit takes the token away"
    world.move(iid, State.RUNNING, State.DRAINING, rid, set_run=None)

    agent = world.wait_signal(iid, Signal.DEREGISTERED, rid)
    assert agent.deregistered_from(rid) and agent.runner_id == runner["id"]
    assert world.runner_files(iid) == [], "the runner's credential files are wiped before the signal"
    gh = GitHubClient(api_url=world.github.url, token=PAT, scope=SCOPE)
    assert termination.remove_runners(world.pool, gh, {iid: agent}) == [iid]      # what release does next
    assert world.runners_of(iid) == []

    world.move(iid, State.DRAINING, State.IDLE, None)
    world.move(iid, State.IDLE, State.CLAIMED, None, set_run=next_rid, registration=world.registration())
    agent = world.wait_signal(iid, Signal.REGISTERED, next_rid)
    assert agent.runner_name == f"{iid}-2"
    (runner,) = world.runners_of(iid)
    assert {lb["name"] for lb in runner["labels"]} == {next_rid, world.cfg.pool_label}
    world.terminate(iid)


def test_agent_terminates_its_instance_a_minute_after_its_threshold(world: World) -> None:
    rid = run_id()
    (iid,) = world.launch(1, rid, threshold_in_s=-55)        # the agent allows 60 s of grace past a threshold
    agent = world.wait_signal(iid, Signal.SHUTDOWN, timeout_s=30)
    assert "threshold" in (agent.detail or "")
    world.wait_ec2(iid, "terminated")
    assert world.runner_files(iid) == [], "it wiped its runner on the way out (GitHub's copy is reconcile's)"


def test_agent_without_a_state_row_powers_off(world: World) -> None:
    world.sim.set_behaviour({"match": {"pool": world.cfg.name}, "count": 1,
                             "env": {"RP_NO_ROW_TIMEOUT_S": "2"}})
    (iid,) = world.launch(1, None)
    agent = world.wait_signal(iid, Signal.SHUTDOWN)
    assert "no state row" in (agent.detail or "")
    world.wait_ec2(iid, "terminated")


def test_agent_that_loses_dynamodb_powers_off(world: World) -> None:
    world.sim.set_behaviour({"match": {"pool": world.cfg.name}, "count": 1,
                             "env": {"RP_LOST_CONTACT_S": "3"}})
    rid = run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    started = time.monotonic()
    with FAULTS.lock:
        FAULTS.rules += [{"op": op, "service": "dynamodb", "status": 500, "code": "InternalServerError"}
                         for op in ("GetItem", "UpdateItem")]
    try:
        world.wait_ec2(iid, "terminated", timeout_s=60)
    finally:
        FAULTS.clear()
    print(f"lost contact -> instance terminated in {time.monotonic() - started:.1f} s")
    assert world.runner_files(iid) == [], "it wiped its runner's credentials on the way out"


def test_killed_agent_leaves_a_stale_heartbeat_and_a_wedged_instance(world: World) -> None:
    rid = run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    world.sim.kill_agent(iid, signal.SIGKILL)
    time.sleep(STALE_S + HEARTBEAT_S)
    agent = world.agent(iid)
    assert agent is not None and not agent.is_healthy(time.time(), STALE_S)
    assert world.ec2_state(iid) == "running"

    world.terminate(iid)                                      # what refresh would do to a wedged instance
    home = world.work_dir / iid
    waited(lambda: not processes_of(home), 15, f"every process of {iid} gone")


def test_prerunner_failure_is_signalled_and_the_instance_terminates(world: World) -> None:
    world.sim.set_behaviour({"match": {"pool": world.cfg.name}, "count": 1, "prerunner_fail": True})
    rid = run_id()
    (iid,) = world.launch(1, rid)
    agent = world.wait_signal(iid, Signal.PRERUNNER_FAILED)
    assert agent.detail == "exit code 3"
    assert agent.failed_for(rid)
    world.wait_ec2(iid, "terminated")
    last = world.agent(iid)
    assert last is not None and last.signal == Signal.PRERUNNER_FAILED, "shutdown keeps the failure signal"


def test_registration_failure_is_signalled_and_the_instance_terminates(world: World) -> None:
    world.sim.set_behaviour({"match": {"pool": world.cfg.name}, "count": 1, "registration": "fail",
                             "env": {"RP_REGISTRATION_BACKOFF_S": "0.3"}})
    rid = run_id()
    (iid,) = world.launch(1, rid)
    agent = world.wait_signal(iid, Signal.REGISTRATION_FAILED, rid)
    assert agent.failed_for(rid)
    assert "3 attempts" in (agent.detail or "")
    world.wait_ec2(iid, "terminated")
    assert world.runners_of(iid) == []


def test_runner_deleted_on_github_is_registered_again_for_the_same_run(world: World) -> None:
    rid = run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    (runner,) = world.runners_of(iid)
    GitHubClient(api_url=world.github.url, token=PAT, scope=SCOPE).delete_runner(runner["id"])

    def registered_again() -> bool:
        agent = world.agent(iid)
        return agent is not None and agent.registered_for(rid) and agent.runner_name == f"{iid}-2"

    waited(registered_again, 20, "a second registration for the same run")
    waited(lambda: [r["status"] for r in world.runners_of(iid)] == ["online"], 10, "the new runner online")
    world.terminate(iid)


def test_imds_stand_in_requires_a_session_token(world: World) -> None:
    world.imds.register("i-0imdsprobe", "c7i.large", "us-east-1a", "us-east-1", "123456789012",
                        "#!/bin/bash\n", {"runner-pool:pool": "inst"})
    base = world.imds.base_url("i-0imdsprobe")

    def status(req: urllib.request.Request) -> int:
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(urllib.request.Request(base + "/latest/meta-data/instance-id")) == 401
    assert status(urllib.request.Request(base + "/latest/api/token", method="PUT")) == 400
    put = urllib.request.Request(base + "/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with urllib.request.urlopen(put, timeout=5) as resp:
        session = resp.read().decode()
    get = urllib.request.Request(base + "/latest/meta-data/tags/instance/runner-pool:pool",
                                 headers={"X-aws-ec2-metadata-token": session})
    with urllib.request.urlopen(get, timeout=5) as resp:
        assert resp.read() == b"inst"
    other = urllib.request.Request(world.imds.base_url("i-0other") + "/latest/meta-data/instance-id",
                                   headers={"X-aws-ec2-metadata-token": session})
    assert status(other) == 404
    world.imds.unregister("i-0imdsprobe")


# -- secrets: what an instance is handed, and what its runner can see ----------------------


def _cmdlines() -> dict[int, bytes]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    out[int(name)] = fh.read()
            except OSError:
                continue
    return out


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        entries = fh.read().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def test_no_process_argv_holds_the_token_while_an_instance_registers(world: World) -> None:
    secret = world.registration()[REGISTRATION_TOKEN]
    world.github.add_fault("delay", path_contains="/_runner/register", delay_s=2.0, count=1)
    rid = run_id()
    (iid,) = world.launch(1, rid)
    seen_config = False
    deadline = Deadline(30)
    while not deadline.expired:
        lines = _cmdlines()
        leaking = [pid for pid, line in lines.items() if secret.encode() in line]
        assert leaking == [], f"the token is on the command line of {leaking}"
        seen_config = seen_config or any(b"standin_runner.py\0config" in line for line in lines.values())
        agent = world.agent(iid)
        if agent is not None and agent.registered_for(rid):
            break
        time.sleep(0.02)
    assert seen_config, "config.sh ran while we scanned (the delay fault holds it for 2 s)"
    world.wait_signal(iid, Signal.REGISTERED, rid)
    world.terminate(iid)


def test_the_runner_inherits_no_aws_credentials_or_pool_settings(world: World) -> None:
    rid = run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    home = world.work_dir / iid
    runner_pids = [pid for pid, line in _cmdlines().items() if b"standin_runner.py\0run" in line
                   and pid in processes_of(home)]
    assert runner_pids, "run.sh is running"
    env = _environ(runner_pids[0])
    assert not [k for k in env if k.startswith(("AWS_", "RP_"))], sorted(env)
    assert not [k for k in env if k.startswith("ACTIONS_RUNNER_INPUT_")]
    assert env.get("RUNNER_ALLOW_RUNASROOT") == "1", "no RP_RUNNER_USER here: the process kind runs as root"
    world.terminate(iid)


def test_the_agent_writes_only_its_listed_attributes(world: World) -> None:
    from controlplane.records import AGENT_ATTRIBUTES

    rid = run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    world.move(iid, State.CREATED, State.RUNNING, rid)
    world.move(iid, State.RUNNING, State.DRAINING, rid, set_run=None)
    world.wait_signal(iid, Signal.DEREGISTERED, rid)
    item = aws.client("dynamodb", world.cfg.region).get_item(
        TableName=world.cfg.table_name, Key={"pk": {"S": "agent#" + world.pool.arn(iid)}, "sk": {"S": "agent"}},
        ConsistentRead=True)["Item"]
    assert set(item) - {"pk", "sk"} <= set(AGENT_ATTRIBUTES), set(item) - set(AGENT_ATTRIBUTES)
    world.terminate(iid)


def test_a_runner_deleted_after_commit_cannot_register_again_and_its_instance_powers_off(world: World) -> None:
    rid = run_id()
    (iid,) = world.launch(1, rid)
    world.wait_signal(iid, Signal.REGISTERED, rid)
    world.move(iid, State.CREATED, State.RUNNING, rid)              # commit: the token is gone
    (runner,) = world.runners_of(iid)
    GitHubClient(api_url=world.github.url, token=PAT, scope=SCOPE).delete_runner(runner["id"])
    agent = world.wait_signal(iid, Signal.REGISTRATION_FAILED, rid)
    assert "no credential" in (agent.detail or "")
    world.wait_ec2(iid, "terminated")
    assert world.runners_of(iid) == [] and world.runner_files(iid) == []


def test_a_forged_runner_id_does_not_make_the_control_plane_delete_another_instances_runner(
        world: World) -> None:
    rid = run_id()
    victim, forger = world.launch(2, rid)
    for iid in (victim, forger):
        world.wait_signal(iid, Signal.REGISTERED, rid)
    (victim_runner,) = world.runners_of(victim)
    forged = world.agent(forger)
    assert forged is not None
    forged = AgentRecord(forged.arn, forged.heartbeat_at, forged.signal, forged.signal_run, forged.signal_at,
                         forged.runner_name, forged.detail, runner_id=victim_runner["id"])
    gh = GitHubClient(api_url=world.github.url, token=PAT, scope=SCOPE)
    assert termination.remove_runners(world.pool, gh, {forger: forged}) == []
    assert [r["id"] for r in world.runners_of(victim)] == [victim_runner["id"]], "the victim's runner stays"
    for iid in (victim, forger):
        world.terminate(iid)
