"""Attack tests as a job would run them: the real unprivileged ``runner`` user inside a rootfs instance.

The bootstrap (controlplane/agent/bootstrap.sh) creates the user, keeps the
agent's directory root-only, and blocks IMDS for the user's uid with an
iptables owner rule; the agent runs config.sh and run.sh as that user. Each
attack below is a Python script the test pipes into ``python3`` running as
``runner`` in the instance's own namespaces (``rootfs.exec_in``: ``nsenter`` +
``runuser``), with the pool's tokens on its stdin so that it can look for
them without putting them in its own argv or environment.
"""
from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from controlplane import token
from tests.conftest import Emu, run_cli
from tests.factories import run_id
from tests.reliability.invariants import check
from tests.rootfs.conftest import init_pid, inside, rootfs_pool

pytestmark = pytest.mark.usefixtures("rootfs_root")

LOOK = r"""
import json, os, socket, sys
secrets = [s.encode() for s in sys.stdin.read().split() if s]
out = {"uid": os.getuid(), "agent_dir": "", "agent_file": "", "imds": "", "argv": [], "environ": [],
       "files": [], "procs_read": 0, "files_read": 0}
try:
    os.listdir("/opt/runner-pool"); out["agent_dir"] = "listed"
except OSError as exc:
    out["agent_dir"] = type(exc).__name__
try:
    open("/opt/runner-pool/agent.py").read(); out["agent_file"] = "read"
except OSError as exc:
    out["agent_file"] = type(exc).__name__
try:
    s = socket.create_connection(("169.254.169.254", 80), timeout=3)
    s.sendall(b"PUT /latest/api/token HTTP/1.0\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n")
    out["imds"] = "answered: " + s.recv(200).decode(errors="replace").splitlines()[0]
except OSError as exc:
    out["imds"] = "blocked: " + type(exc).__name__
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for part in ("cmdline", "environ"):
        try:
            data = open(f"/proc/{pid}/{part}", "rb").read()
        except OSError:
            continue
        out["procs_read"] += 1
        if any(s in data for s in secrets):
            out["argv" if part == "cmdline" else "environ"].append(data.replace(b"\0", b" ").decode(errors="replace")[:200])
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files:
        path = os.path.join(top, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            data = open(path, "rb").read(4 << 20)
        except OSError:
            continue
        out["files_read"] += 1
        if any(s in data for s in secrets):
            out["files"].append(path)
print(json.dumps(out))
"""

# A process a previous job left behind, watching every process for a token while the next run registers.
WATCH = r"""
import json, os, sys, time
secrets = [s.encode() for s in sys.stdin.read().split() if s]
seen, end = [], time.time() + float(os.environ.get("WATCH_S", "60"))
while time.time() < end and not seen:
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        for part in ("cmdline", "environ"):
            try:
                data = open(f"/proc/{pid}/{part}", "rb").read()
            except OSError:
                continue
            if any(s in data for s in secrets):
                seen.append(part + ": " + " ".join(a.decode(errors="replace") for a in data.split(b"\0")[:3]))
    time.sleep(0.002)
print(json.dumps(seen))
"""



def provision_one(pool: Any, rid: str) -> str:
    p = run_cli("provision", "--pool", pool.config.name, "--run-id", rid, "--resource-class", "small", "--json",
                timeout=600)
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["ok"], p.stdout + p.stderr
    (iid,) = [m["id"] for m in out["instances"]]
    return str(iid)


def secrets_of(pool: Any) -> str:
    stored = token.read_tokens(pool.config)
    assert stored is not None and stored.registration          # the pool's only runner secret now
    return f"{stored.registration}\n"


def look(emu: Emu, iid: str, pool: Any, user: str | None = "runner") -> dict[str, Any]:
    p = inside(emu, iid, ["python3", "-"], user=user, input_text=LOOK.replace("sys.stdin.read()", repr(secrets_of(pool))))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def test_a_job_as_the_runner_user_cannot_read_the_agent_reach_imds_use_sudo_or_find_a_token(make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu)
    iid = provision_one(pool, run_id())
    seen = look(emu, iid, pool)
    assert seen["uid"] != 0
    assert seen["agent_dir"] == "PermissionError" and seen["agent_file"] == "PermissionError", seen
    assert seen["imds"].startswith("blocked:"), seen["imds"]
    assert seen["argv"] == [] and seen["environ"] == [], seen
    assert seen["files"] == [], seen["files"]
    assert seen["procs_read"] > 4 and seen["files_read"] > 1000, "the search must have looked somewhere"
    no_sudo = inside(emu, iid, ["sudo", "-n", "true"], user="runner")
    assert no_sudo.returncode != 0 and "password is required" in no_sudo.stderr, no_sudo.stderr
    # The same search as root finds what the runner user was denied: the boundary is the user, not the test.
    as_root = look(emu, iid, pool, user=None)
    assert as_root["agent_file"] == "read" and as_root["imds"].startswith("answered: HTTP/1.0 200"), as_root
    check(pool, emu)


def test_a_process_left_behind_by_a_job_finds_no_token_when_the_next_run_registers(make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu)
    first = run_id()
    iid = provision_one(pool, first)
    released = run_cli("release", "--pool", pool.config.name, "--run-id", first)
    assert released.returncode == 0, released.stderr
    watcher = subprocess.Popen(
        ["nsenter", "--target", str(init_pid(emu, iid)), "--mount", "--pid", "--net", "--root", "--wd",
         "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/bin", "WATCH_S=120", "setsid", "--wait", "runuser", "-u", "runner", "--",
         "python3", "-c", WATCH], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert watcher.stdin is not None
    watcher.stdin.write(secrets_of(pool))
    watcher.stdin.close()
    time.sleep(1)                                   # the watcher is looking before the next run claims the instance
    assert provision_one(pool, run_id()) == iid
    assert watcher.stdout is not None
    try:
        watcher.wait(timeout=150)
        out = watcher.stdout.read()
    finally:
        watcher.kill()
    assert json.loads(out or "[]") == [], f"a leftover job process saw a token: {out}"


def test_with_runner_sudo_a_job_can_read_the_agent_and_reach_imds(make_pool: Any, emu: Emu) -> None:
    """The documented cost of ``runner_sudo: true``: root, so the agent's files and the instance's identity."""
    pool = rootfs_pool(make_pool, emu, runner_sudo=True)
    iid = provision_one(pool, run_id())
    agent = inside(emu, iid, ["sudo", "-n", "head", "-c", "30", "/opt/runner-pool/agent.py"], user="runner")
    assert agent.returncode == 0 and agent.stdout, agent.stderr
    imds = inside(emu, iid, ["sudo", "-n", "curl", "-sf", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                             "http://169.254.169.254/latest/api/token"], user="runner")
    assert imds.returncode == 0 and imds.stdout.strip(), imds.stderr
    plain = inside(emu, iid, ["curl", "-s", "--max-time", "3", "http://169.254.169.254/latest/api/token"], user="runner")
    assert plain.returncode != 0, "without sudo the rule still blocks the runner user"

