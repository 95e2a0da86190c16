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

With ``enforce_iam`` (``runner-pool local start --enforce-iam``) moto checks
every request against the signer's IAM policies (see
:func:`controlplane.local.emulator.enforce_iam`), and nobody signs with the
``testing`` keys any more:

* the daemon itself signs as ``runner-pool-local-admin`` (``*`` on ``*``: it
  builds the network and the principals below, nothing else);
* ``POST /_emulator/iam/pool {"pool": <pool config>}`` creates, for that pool,
  the IAM user ``runner-pool-<name>-control-plane`` holding exactly
  :func:`controlplane.iam.control_plane_policy` and returns its access key,
  and puts exactly :func:`controlplane.iam.instance_policy` on the local
  instance role (``runner-pool-local``, in profile ``runner-pool-local``);
  ``--config FILE`` does this at start, and ``local env`` then exports that
  user's key; ``POST /_emulator/iam/agent {"instance_id"}`` returns a session
  of the instance role as an agent gets it;
* every simulated agent gets its own STS session of the instance role
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``), as
  an instance profile would hand it out, so it holds the instance policy and
  nothing else.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
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
ADMIN_USER = "runner-pool-local-admin"
AGENT_SESSION_S = 43200               # an agent's role session outlives any test or demo
STANDIN_PAT = "standin-pat"
AZS = ("us-east-1a", "us-east-1b", "us-east-1c")


def default_state_dir() -> Path:
    return Path(os.environ.get("RUNNER_POOL_LOCAL_DIR") or Path.home() / ".runner-pool" / "local")


def aws_env(aws_url: str, key: dict[str, str] | None = None) -> dict[str, str]:
    key = key or {"access_key_id": "testing", "secret_access_key": "testing"}
    return {"AWS_ENDPOINT_URL": aws_url, "AWS_ACCESS_KEY_ID": key["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
            "AWS_DEFAULT_REGION": LOCAL_REGION, "AWS_REGION": LOCAL_REGION}


def _iam_client(aws_url: str, key: dict[str, str]) -> Any:
    import boto3

    return boto3.client("iam", endpoint_url=aws_url, region_name=LOCAL_REGION,
                        aws_access_key_id=key["access_key_id"], aws_secret_access_key=key["secret_access_key"])


def _new_key(iam: Any, user: str) -> dict[str, str]:
    k = iam.create_access_key(UserName=user)["AccessKey"]
    return {"access_key_id": k["AccessKeyId"], "secret_access_key": k["SecretAccessKey"]}


def create_admin(aws_url: str) -> dict[str, str]:
    """The daemon's own principal once IAM is enforced (made while moto still lets everyone in)."""
    iam = _iam_client(aws_url, {"access_key_id": "testing", "secret_access_key": "testing"})
    iam.create_user(UserName=ADMIN_USER)
    iam.put_user_policy(UserName=ADMIN_USER, PolicyName="admin", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    return {**_new_key(iam, ADMIN_USER), "user": ADMIN_USER}


def pool_principals(aws_url: str, admin: dict[str, str], raw_pool: dict[str, Any]) -> dict[str, Any]:
    """The pool's control-plane user (exactly its generated policy) and the instance role's policy."""
    from moto.core.models import DEFAULT_ACCOUNT_ID

    from controlplane.config import parse_config
    from controlplane.iam import control_plane_policy, instance_policy

    cfg = parse_config(raw_pool, "pool")
    account = str(DEFAULT_ACCOUNT_ID)
    iam = _iam_client(aws_url, admin)
    user = f"runner-pool-{cfg.name}-control-plane"
    try:
        iam.create_user(UserName=user)
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    cp = control_plane_policy(cfg, account, "aws", instance_role=LOCAL_PROFILE)
    iam.put_user_policy(UserName=user, PolicyName="runner-pool-control-plane", PolicyDocument=json.dumps(cp))
    inst = instance_policy(cfg, account, "aws")
    iam.put_role_policy(RoleName=LOCAL_PROFILE, PolicyName=f"runner-pool-{cfg.name}",
                        PolicyDocument=json.dumps(inst))
    return {"pool": cfg.name, "user": user, **_new_key(iam, user), "instance_role": LOCAL_PROFILE,
            "control_plane_policy": cp, "instance_policy": inst}


def agent_credentials(instance_id: str) -> dict[str, str]:
    """An STS session of the local instance role for one instance, as its instance profile would serve."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.sts.models import sts_backends

    from controlplane.local.emulator import BACKEND_LOCK

    with BACKEND_LOCK:
        role = sts_backends[DEFAULT_ACCOUNT_ID]["aws"].assume_role(
            region_name=LOCAL_REGION, role_session_name=instance_id,
            role_arn=f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/{LOCAL_PROFILE}",
            policy=None, duration=AGENT_SESSION_S, external_id=None)  # type: ignore[arg-type]  # moto takes None
    return {"AWS_ACCESS_KEY_ID": role.access_key_id, "AWS_SECRET_ACCESS_KEY": role.secret_access_key,
            "AWS_SESSION_TOKEN": role.session_token}


def build_network(aws_url: str, key: dict[str, str] | None = None) -> dict[str, Any]:
    """Seed moto and create the fixed local network; same ids on every fresh start."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{aws_url}/moto-api/seed?a={LOCAL_SEED}", method="POST"),
                           timeout=10).read()
    key = key or {"access_key_id": "testing", "secret_access_key": "testing"}
    kw: dict[str, Any] = {"endpoint_url": aws_url, "region_name": LOCAL_REGION, "aws_access_key_id": key["access_key_id"],
          "aws_secret_access_key": key["secret_access_key"]}
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

    def spot(data: dict[str, Any]) -> tuple[int, Any]:
        try:
            return 200, sim.spot_notice(str(data["instance_id"]), str(data.get("kind", "instance-action")),
                                        str(data.get("action", "terminate")))
        except KeyError as exc:
            return 404, {"error": str(exc)}
        except ValueError as exc:
            return 400, {"error": str(exc)}

    return {("POST", "/_emulator/sim/behaviour"): behaviour, ("DELETE", "/_emulator/sim/behaviour"): clear,
            ("GET", "/_emulator/sim/status"): status, ("POST", "/_emulator/sim/kill"): kill,
            ("POST", "/_emulator/sim/spot"): spot}


def _iam_hooks(aws_url: str, admin: dict[str, str]) -> dict[tuple[str, str], Any]:
    def pool(data: dict[str, Any]) -> tuple[int, Any]:
        if not isinstance(data.get("pool"), dict):
            return 400, {"error": "need {\"pool\": <pool config>}"}
        from controlplane.errors import ConfigErrors
        try:
            return 200, pool_principals(aws_url, admin, data["pool"])
        except ConfigErrors as exc:
            return 400, {"error": "; ".join(exc.problems)}

    def agent(data: dict[str, Any]) -> tuple[int, Any]:
        iid = data.get("instance_id")
        if not isinstance(iid, str) or not iid.startswith("i-"):
            return 400, {"error": "need {\"instance_id\": \"i-...\"}"}
        return 200, agent_credentials(iid)

    # /_emulator/iam/agent: what an instance's profile would hand its agent (tests attack with it)
    return {("POST", "/_emulator/iam/pool"): pool, ("POST", "/_emulator/iam/agent"): agent}


def _on_signal(signum: int, stop: threading.Event) -> None:
    """SIGTERM, SIGINT and SIGHUP stop the daemon; a stray SIGUSR1/2 (whose default would kill it
    without a word) is ignored. Each is written to daemon.log, so a daemon that went away says why."""
    name = signal.Signals(signum).name
    verdict = "stopping" if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) else "ignored"
    logging.getLogger("runner_pool.daemon").warning("%s received: %s", name, verdict)
    if verdict == "stopping":
        stop.set()


def _diagnostics() -> None:
    """What daemon.log needs to explain a death: timestamps, fatal-signal tracebacks, dying threads."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    faulthandler.enable()
    log = logging.getLogger("runner_pool.daemon")

    def thread_died(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        log.error("thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value,
                  exc_info=args.exc_value if args.exc_value is not None else False)

    threading.excepthook = thread_died
    log.warning("daemon pid %d starting", os.getpid())


def serve(state_dir: Path, aws_port: int = 0, github_port: int = 0, enforce_iam: bool = False,
          pool_config: Path | None = None) -> int:
    from controlplane.local import emulator
    from controlplane.local.github_standin import GitHubStandIn
    from controlplane.local.imds import ImdsStandIn
    from controlplane.local.simulator import Simulator

    _diagnostics()
    state_dir.mkdir(parents=True, exist_ok=True)
    emu = emulator.Emulator(aws_port).start()
    admin = create_admin(emu.url) if enforce_iam else None
    network = build_network(emu.url, admin)
    iam_state: dict[str, Any] = {"enforced": enforce_iam}
    if admin is not None:
        emulator.enforce_iam()
        emulator.CONTROL_HOOKS.update(_iam_hooks(emu.url, admin))
        iam_state["admin"] = admin
        if pool_config is not None:
            from controlplane.config import load_config
            cfg = load_config(str(pool_config))
            principals = pool_principals(emu.url, admin, json.loads(cfg.to_json()))
            iam_state["env_key"] = {k: principals[k] for k in ("access_key_id", "secret_access_key", "user")}
    github = GitHubStandIn(port=github_port, pat=STANDIN_PAT)
    github.start()
    imds = ImdsStandIn()
    imds.start()
    os.environ.update(aws_env(emu.url, admin))
    sim = Simulator(aws_endpoint=emu.url, work_dir=state_dir / "instances", imds=imds, github_url=github.url,
                    agent_credentials=agent_credentials if enforce_iam else None)
    sim.start()
    emulator.CONTROL_HOOKS.update(_sim_hooks(sim))
    state = {"pid": os.getpid(), "aws_url": emu.url, "github_url": github.url, "github_pat": STANDIN_PAT,
             "state_dir": str(state_dir), "network": network, "started_at": time.time(), "iam": iam_state}
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_dir / "state.json")
    print(json.dumps(state), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: _on_signal(signum, stop))
    stop.wait()
    sim.stop()
    imds.stop()
    github.stop()
    emu.stop()
    (state_dir / "state.json").unlink(missing_ok=True)
    logging.getLogger("runner_pool.daemon").warning("daemon pid %d stopped", os.getpid())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlplane.local.daemon")
    ap.add_argument("--state-dir", type=Path, default=default_state_dir())
    ap.add_argument("--aws-port", type=int, default=0)
    ap.add_argument("--github-port", type=int, default=0)
    ap.add_argument("--enforce-iam", action="store_true", help="moto enforces IAM; see the module docstring")
    ap.add_argument("--config", type=Path, default=None, help="with --enforce-iam: the pool to make principals for")
    args = ap.parse_args(argv)
    return serve(args.state_dir, args.aws_port, args.github_port, args.enforce_iam, args.config)


if __name__ == "__main__":
    sys.exit(main())
