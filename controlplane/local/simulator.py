"""The instance simulator: every pool instance moto launches runs the real agent.

It lives in the emulator's process and reads moto's EC2 models directly
(``ec2_backends``, only the regions that already exist, always holding
:data:`controlplane.local.emulator.BACKEND_LOCK`). For each running instance
tagged ``runner-pool:pool`` it plays the machine:

* **boot**: after the behaviour's ``boot_delay_s`` it registers the instance
  with the IMDS stand-in and runs ``bash <user data>`` -- exactly the script
  the launch template carries, agent included -- as its own process group,
  with ``RUNNER_POOL_HOME=<work_dir>/<instance-id>`` and the other local
  overrides (AWS endpoint, fake credentials, IMDS base URL, the
  actions-runner stand-in as runner source, ``RUNNER_POOL_SHUTDOWN_CMD=true``).
* **power-off**: when the agent exits 0 it asked to shut down; the launch
  template's shutdown behaviour is ``terminate``, so the instance is
  terminated in moto. A non-zero exit or a SIGKILL leaves the instance running
  with no agent: a wedged instance, which the control plane must find.
* **stop and start** (the stopped tier): EC2's ``stop`` is an OS shutdown
  (SIGTERM, SIGKILL after ``TERMINATE_GRACE_S``) that keeps the home, the
  instance's "EBS root"; ``start`` boots it again running what the first
  boot installed in ``<home>/cloud/scripts/per-boot/``
  (``RUNNER_POOL_CLOUD_DIR``), as cloud-init runs its per-boot scripts, not
  the user data.
* **spot notices**: :meth:`Simulator.spot_notice` has the IMDS stand-in
  serve an interruption notice or a rebalance recommendation to one instance.
* **termination by anyone** (control plane, test, refresh): the agent's
  processes get SIGTERM, as an OS shutdown would send, and SIGKILL after
  ``TERMINATE_GRACE_S``. That includes ``run.sh`` and ``config.sh``, which run
  in process groups of their own: the simulator finds every process of an
  instance by the ``RUNNER_POOL_HOME`` entry in ``/proc/<pid>/environ``.

Behaviour rules, settable at run time (newest matching rule wins; ``count``
limits a rule to the next N instances it matches)::

    {"match": {"instance_type": "c7i.*", "instance_id": "i-*", "pool": "demo"},   # fnmatch patterns
     "count": null, "boot_delay_s": 0,
     "registration": "ok" | "fail" | "hang" | "delay", "registration_delay_s": 0,
     "freeze_after_s": null,      # SIGSTOP the agent: it stops heartbeating
     "kill_after_s": null,        # SIGKILL the agent: a wedged instance
     "prerunner_fail": false,     # the pre-runner shell fails
     "env": {},                   # extra environment for the agent (e.g. shorter timeouts)
     "kind": "process"}           # or "rootfs": a Debian root with namespaces of its own (below)

**Two kinds of instance.** ``process`` (the default, fast): the user data runs
as a host process group, as above. ``rootfs`` (``controlplane/local/rootfs.py``):
the same user data runs once, as root, on the first boot of a Debian bookworm
root in its own mount, PID and network namespaces, with no simulator hook but
the endpoints; python3 and boto3 come from the distribution, installed by the
bootstrap; boto3 gets the instance role's credentials from the IMDS stand-in
at 169.254.169.254. EC2's ``stop`` kills every process of the instance and
keeps its layer, ``start`` boots it again (the bootstrap's per-boot script
starts the agent), ``terminate`` removes the layer too; the agent's power-off
(``shutdown -h now``) ends the instance's PID 1 and the simulator terminates
it in EC2 (the launch template's shutdown behaviour).

Registration faults go through the GitHub stand-in (``POST /_control/faults``
with ``name_contains=<instance-id>``), so they hit ``config.sh`` exactly where
GitHub would fail it.
"""
from __future__ import annotations

import base64
import calendar
import copy
import fnmatch
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.local import rootfs
from controlplane.local.emulator import BACKEND_LOCK
from controlplane.local.imds import ImdsStandIn

log = logging.getLogger("runner_pool.simulator")

POOL_TAG = "runner-pool:pool"
RUNNER_SOURCE = Path(__file__).parent / "actions_runner"
TERMINATE_GRACE_S = 5.0          # SIGTERM -> SIGKILL when EC2 terminates an instance
STOP_WAIT_S = 5.0                # stop(): how long to wait for killed processes to go
JOIN_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
RULE_KEYS = frozenset({"match", "count", "boot_delay_s", "registration", "registration_delay_s",
                       "freeze_after_s", "kill_after_s", "prerunner_fail", "env", "kind"})
MATCH_KEYS = frozenset({"instance_type", "instance_id", "pool"})
REGISTRATION_MODES = ("ok", "fail", "hang", "delay")
KINDS = ("process", "rootfs")
LIVE_EC2_STATES = ("pending", "running")
STOPPED_EC2_STATES = ("stopping", "stopped")
INSTANCE_ROLE = "runner-pool-instance"       # the role name rootfs instances see in IMDS


@dataclass
class _Machine:
    """One simulated instance."""

    instance_id: str
    region: str
    pool: str
    instance_type: str
    rule: dict[str, Any]
    boot_at: float                               # monotonic
    home: Path
    phase: str = "booting"               # booting, running, frozen, killed, exited, shutdown, terminated
    proc: subprocess.Popen[bytes] | None = None
    started_mono: float | None = None
    started_at: float | None = None              # epoch
    exit_code: int | None = None
    frozen: bool = False
    term_sent_at: float | None = None            # monotonic, SIGTERM sent because EC2 terminated it
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    kind: str = "process"
    slot: int | None = None                      # rootfs: the link-local /30 of its veth pair
    address: str | None = None                   # rootfs: its address (IMDS knows it by this)
    boots: int = 0
    busy: bool = False                           # rootfs: a boot or teardown runs off the simulator's lock

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def view(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "region": self.region, "pool": self.pool,
                "instance_type": self.instance_type, "phase": self.phase,
                "pid": self.proc.pid if self.proc is not None else None, "exit_code": self.exit_code,
                "started_at": self.started_at, "home": str(self.home), "detail": self.detail,
                "behaviour": copy.deepcopy(self.rule), "kind": self.kind, "address": self.address,
                "boots": self.boots, "busy": self.busy}


def processes_of(home: Path, *, below: bool = False) -> list[int]:
    """Pids of every live process whose ``RUNNER_POOL_HOME`` is ``home`` (or, with ``below``, inside it)."""
    marker = b"RUNNER_POOL_HOME=" + str(home).encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                entries = fh.read().split(b"\0")
        except OSError:
            continue
        if marker in entries or (below and any(e.startswith(marker + b"/") for e in entries)):
            pids.append(int(name))
    return pids


def _shut_down(machine: _Machine, now: float) -> float:
    """An OS shutdown begins (stop or terminate): a frozen instance is thawed, then all get SIGTERM.
    Returns when it began (``term_sent_at``)."""
    machine.term_sent_at = now
    if machine.frozen:
        _signal_all(machine, signal.SIGCONT)
    _signal_all(machine, signal.SIGTERM)
    return now


def _unreaped(proc: subprocess.Popen[bytes] | None) -> int | None:
    """``proc``'s pid while it still names that process (running, or a zombie not yet reaped); else None.

    Once ``poll()`` has reaped a process its pid is free, and on a busy machine (pids wrap at
    ``pid_max``) the kernel hands it to another process: signalling it then hits a stranger.
    """
    if proc is None or proc.poll() is not None:
        return None
    return proc.pid


def _signal_all(machine: _Machine, sig: int) -> None:
    """``sig`` to the agent's group and to every process (and its group) of the instance."""
    targets = set(processes_of(machine.home))
    agent = _unreaped(machine.proc)
    if agent is not None:
        targets.add(agent)
    for pid in targets:
        for send in (os.killpg, os.kill):
            try:
                send(pid, sig)
            except OSError:
                pass


def _epoch(value: Any) -> float:
    if hasattr(value, "utctimetuple"):
        return float(calendar.timegm(value.utctimetuple()))
    return time.time()


def _user_data(raw: Any) -> bytes:
    """moto keeps user data base64-encoded (``Base64EncodedString``); older versions as a list."""
    if raw is None:
        return b""
    if isinstance(raw, list):
        raw = raw[0] if raw else None
        if raw is None:
            return b""
    if hasattr(raw, "as_bytes") and not isinstance(raw, (bytes, str)):
        raw = raw.as_bytes()                  # moto's Base64EncodedString: the base64 text itself
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
    # cloud-init runs gzip user data as the script inside (the launch template carries it gzipped).
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def validate_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``rule`` with defaults filled in; ValueError naming what is wrong."""
    if not isinstance(rule, dict):
        raise ValueError("a behaviour rule is a JSON object")
    unknown = set(rule) - RULE_KEYS
    if unknown:
        raise ValueError(f"unknown behaviour keys {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
    match = rule.get("match") or {}
    if not isinstance(match, dict) or set(match) - MATCH_KEYS:
        raise ValueError(f"match takes {sorted(MATCH_KEYS)}")
    mode = rule.get("registration", "ok")
    if mode not in REGISTRATION_MODES:
        raise ValueError(f"registration must be one of {REGISTRATION_MODES}, not {mode!r}")
    count = rule.get("count")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError("count must be a positive integer or null")
    env = rule.get("env") or {}
    if not isinstance(env, dict) or any(not isinstance(v, str) for v in env.values()):
        raise ValueError("env must map names to strings")
    kind = rule.get("kind", "process")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out = {"match": dict(match), "count": count, "boot_delay_s": float(rule.get("boot_delay_s") or 0),
           "registration": mode, "registration_delay_s": float(rule.get("registration_delay_s") or 0),
           "freeze_after_s": rule.get("freeze_after_s"), "kill_after_s": rule.get("kill_after_s"),
           "prerunner_fail": bool(rule.get("prerunner_fail", False)), "env": dict(env), "kind": kind}
    for key in ("freeze_after_s", "kill_after_s"):
        if out[key] is not None:
            out[key] = float(out[key])
    return out


class Simulator:
    """Runs the real agent for every pool instance in the emulator's EC2."""

    def __init__(self, *, aws_endpoint: str, work_dir: Path, imds: ImdsStandIn, github_url: str | None = None,
                 poll_s: float = 0.2, agent_credentials: Any = None) -> None:
        self.aws_endpoint = aws_endpoint
        # instance id -> AWS_* variables the agent signs with (the instance role's credentials when the
        # emulator enforces IAM); None: the shared "testing" keys.
        self.agent_credentials = agent_credentials
        self.work_dir = Path(work_dir)
        self.imds = imds
        self.github_url = github_url.rstrip("/") if github_url else None
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self._machines: dict[str, _Machine] = {}
        self._rules: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rootfs: rootfs.RootfsHost | None = None

    # -- public API ---------------------------------------------------------------

    def start(self) -> Simulator:
        if self._thread is not None:
            raise RuntimeError("the simulator is already running")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="instance-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, then kill every agent (and runner) process and wait, bounded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            self._thread = None
        with self._lock:
            machines = list(self._machines.values())
        busy_until = time.monotonic() + JOIN_TIMEOUT_S * 3
        while any(m.busy for m in machines) and time.monotonic() < busy_until:
            time.sleep(0.05)                         # a rootfs boot or teardown finishing (each step is bounded)
        for m in machines:
            if m.kind == "rootfs" and self._rootfs is not None:
                self._rootfs.halt(m.home, m.instance_id, m.proc, remove_layer=False)
            else:
                _signal_all(m, signal.SIGKILL)
        if self._rootfs is not None:
            self._rootfs.close()
        deadline = time.monotonic() + STOP_WAIT_S
        for m in machines:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("agent of %s did not die within %.0f s", m.instance_id, STOP_WAIT_S)
            self.imds.unregister(m.instance_id)
            if m.phase in ("booting", "running", "frozen"):
                m.phase = "stopped"

    def set_behaviour(self, rule: dict[str, Any]) -> None:
        """Add a behaviour rule for instances seen from now on (newest matching rule wins)."""
        checked = validate_rule(rule)
        with self._lock:
            self._rules.append(checked)

    def clear_behaviours(self) -> None:
        with self._lock:
            self._rules.clear()

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            views = [m.view() for m in sorted(self._machines.values(), key=lambda m: m.instance_id)]
            for v, m in zip(views, sorted(self._machines.values(), key=lambda m: m.instance_id), strict=True):
                if m.kind == "rootfs" and self._rootfs is not None and m.alive:
                    v["init_pid"] = self._rootfs.init_pid(m.proc)
            return views

    def kill_agent(self, instance_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the agent's process group (SIGKILL: the instance is left wedged)."""
        with self._lock:
            m = self._machines.get(instance_id)
            if m is None or m.proc is None:
                raise KeyError(f"no agent process for {instance_id}")
            try:
                self._signal_agent(m, sig)
            except OSError as exc:
                raise KeyError(f"agent of {instance_id} is gone: {exc}") from None
            if sig == signal.SIGKILL:
                m.phase, m.detail = "killed", "kill_agent"
            elif sig == signal.SIGSTOP:
                m.phase, m.frozen = "frozen", True
            elif sig == signal.SIGCONT and m.frozen:
                m.phase, m.frozen = "running", False

    def pids(self, instance_id: str) -> list[int]:
        """Every live process of one instance (agent, runner, scripts): for benchmarks."""
        with self._lock:
            m = self._machines.get(instance_id)
        if m is not None and m.kind == "rootfs" and self._rootfs is not None:
            return self._rootfs.pids(m.home)
        return processes_of(m.home) if m is not None else []

    def _signal_agent(self, m: _Machine, sig: int) -> None:
        """``sig`` to the agent: its process group (process kind) or its process in the instance (rootfs)."""
        if m.kind != "rootfs":
            pid = _unreaped(m.proc)
            if pid is None:
                raise OSError("the agent has exited")
            os.killpg(pid, sig)
            return
        pid = self._rootfs.agent_pid(m.home) if self._rootfs is not None else None
        if pid is None:
            raise OSError("no agent process in the instance (yet)")
        os.kill(pid, sig)

    def _rootfs_host(self) -> rootfs.RootfsHost:
        if self._rootfs is None:
            from urllib.parse import urlsplit
            aws_port = urlsplit(self.aws_endpoint).port or 80
            gh_port = urlsplit(self.github_url).port if self.github_url else None
            self._rootfs = rootfs.RootfsHost(self.work_dir, self.imds, aws_port, gh_port)
        return self._rootfs

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:                      # never let one bad tick end the simulation
                log.exception("simulator tick failed")
            self._stop.wait(self.poll_s)

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        """Pool instances moto knows, by id: state, type, placement, tags, user data."""
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        found: dict[str, dict[str, Any]] = {}
        with BACKEND_LOCK:
            account = dict.get(ec2_backends, DEFAULT_ACCOUNT_ID)
            if account is None:
                return found
            for region, backend in list(dict.items(account)):
                for inst in backend.all_instances():
                    tags = backend.tags.get(inst.id)
                    if not tags or POOL_TAG not in tags:
                        continue
                    found[inst.id] = {
                        "region": region, "state": inst._state.name, "instance_type": inst.instance_type,
                        "az": inst.placement.zone if hasattr(inst.placement, "zone") else f"{region}a",
                        "tags": dict(tags), "pool": tags[POOL_TAG], "user_data": inst.user_data,
                        "image_id": inst.image_id, "launched": inst.launch_time,
                    }
        return found

    def _tick(self) -> None:
        seen = self._snapshot()
        now = time.monotonic()
        with self._lock:
            for iid, facts in seen.items():
                if iid not in self._machines and facts["state"] in LIVE_EC2_STATES:
                    self._adopt(iid, facts, now)
            for iid, m in list(self._machines.items()):
                current = seen.get(iid)
                if current is not None:
                    m.facts = current
                self._advance(m, current, now)

    def _pick_rule(self, facts: dict[str, Any], iid: str) -> dict[str, Any]:
        for rule in reversed(self._rules):
            if rule["count"] is not None and rule["count"] <= 0:
                continue
            want = rule["match"]
            if "instance_type" in want and not fnmatch.fnmatch(facts["instance_type"], want["instance_type"]):
                continue
            if "instance_id" in want and not fnmatch.fnmatch(iid, want["instance_id"]):
                continue
            if "pool" in want and not fnmatch.fnmatch(facts["pool"], want["pool"]):
                continue
            if rule["count"] is not None:
                rule["count"] -= 1
            return copy.deepcopy(rule)
        return validate_rule({})

    def _adopt(self, iid: str, facts: dict[str, Any], now: float) -> None:
        rule = self._pick_rule(facts, iid)
        m = _Machine(iid, facts["region"], facts["pool"], facts["instance_type"], rule,
                     now + rule["boot_delay_s"], self.work_dir / iid, facts=facts, kind=rule["kind"])
        self._machines[iid] = m
        if rule["registration"] != "ok":
            self._github_fault(m)
        log.info("adopted %s (%s, pool %s)", iid, facts["instance_type"], facts["pool"])

    def _github_fault(self, m: _Machine) -> None:
        if not self.github_url:
            m.detail = "registration fault ignored: no github_url"
            return
        body = {"name_contains": m.instance_id, "mode": m.rule["registration"],
                "delay_s": m.rule["registration_delay_s"], "count": None}
        req = urllib.request.Request(f"{self.github_url}/_control/faults", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S).read()
        except OSError as exc:
            m.detail = f"registration fault not set: {exc}"
            log.warning("cannot set a registration fault for %s: %s", m.instance_id, exc)

    def _advance(self, m: _Machine, facts: dict[str, Any] | None, now: float) -> None:
        ec2_live = facts is not None and facts["state"] in LIVE_EC2_STATES
        if m.phase in ("shutdown", "terminated", "stopped") or m.busy:
            return
        if m.kind == "rootfs" and facts is not None and facts["state"] in STOPPED_EC2_STATES:
            self._on_ec2_stop(m, now)
            return
        if facts is not None and facts["state"] in STOPPED_EC2_STATES:
            self._on_process_stop(m, now)
            return
        if not ec2_live:
            self._on_terminated(m, now)
            return
        if m.phase == "halted":                          # EC2 started it again: boot from its layer
            m.phase, m.boot_at, m.exit_code, m.term_sent_at = "booting", now + m.rule["boot_delay_s"], None, None
            m.frozen, m.detail = False, "started again"
        if m.phase == "booting":
            if now >= m.boot_at:
                self._boot(m)
            return
        if m.proc is None:
            return
        code = m.proc.poll()
        if code is not None:
            if m.exit_code is None:
                m.exit_code = code
                self._on_exit(m, code)
            return
        age = now - (m.started_mono or now)
        try:
            if m.rule["kill_after_s"] is not None and age >= m.rule["kill_after_s"] and m.phase != "killed":
                self._signal_agent(m, signal.SIGKILL)
                m.phase, m.detail = "killed", f"kill_after_s={m.rule['kill_after_s']}"
            elif m.rule["freeze_after_s"] is not None and age >= m.rule["freeze_after_s"] and not m.frozen:
                self._signal_agent(m, signal.SIGSTOP)
                m.phase, m.frozen, m.detail = "frozen", True, f"freeze_after_s={m.rule['freeze_after_s']}"
        except OSError:
            pass                                         # a rootfs agent not started yet: next tick

    def _env(self, m: _Machine) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(m.home), "LANG": "C.UTF-8",
            "AWS_ENDPOINT_URL": self.aws_endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": m.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNNER_POOL_HOME": str(m.home), "RUNNER_POOL_IMDS_ENDPOINT": self.imds.base_url(m.instance_id),
            "RUNNER_POOL_RUNNER_SOURCE": str(RUNNER_SOURCE), "RUNNER_POOL_SHUTDOWN_CMD": "true",
            "RUNNER_POOL_PYTHON": sys.executable, "RUNNER_POOL_SKIP_OS_SETUP": "1",
            "RUNNER_POOL_CLOUD_DIR": str(m.home / "cloud"),
        }
        if self.agent_credentials is not None:
            env.update(self.agent_credentials(m.instance_id))
        if self.github_url:
            env["RP_GITHUB_URL"] = self.github_url            # locally, the stand-in is the only GitHub
        if m.rule["prerunner_fail"]:
            shell = self.work_dir / "_sim" / "failing-shell.sh"
            script = self.work_dir / "_sim" / "prerunner.sh"
            shell.parent.mkdir(parents=True, exist_ok=True)
            shell.write_text("#!/bin/sh\necho 'simulated pre-runner failure' >&2\nexit 3\n")
            shell.chmod(0o755)
            script.write_text("# stands in for the pool's pre-runner script; the failing shell ignores it\n")
            env["RUNNER_POOL_PRERUNNER_SHELL"] = str(shell)
            env["RP_PRERUNNER_FILE"] = str(script)
        env.update(m.rule["env"])
        return env

    def _rootfs_env(self, m: _Machine) -> dict[str, str]:
        """What a rootfs instance's init gets: the endpoints and the runner source, nothing else."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/root", "RUNNER_POOL_RUNNER_SOURCE": rootfs.RUNNER_MOUNT}
        if m.rule["prerunner_fail"]:
            env["RUNNER_POOL_PRERUNNER_SHELL"] = "/opt/rp-sim/failing-shell.sh"
            env["RP_PRERUNNER_FILE"] = "/opt/rp-sim/prerunner.sh"
        env.update(m.rule["env"])
        return env

    def _boot(self, m: _Machine) -> None:
        facts = m.facts
        user_data = _user_data(facts.get("user_data"))
        if not user_data.strip():
            m.phase, m.detail = "exited", "no user data: nothing to run"
            return
        if m.kind == "rootfs":
            self._boot_rootfs(m, user_data)
            return
        m.home.mkdir(parents=True, exist_ok=True)
        (m.home / "cloud").mkdir(exist_ok=True)
        if m.boots == 0:                             # first boot: cloud-init runs the user data
            script = m.home / "user-data"
            script.write_bytes(user_data)
            argv = ["bash", str(script)]
        else:                                        # later boots: only what the instance installed
            per_boot = m.home / "cloud" / "scripts" / "per-boot"
            if not any(per_boot.glob("*")):
                m.phase, m.detail = "exited", "started again, but nothing is installed in scripts/per-boot"
                return
            argv = ["/bin/sh", "-c", 'for s in "$0"/*; do [ -x "$s" ] && "$s"; done', str(per_boot)]
        self.imds.register(m.instance_id, m.instance_type, facts["az"], m.region, self._account(),
                           user_data, facts["tags"], image_id=facts.get("image_id") or "ami-00000000",
                           pending_time=_epoch(facts.get("launched")))
        with open(m.home / "console.log", "ab") as console:
            m.proc = subprocess.Popen(argv, cwd=m.home, env=self._env(m),
                                      stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        m.boots += 1
        m.started_mono, m.started_at, m.phase = time.monotonic(), time.time(), "running"
        log.info("booted %s (boot %d): pid %d", m.instance_id, m.boots, m.proc.pid)

    def _on_process_stop(self, m: _Machine, now: float) -> None:
        """EC2 stops a process-kind instance: an OS shutdown (SIGTERM, SIGKILL after the grace) that
        keeps its home, as a stopped instance keeps its EBS root; ``start`` boots it again."""
        if m.phase == "halted":
            return
        if m.proc is None:
            m.phase, m.detail = "halted", "stopped before it booted"
            return
        sent = m.term_sent_at if m.term_sent_at is not None else _shut_down(m, now)
        if m.proc.poll() is None and now - sent < TERMINATE_GRACE_S:
            return
        _signal_all(m, signal.SIGKILL)
        self.imds.unregister(m.instance_id)
        m.proc, m.phase, m.detail, m.frozen = None, "halted", "stopped in EC2: home kept", False

    def spot_notice(self, instance_id: str, kind: str, action: str = "terminate") -> dict[str, Any]:
        """Make IMDS announce a spot interruption (``instance-action``) or a rebalance recommendation
        to one instance, as EC2 does; the instance itself is left running (the control plane ends it)."""
        with self._lock:
            if instance_id not in self._machines:
                raise KeyError(f"no simulated instance {instance_id}")
        return self.imds.notify(instance_id, kind, action)

    def _in_background(self, m: _Machine, what: str, fn: Any) -> None:
        """``fn()`` in a thread of its own: rootfs boots and teardowns run commands (mount, ip, umount)
        that must not hold the simulator's lock, which every control call and tick takes."""
        m.busy = True

        def body() -> None:
            try:
                fn()
            except Exception:                        # logged: the tick goes on with the next state
                log.exception("rootfs %s of %s failed", what, m.instance_id)
            finally:
                with self._lock:
                    m.busy = False

        threading.Thread(target=body, name=f"rootfs-{what}-{m.instance_id}", daemon=True).start()

    def _boot_rootfs(self, m: _Machine, user_data: bytes) -> None:
        facts = m.facts
        host = self._rootfs_host()
        m.phase = "starting"

        def boot() -> None:
            try:
                host.ensure()
                if m.slot is None:
                    m.slot = host.slot()
                address = rootfs.slot_addresses(m.slot)[1]
                keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing"}
                if self.agent_credentials is not None:          # the instance role's session (IAM enforced)
                    keys.update(self.agent_credentials(m.instance_id))
                self.imds.register(m.instance_id, m.instance_type, facts["az"], m.region, self._account(),
                                   user_data, facts["tags"], image_id=facts.get("image_id") or "ami-00000000",
                                   pending_time=_epoch(facts.get("launched")), address=address, role=INSTANCE_ROLE,
                                   credentials={"AccessKeyId": keys["AWS_ACCESS_KEY_ID"],
                                                "SecretAccessKey": keys["AWS_SECRET_ACCESS_KEY"],
                                                "Token": keys.get("AWS_SESSION_TOKEN", "")})
                if self._stop.is_set():
                    raise rootfs.RootfsError("the simulator is stopping")
                with open(self._console(m), "ab") as console:
                    proc, _ = host.boot(m.home, m.instance_id, m.slot, user_data, self._rootfs_env(m), console)
            except (rootfs.RootfsError, OSError, subprocess.SubprocessError) as exc:
                with self._lock:
                    m.phase, m.detail = "exited", f"rootfs boot failed: {exc}"
                log.error("rootfs boot of %s failed: %s", m.instance_id, exc)
                return
            with self._lock:
                m.proc, m.address, m.boots = proc, address, m.boots + 1
                m.started_mono, m.started_at, m.phase = time.monotonic(), time.time(), "running"
            log.info("booted rootfs %s (boot %d): pid %d, %s", m.instance_id, m.boots, proc.pid, address)

        self._in_background(m, "boot", boot)

    def _console(self, m: _Machine) -> Path:
        m.home.mkdir(parents=True, exist_ok=True)
        return m.home / "console.log"

    def _on_ec2_stop(self, m: _Machine, now: float) -> None:
        """EC2 stops a rootfs instance: an OS shutdown, then its namespaces go; its layer stays."""
        if m.phase in ("halted", "booting"):
            if m.phase == "booting" and m.proc is None:
                m.phase, m.detail = "halted", "stopped before it booted"
            return
        if m.term_sent_at is None:
            m.term_sent_at = now
            if self._rootfs is not None:
                self._rootfs.power_off(m.proc)
        if m.proc is not None and m.proc.poll() is None and now - m.term_sent_at < TERMINATE_GRACE_S:
            return
        host, proc = self._rootfs, m.proc
        self.imds.unregister(m.instance_id)
        m.proc, m.phase, m.detail, m.frozen = None, "halted", "stopped in EC2: layer kept", False
        if host is not None:
            self._in_background(m, "stop", lambda: host.halt(m.home, m.instance_id, proc, remove_layer=False))

    @staticmethod
    def _account() -> str:
        from moto.core.models import DEFAULT_ACCOUNT_ID
        return str(DEFAULT_ACCOUNT_ID)

    def _on_exit(self, m: _Machine, code: int) -> None:
        if code == 0 and m.term_sent_at is None:
            m.phase, m.detail = "shutdown", "agent powered off: instance terminated"
            if m.kind == "rootfs":
                self._release_rootfs(m)
            else:
                _signal_all(m, signal.SIGKILL)       # anything the agent left behind dies with the machine
            self._terminate_in_ec2(m)
            self.imds.unregister(m.instance_id)
        elif m.phase not in ("killed", "terminated"):
            m.phase, m.detail = "exited", f"agent exited {code}: instance left running without an agent"

    def _terminate_in_ec2(self, m: _Machine) -> None:
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        with BACKEND_LOCK:
            backend = dict.get(dict.get(ec2_backends, DEFAULT_ACCOUNT_ID) or {}, m.region)
            if backend is None:
                return
            try:
                backend.terminate_instances([m.instance_id])
            except Exception as exc:  # noqa: BLE001 - already gone, or moto refuses: note it
                m.detail = f"terminate failed: {exc}"

    def _on_terminated(self, m: _Machine, now: float) -> None:
        """EC2 says the instance is gone: SIGTERM (an OS shutdown), SIGKILL after the grace."""
        if m.kind == "rootfs":
            self._rootfs_terminated(m, now)
            return
        sent = m.term_sent_at
        if sent is None:
            sent = _shut_down(m, now)
            if m.phase == "booting":
                m.phase, m.detail = "terminated", "terminated before it booted"
                return
        if m.proc is not None and m.proc.poll() is None and now - sent < TERMINATE_GRACE_S:
            return
        _signal_all(m, signal.SIGKILL)
        if m.proc is not None:
            m.exit_code = m.proc.poll() if m.exit_code is None else m.exit_code
        m.phase, m.detail = "terminated", "terminated in EC2"
        self.imds.unregister(m.instance_id)

    def _rootfs_terminated(self, m: _Machine, now: float) -> None:
        if m.proc is not None and m.phase not in ("halted", "booting"):
            if m.term_sent_at is None:
                m.term_sent_at = now
                if self._rootfs is not None:
                    self._rootfs.power_off(m.proc)
            if m.proc.poll() is None and now - m.term_sent_at < TERMINATE_GRACE_S:
                return
            m.exit_code = m.proc.poll() if m.exit_code is None else m.exit_code
        self._release_rootfs(m)
        m.phase, m.detail = "terminated", "terminated in EC2"
        self.imds.unregister(m.instance_id)

    def _release_rootfs(self, m: _Machine) -> None:
        """Terminated: namespaces, mounts and the layer go (off the lock); then the slot is free again."""
        host, proc, slot = self._rootfs, m.proc, m.slot
        if host is None:
            return

        def teardown() -> None:
            host.halt(m.home, m.instance_id, proc, remove_layer=True)
            host.release(slot)

        self._in_background(m, "terminate", teardown)
