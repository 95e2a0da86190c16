"""The embedded default as one background process: ``runner-pool local start``.

It runs, in one process so the simulator can read moto's models directly:

* the AWS emulator (moto server + lock + fleet shim + faults) on 127.0.0.1;
* the GitHub stand-in (REST subset + the runner service ``config.sh`` uses);
* the IMDS stand-in and the instance simulator, which starts the real agent
  (via the launch template's user data) for every instance our fleets launch.

At start it seeds moto's id generator and creates a fixed local network (VPC,
three subnets, a security group, an instance profile), so the ids in
``examples/pool.yaml`` exist on every fresh start. It writes ``state.json``
(pid, URLs, network ids) into its state directory; ``local env`` prints the
exports a shell needs from it, ``local stop`` sends SIGTERM and the daemon
kills every agent before it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

LOCAL_REGION = "us-east-1"
LOCAL_SEED = 20261122
LOCAL_AMI = "ami-0a1b2c3d4e5f60718"
LOCAL_PROFILE = "runner-pool-local"
STANDIN_PAT = "standin-pat"
AZS = ("us-east-1a", "us-east-1b", "us-east-1c")


def default_state_dir() -> Path:
    return Path(os.environ.get("RUNNER_POOL_LOCAL_DIR") or Path.home() / ".runner-pool" / "local")


def aws_env(aws_url: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": aws_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": LOCAL_REGION, "AWS_REGION": LOCAL_REGION}


def build_network(aws_url: str) -> dict[str, Any]:
    """Seed moto and create the fixed local network; same ids on every fresh start."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{aws_url}/moto-api/seed?a={LOCAL_SEED}", method="POST"),
                           timeout=10).read()
    kw = {"endpoint_url": aws_url, "region_name": LOCAL_REGION, "aws_access_key_id": "testing",
          "aws_secret_access_key": "testing"}
    ec2 = boto3.client("ec2", **kw)
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "runner-pool-local"}]}])["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.42.{i}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
               for i, az in enumerate(AZS)]
    sg = ec2.create_security_group(GroupName="runner-pool-local", Description="runner-pool local runners",
                                   VpcId=vpc)["GroupId"]
    iam = boto3.client("iam", **kw)
    iam.create_role(RoleName=LOCAL_PROFILE, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))
    iam.create_instance_profile(InstanceProfileName=LOCAL_PROFILE)
    iam.add_role_to_instance_profile(InstanceProfileName=LOCAL_PROFILE, RoleName=LOCAL_PROFILE)
    return {"vpc": vpc, "subnets": subnets, "security_group": sg, "instance_profile": LOCAL_PROFILE,
            "ami": LOCAL_AMI, "region": LOCAL_REGION}


def _sim_hooks(sim: Any) -> dict[tuple[str, str], Any]:
    def behaviour(data: dict[str, Any]) -> tuple[int, Any]:
        sim.set_behaviour(data)
        return 200, {"ok": True}

    def clear(_: dict[str, Any]) -> tuple[int, Any]:
        sim.clear_behaviours()
        return 200, {"ok": True}

    def status(_: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"instances": sim.status()}

    def kill(data: dict[str, Any]) -> tuple[int, Any]:
        try:
            sim.kill_agent(data["instance_id"], int(data.get("signal", signal.SIGKILL)))
        except KeyError:
            return 404, {"error": f"no live agent for {data.get('instance_id')}"}
        return 200, {"ok": True}

    return {("POST", "/_emulator/sim/behaviour"): behaviour, ("DELETE", "/_emulator/sim/behaviour"): clear,
            ("GET", "/_emulator/sim/status"): status, ("POST", "/_emulator/sim/kill"): kill}


def serve(state_dir: Path, aws_port: int = 0, github_port: int = 0) -> int:
    from controlplane.local import emulator
    from controlplane.local.github_standin import GitHubStandIn
    from controlplane.local.imds import ImdsStandIn
    from controlplane.local.simulator import Simulator

    state_dir.mkdir(parents=True, exist_ok=True)
    emu = emulator.Emulator(aws_port).start()
    network = build_network(emu.url)
    github = GitHubStandIn(port=github_port, pat=STANDIN_PAT)
    github.start()
    imds = ImdsStandIn()
    imds.start()
    os.environ.update(aws_env(emu.url))
    sim = Simulator(aws_endpoint=emu.url, work_dir=state_dir / "instances", imds=imds, github_url=github.url)
    sim.start()
    emulator.CONTROL_HOOKS.update(_sim_hooks(sim))
    state = {"pid": os.getpid(), "aws_url": emu.url, "github_url": github.url, "github_pat": STANDIN_PAT,
             "state_dir": str(state_dir), "network": network, "started_at": time.time()}
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_dir / "state.json")
    print(json.dumps(state), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sim.stop()
    imds.stop()
    github.stop()
    emu.stop()
    (state_dir / "state.json").unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlplane.local.daemon")
    ap.add_argument("--state-dir", type=Path, default=default_state_dir())
    ap.add_argument("--aws-port", type=int, default=0)
    ap.add_argument("--github-port", type=int, default=0)
    args = ap.parse_args(argv)
    return serve(args.state_dir, args.aws_port, args.github_port)


if __name__ == "__main__":
    sys.exit(main())
