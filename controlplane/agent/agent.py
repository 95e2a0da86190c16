"""The instance agent: one process per EC2 instance, from boot to power-off.

Contract (docs/architecture.md): the agent learns who it is from IMDSv2 only,
reads only its own state row (``pk=<instance ARN>, sk=state``, consistent
GetItem) and writes only its own agent row (``pk=agent#<ARN>, sk=agent``,
always UpdateItem, never PutItem, only the attributes of
``controlplane.records.AGENT_ATTRIBUTES``); the instance policy pins it to
exactly that, and grants no SSM at all. The control plane moves the state row
and the agent follows it:

* the row names a run (state created/claimed/running) **and holds a
  registration credential** -> register a runner named ``<instance-id>-<n>``,
  labelled ``<run>,<pool label>`` (``--no-default-labels``: no label of its
  own), start ``run.sh`` and signal ``registered`` with the runner's GitHub
  id, which stays in the agent row for as long as the runner is registered.
  What it registers with is in the row itself, put there by the control
  plane for this one registration: ``registration_token`` (``config.sh``) or
  ``jit_config`` (ephemeral: ``run.sh`` alone). The commit or rollback
  removes it from the row; the agent keeps it only in memory while
  ``config.sh`` runs and hands it over in the environment
  (``ACTIONS_RUNNER_INPUT_TOKEN`` / ``..._JITCONFIG``), never argv or a file.
  A credential for another run while a runner is registered means the control
  plane chose a fresh registration (a relabel fallback): the old runner is
  stopped and wiped first;
* the row names a run without a credential, or the instance is back ``idle``
  -> nothing: the control plane relabels the listening runner itself (a warm
  hit changes labels through GitHub's API, release removes them), so the
  runner stays registered and ``run.sh`` keeps listening across runs;
* the row is ``draining`` (release of a busy runner, re-registration pools,
  rollback of a fresh registration) or gone -> stop ``run.sh``, wipe the
  runner's local credential files and signal ``deregistered`` for the run
  that was cleared. The control plane removes the runner from GitHub through
  the REST API (the instance holds no removal token); only after that may it
  register again;
* the row is ``terminated``, its threshold passed 60 s ago, it never appeared,
  the instance is too old, DynamoDB has been unreachable too long, or
  registration keeps failing -> signal ``shutdown`` and power off. No
  instance outlives its row, and no agent waits forever.

When ``RP_RUNNER_USER`` names a user and the agent is root, ``config.sh``
and ``run.sh`` (so every job) run as that user, with its own HOME and an
environment that carries nothing of the agent's (no AWS or RP_* variables);
``RUNNER_ALLOW_RUNASROOT`` is set only when no runner user is configured.

Why it differs from the reference's bash loop (notes §11, §14): the
heartbeat runs from the agent's first second (the reference only beat after
the pre-runner script and the download, so a slow bootstrap looked dead); an
instance whose row never appears still shuts itself down; every wait has a
deadline; no secret outlives the registration it was delivered for.

Python >= 3.9, stdlib + boto3 only: this exact file ships (comments blanked)
inside the user data, and the local simulator runs that same user data.
Configuration is the environment: the ``RP_*`` values the user data bakes
and the ``RUNNER_POOL_*`` overrides (see docs/architecture.md and ``NUMBERS``
below). Logs are one JSON line per event on stderr, with secrets scrubbed.
"""
from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

RUN_STATES = ("created", "claimed", "running")     # a run_id in these states means: be registered for it
ROW_TTL_S = 86400                                  # each heartbeat pushes the agent row's TTL a day ahead
LISTENING = b"Listening for Jobs"
RUNNER_DELETED = 2                                 # run.sh exit code: the runner was deleted on GitHub
LOCAL_FILES = (".runner", ".credentials", ".credentials_rsaparams")
REQUIRED = ("RP_TABLE", "RP_GITHUB_URL", "RP_GITHUB_SCOPE", "RP_POOL_LABEL")
TOKEN_ATTR, JIT_ATTR = "registration_token", "jit_config"     # state-row credentials (controlplane.records)
# What the runner's processes inherit from the agent's environment: nothing else (no AWS_*, no RP_*).
# RUNNER_POOL_HOME is a path, not a secret: the local simulator finds an instance's processes by it.
# Proxies (*_proxy, any case) pass too, and RUNNER_POOL_STANDIN_* (the local runner stand-in's knobs).
RUNNER_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "RUNNER_POOL_PYTHON", "RUNNER_POOL_HOME")
# Tunables (environment name -> default); Cfg exposes RP_HEARTBEAT_S as cfg.heartbeat_s and so on.
NUMBERS = {
    "RP_HEARTBEAT_S": 5, "RP_LOST_CONTACT_S": 300, "RP_MAX_LIFETIME_S": 86400, "RP_NO_ROW_TIMEOUT_S": 600,
    "RP_REGISTRATION_ATTEMPTS": 3,
    "RP_REGISTRATION_TIMEOUT_S": 60,     # one config.sh run (it may hang: its group is killed then)
    "RP_REGISTRATION_BACKOFF_S": 2,      # pause before the 2nd attempt, doubled for each next one
    "RP_LISTEN_TIMEOUT_S": 60,           # wait for run.sh to print "Listening for Jobs"
    "RP_STOP_TIMEOUT_S": 30,             # run.sh: SIGTERM, then SIGKILL after this
    "RP_PRERUNNER_TIMEOUT_S": 900,
    "RP_IDLE_POLL_S": 0.5,               # state-row poll while holding no registration (waiting for one)
    "RP_RUN_POLL_S": 1,                  # ... and while registered (user data: 1 s, or 5 s when relabelling)
    "RP_THRESHOLD_GRACE_S": 60, "RP_IMDS_TIMEOUT_S": 120,
}
AWS_ERRORS = (ClientError, BotoCoreError, ValueError, KeyError, TypeError)
# IMDS paths EC2 fills when it will reclaim a spot instance (two minutes' notice) or recommends replacing it.
SPOT_NOTICES = ("/latest/meta-data/spot/instance-action", "/latest/meta-data/events/recommendations/rebalance")
PROC_CHECK_S = 0.5                      # between row polls, how often a dead run.sh is looked for (no I/O)


class AgentError(Exception):
    """The agent cannot work at all (no config, no IMDS): it powers the instance off."""


class Cfg:
    """The environment, checked once."""

    def __init__(self, env: dict[str, str]) -> None:
        missing = [k for k in REQUIRED if not env.get(k)]
        if missing:
            raise AgentError("missing environment: " + ", ".join(missing))
        self.pool = env.get("RP_POOL", "")
        self.table = env["RP_TABLE"]
        self.region = env.get("RP_REGION", "")
        self.runner_user = env.get("RP_RUNNER_USER") or ""
        self.url = env["RP_GITHUB_URL"].rstrip("/") + "/" + env["RP_GITHUB_SCOPE"].strip("/")
        self.label = env["RP_POOL_LABEL"]
        self.home = env.get("RUNNER_POOL_HOME") or "/opt/runner-pool"
        self.runner_dir = env.get("RUNNER_POOL_RUNNER_DIR") or os.path.join(self.home, "actions-runner")
        self.prerunner = env.get("RP_PRERUNNER_FILE") or os.path.join(self.home, "prerunner.sh")
        self.shell = shlex.split(env.get("RUNNER_POOL_PRERUNNER_SHELL") or "/bin/bash")
        self.imds = (env.get("RUNNER_POOL_IMDS_ENDPOINT") or "http://169.254.169.254").rstrip("/")
        self.endpoint = env.get("AWS_ENDPOINT_URL") or None
        for name, default in NUMBERS.items():
            try:
                value = float(env.get(name) or default)
            except ValueError:
                raise AgentError(f"{name}={env.get(name)!r} is not a number") from None
            setattr(self, name[3:].lower(), max(0.0, value))
        self.attempts = max(1, int(self.registration_attempts))
        self.runner_as: dict[str, Any] | None = None     # Popen user/group/extra_groups for the runner
        self.runner_home = env.get("HOME") or "/root"
        if self.runner_user and os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(self.runner_user)
            except KeyError:
                raise AgentError(f"RP_RUNNER_USER={self.runner_user!r}: no such user") from None
            self.runner_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "umask": 0o077}
            self.runner_home = pw.pw_dir

    def runner_env(self, **extra: str) -> dict[str, str]:
        """The runner's environment: the allow-list above, its user's HOME, and ``extra``."""
        env = {k: v for k, v in os.environ.items()
               if k in RUNNER_ENV or k.lower().endswith("_proxy") or k.startswith("RUNNER_POOL_STANDIN_")}
        env["HOME"] = self.runner_home
        if self.runner_user:
            env["USER"] = env["LOGNAME"] = self.runner_user
        else:
            env["RUNNER_ALLOW_RUNASROOT"] = "1"     # the process kind runs us as root, with no runner user
        env.update(extra)
        return env


def shutdown_cmd() -> list[str]:
    return shlex.split(os.environ.get("RUNNER_POOL_SHUTDOWN_CMD") or "shutdown -h now")


class Log:
    """``log(event, detail, **fields)``: one JSON line on stderr; known secrets become ``***``."""

    def __init__(self) -> None:
        self.instance_id = ""
        self.run_id: str | None = None
        self.secrets: set = set()
        self.lock = threading.RLock()

    def secret(self, value: str) -> str:
        with self.lock:
            self.secrets.add(value)
        return value

    def scrub(self, text: str) -> str:
        with self.lock:
            secrets = list(self.secrets)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    def __call__(self, event: str, detail: Any = "", **fields: Any) -> None:
        rec = {"ts": round(time.time(), 3), "instance_id": self.instance_id, "run_id": self.run_id,
               "event": event, "detail": str(detail)}
        rec.update(fields)
        line = self.scrub(json.dumps(rec))
        with self.lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def identity(base: str, timeout_s: float, log: Log) -> tuple[dict[str, Any], str]:
    """Identity document and partition from IMDSv2, retried until ``timeout_s``.

    A session token from ``PUT /latest/api/token``, then GETs with it; there is
    deliberately no IMDSv1 fallback (the launch template requires tokens).
    Proxies are bypassed: IMDS is link-local.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(path: str, headers: dict[str, str], method: str = "GET") -> str:
        req = urllib.request.Request(base + path, method=method, headers=headers)
        with opener.open(req, timeout=2) as resp:
            return resp.read().decode()

    deadline, delay = time.monotonic() + timeout_s, 0.2
    while True:
        try:
            token = call("/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, "PUT")
            auth = {"X-aws-ec2-metadata-token": token}
            doc = json.loads(call("/latest/dynamic/instance-identity/document", auth))
            partition = call("/latest/meta-data/services/partition", auth).strip()
            if not (doc.get("instanceId") and doc.get("region") and doc.get("accountId") and partition):
                raise ValueError("incomplete identity document")
            return doc, partition
        except (OSError, ValueError) as exc:            # URLError and timeouts are OSErrors
            if time.monotonic() + delay > deadline:
                raise AgentError(f"no identity from IMDS within {timeout_s:.0f} s: {exc}") from None
            log("imds_retry", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Imds:
    """IMDSv2 for the heartbeat thread's spot-notice check: one session token, renewed on a 401."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.token = ""
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _get(self, path: str) -> str | None:
        """The body at ``path``; None when IMDS answers 404 (nothing there) or cannot be reached."""
        for _ in (1, 2):
            try:
                if not self.token:
                    req = urllib.request.Request(self.base + "/latest/api/token", method="PUT",
                                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
                    with self.opener.open(req, timeout=2) as resp:
                        self.token = resp.read().decode()
                req = urllib.request.Request(self.base + path, headers={"X-aws-ec2-metadata-token": self.token})
                with self.opener.open(req, timeout=2) as resp:
                    return resp.read().decode()
            except urllib.error.HTTPError as exc:
                if exc.code != 401:
                    return None
                self.token = ""                         # expired or unknown: a new token, once
            except (OSError, ValueError):
                return None
        return None

    def spot_notice(self) -> str | None:
        """The interruption notice or rebalance recommendation IMDS holds, if any (``path: body``)."""
        for path in SPOT_NOTICES:
            body = self._get(path)
            if body:
                return f"{path.rsplit('/', 1)[-1]}: {body.strip()[:300]}"
        return None


class Aws:
    """The two calls the instance policy allows. Clients retry adaptively, with timeouts."""

    def __init__(self, cfg: Cfg, region: str, arn: str) -> None:
        self.cfg = cfg
        self.region = region
        self.state_key = {"pk": {"S": arn}, "sk": {"S": "state"}}
        self.agent_key = {"pk": {"S": "agent#" + arn}, "sk": {"S": "agent"}}
        self.last_ok = time.monotonic()                 # last successful DynamoDB call, any thread
        self.ddb = self.client("dynamodb", 5, 10)       # low-level clients are thread-safe
        self.quick: Any = None

    def client(self, service: str, attempts: int, read_s: float) -> Any:
        conf = Config(region_name=self.region, retries={"mode": "adaptive", "total_max_attempts": attempts},
                      connect_timeout=3, read_timeout=read_s)
        return boto3.session.Session().client(service, config=conf, endpoint_url=self.cfg.endpoint)

    def state(self) -> dict[str, Any] | None:
        item = self.ddb.get_item(TableName=self.cfg.table, Key=self.state_key, ConsistentRead=True)
        item = item.get("Item")
        self.last_ok = time.monotonic()
        if item is None:
            return None
        return {k: (float(v["N"]) if "N" in v else v.get("S")) for k, v in item.items()}

    def update(self, sets: dict[str, Any], removes: tuple[str, ...] = (), quick: bool = False) -> None:
        """SET ``sets`` and REMOVE ``removes`` on this instance's agent row (UpdateItem only)."""
        keys = sorted(sets) + list(removes)
        names = {f"#a{i}": k for i, k in enumerate(keys)}
        values = {f":a{i}": {"N": repr(round(float(v), 3))} if isinstance(v, (int, float)) else {"S": str(v)}
                  for i, v in enumerate(sets[k] for k in keys if k in sets)}
        expr = "SET " + ", ".join(f"#a{i} = :a{i}" for i, k in enumerate(keys) if k in sets)
        if removes:
            expr += " REMOVE " + ", ".join(f"#a{i}" for i, k in enumerate(keys) if k not in sets)
        if quick and self.quick is None:                # best effort on the way out: 2 tries, short timeouts
            self.quick = self.client("dynamodb", 2, 4)
        (self.quick if quick else self.ddb).update_item(
            TableName=self.cfg.table, Key=self.agent_key, UpdateExpression=expr,
            ExpressionAttributeNames=names, ExpressionAttributeValues=values)
        self.last_ok = time.monotonic()


def run(argv: list[str], cwd: str, log_path: str, timeout_s: float, abort: threading.Event | None = None,
        env: dict[str, str] | None = None, user: dict[str, Any] | None = None) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group, output appended to ``log_path``.

    ``env`` defaults to the agent's; ``user`` holds Popen's user/group/
    extra_groups. The group is SIGKILLed at the deadline or when ``abort`` is
    set; the exit code is then ``None``. Returns the code and this run's output tail.
    """
    with open(log_path, "ab") as out:
        start = out.tell()
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(os.environ) if env is None else env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **(user or {}))
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline or (abort is not None and abort.is_set()):
            kill(proc.pid, signal.SIGKILL)
            reap(proc, 5)
            return None, output_tail(log_path, start)
        reap(proc, 0.1)
    return proc.returncode, output_tail(log_path, start)


def reap(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def kill(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def kill_user_processes(uid: int, timeout_s: float = 5.0) -> int:
    """SIGKILL every process owned by ``uid`` until no new one appears (bounded); how many.

    Between jobs the runner user has nothing to run: a process it left behind
    (daemonized out of run.sh's group) could otherwise read the next
    registration token from ``config.sh``'s environment, which its own uid may read.
    """
    done: set = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = set()
        for name in os.listdir("/proc"):
            try:
                if name.isdigit() and int(name) not in done and os.stat("/proc/" + name).st_uid == uid:
                    os.kill(int(name), signal.SIGKILL)
                    new.add(int(name))
            except OSError:
                pass
        if not new:
            break
        done |= new
        time.sleep(0.05)
    return len(done)


def output_tail(path: str, start: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[-300:]


class Agent:
    """The main loop (main thread) and the heartbeat (its own thread)."""

    def __init__(self, cfg: Cfg, log: Log, aws: Aws, instance_id: str) -> None:
        self.cfg = cfg
        self.log = log
        self.aws = aws
        self.instance_id = instance_id
        self.wake = threading.Event()                   # set by a stop request: cuts every wait short
        self.stop_reason: str | None = None
        self.run_id: str | None = None               # the run this instance is registered for
        self.name: str | None = None                 # its runner's name
        self.runner_id: int | None = None            # and its GitHub id (from .runner)
        self.jit = False                                # registered from a just-in-time config (one job)
        self.proc: subprocess.Popen | None = None    # run.sh
        self.count = 0                                  # the <n> of <instance-id>-<n>
        self.redos = 0                                  # re-registrations for the current run
        self.pending: tuple | None = None            # a signal not yet written
        self.acked: str | None = None                # last run we signalled ``deregistered`` for
        self.booted = self.row_seen = time.monotonic()
        self.sigterm = False                            # the OS is shutting down (an EC2 stop or terminate)
        self.spot = False                               # the row says spot: only then watch IMDS for notices
        self.notice: str | None = None                  # a spot notice seen in IMDS (heartbeat thread)
        self.interrupted = False                        # ... acted on: runner stopped, no more jobs
        self.imds = Imds(cfg.imds)
        self.config_log = os.path.join(cfg.home, "config.log")

    def request_stop(self, reason: str) -> None:
        """Called from the heartbeat thread and the SIGTERM handler: no lock, the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.wake.set()

    # -- the agent row --------------------------------------------------------------

    def signal(self, sig: str, run: str | None = None, detail: str = "", quick: bool = False) -> None:
        """Write ``signal``; with it ``signal_run``/``runner_name``/``detail``, or remove them."""
        now = time.time()
        # The runner's name and GitHub id stay in the row while it is registered (the control plane
        # relabels and removes it by that id), whatever the signal.
        fields = {"signal": sig, "signal_at": now, "instance_id": self.instance_id,
                  "expires_at": now + ROW_TTL_S, "signal_run": run, "runner_name": self.name,
                  "runner_id": self.runner_id, "detail": self.log.scrub(detail)[:1000]}
        sets = {k: v for k, v in fields.items() if v}
        self.log("signal", detail, signal=sig, signal_run=run, runner_name=sets.get("runner_name"),
                 runner_id=sets.get("runner_id"))
        self.pending = (sets, tuple(sorted(k for k in fields if k not in sets)))
        self.flush(quick)

    def flush(self, quick: bool = False) -> None:
        """Write the pending signal; if that fails it stays pending and the loop tries again."""
        if self.pending is not None:
            try:
                self.aws.update(self.pending[0], self.pending[1], quick)
                self.pending = None
            except AWS_ERRORS as exc:
                self.log("signal_write_failed", exc)

    def heartbeat(self) -> None:
        """Every RP_HEARTBEAT_S from boot; asks for a shutdown after RP_LOST_CONTACT_S without DynamoDB."""
        due = time.monotonic()
        while True:
            now = time.time()
            try:
                self.aws.update({"heartbeat_at": now, "instance_id": self.instance_id,
                                 "expires_at": now + ROW_TTL_S})
            except AWS_ERRORS as exc:
                self.log("heartbeat_failed", exc)
            if self.spot and self.notice is None:       # EC2 sends these to spot instances only
                notice = self.imds.spot_notice()
                if notice:
                    self.notice = notice
                    self.wake.set()
            silent = time.monotonic() - self.aws.last_ok
            if silent > self.cfg.lost_contact_s:
                self.request_stop(f"lost contact with DynamoDB for {silent:.0f} s")
            due = max(due + (self.cfg.heartbeat_s or 1), time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))

    # -- lifecycle --------------------------------------------------------------------

    def main(self) -> int:
        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        self.signal("booting")
        failed = self.prerunner()
        if failed:
            self.signal("prerunner_failed", detail=failed)
            return self.shutdown("pre-runner script failed: " + failed, announce=False)
        self.signal("waiting")
        while True:
            reason = self.step()
            if reason:
                return self.shutdown(*reason) if isinstance(reason, tuple) else self.shutdown(reason)
            self.pause()

    def pause(self) -> None:
        """Wait until the next read of the row; a stop request or a run.sh that exits cuts it short.

        Registered, the row is read every RP_RUN_POLL_S (with relabelling
        nothing the control plane does to a listening runner needs the agent);
        unregistered, every RP_IDLE_POLL_S, since it waits for a credential.
        """
        until = time.monotonic() + (self.cfg.run_poll_s if self.run_id else self.cfg.idle_poll_s)
        while True:
            left = until - time.monotonic()
            if left <= 0 or self.wake.wait(min(left, PROC_CHECK_S)):
                return
            if self.proc is not None and self.proc.poll() is not None:
                return

    def prerunner(self) -> str:
        """Run the pre-runner script; '' on success or when there is none, else why it failed."""
        try:
            with open(self.cfg.prerunner, "rb") as fh:
                empty = not fh.read().strip()
        except OSError:
            empty = True
        if empty:
            return ""
        started = time.monotonic()
        try:
            rc, out = run(self.cfg.shell + [self.cfg.prerunner], self.cfg.home,
                          os.path.join(self.cfg.home, "prerunner.log"), self.cfg.prerunner_timeout_s,
                          self.wake)
        except OSError as exc:
            return f"cannot start {self.cfg.shell[0]}: {exc}"
        if rc is None:
            return f"killed after {time.monotonic() - started:.0f} s"
        self.log("prerunner_done", out, exit_code=rc)
        return f"exit code {rc}" if rc else ""

    def step(self) -> Any:
        """One poll of the state row. Returns a shutdown reason (or ``(reason, announce)``) or None."""
        if self.stop_reason:
            return self.stop_reason
        self.flush()
        now = time.time()
        age = time.monotonic() - self.booted
        if age > self.cfg.max_lifetime_s:
            return f"agent up {age:.0f} s, over RP_MAX_LIFETIME_S"
        try:
            row = self.aws.state()
        except AWS_ERRORS as exc:
            self.log("state_read_failed", exc)
            return None
        desired, credential, state, last = None, False, None, None
        if row is None:
            missing = time.monotonic() - self.row_seen
            if missing > self.cfg.no_row_timeout_s:
                return f"no state row for {missing:.0f} s"
        else:
            self.row_seen = time.monotonic()
            self.spot = row.get("usage_class") == "spot"
            state, threshold = row.get("state"), row.get("threshold")
            if state == "terminated":
                return "state row is terminated"
            if threshold is not None and now > threshold + self.cfg.threshold_grace_s:
                return f"{state} threshold passed {now - threshold:.0f} s ago"
            if self.notice or self.interrupted:
                self.interrupt()
                return None                             # no more jobs; EC2 or the control plane ends us
            if state in RUN_STATES and row.get("run_id"):
                desired = row["run_id"]
                credential = bool(row.get(TOKEN_ATTR) or row.get(JIT_ATTR))
            last = row.get("last_run_id")
            if state == "draining" and not self.run_id and last and last != self.acked:
                # The run was cleared before this agent registered for it (a rollback racing the claim,
                # or an abandoned registration): nothing to remove, but release waits for this word.
                self.acked = last
                self.signal("deregistered", last, "never registered for this run")
        if self.run_id and (row is None or state == "draining"):
            self.deregister(str(last or self.run_id))       # release or rollback clears the run: stop, wipe
        elif self.run_id and desired and credential and desired != self.run_id:
            self.log("fresh_registration", f"a credential for run {desired}: replacing runner {self.name}")
            self.deregister(announce=False)                 # the control plane deletes the old runner
        elif self.run_id and self.proc is not None and self.proc.poll() is not None:
            failed = self.runner_died(self.proc.returncode)
            if failed:
                return failed, False
        if not self.run_id and desired and credential:
            self.count += 1
            self.redos = 0
            failed = self.register(desired, row or {})
            if failed:
                return failed, False
        return None

    # -- registration -----------------------------------------------------------------

    def register(self, run_id: str, row: dict[str, Any]) -> str:
        """Register for ``run_id`` with bounded attempts; a shutdown reason when all failed.

        Each attempt takes its credential from the freshest read of the state
        row: the control plane may have replaced it (a rotated token), and a
        row that no longer names the run ends the attempts.
        """
        self.log.run_id = run_id
        self.name = f"{self.instance_id}-{self.count}"
        detail, pause = "", self.cfg.registration_backoff_s
        for attempt in range(1, self.cfg.attempts + 1):
            if attempt > 1:
                if self.wake.wait(pause):
                    return ""                           # stop requested: the loop shuts down
                pause *= 2
                try:
                    row = self.aws.state() or {}
                except AWS_ERRORS as exc:
                    self.log("state_read_failed", exc)
                if row.get("state") not in RUN_STATES or row.get("run_id") != run_id:
                    self.log("registration_abandoned", "the row no longer names this run")
                    self.name = self.log.run_id = None
                    return ""
            started = time.monotonic()
            ok, detail = self.register_once(run_id, row)
            if ok:
                self.run_id = run_id
                if self.notice:                         # a spot notice came meanwhile: never announce it ready
                    return ""                           # (the next step interrupts it)
                self.signal("registered", run_id, f"{detail} after {time.monotonic() - started:.1f} s, "
                                                  f"attempt {attempt}")
                return ""
            self.log("registration_attempt_failed", detail, attempt=attempt, runner_name=self.name)
            if self.stop_reason:
                return ""
        self.signal("registration_failed", run_id, f"{self.cfg.attempts} attempts, last: {detail}")
        return f"registration for run {run_id} failed {self.cfg.attempts} times"

    def register_once(self, run_id: str, row: dict[str, Any]) -> tuple[bool, str]:
        """config.sh (unless the row holds a just-in-time config), then run.sh until it listens."""
        self.clean_local()
        self.kill_leftovers()
        jit, token = row.get(JIT_ATTR), row.get(TOKEN_ATTR)
        if not jit and not token:
            return False, "no credential in the state row"
        self.log.secret(str(jit or token))
        try:
            if jit:
                run_env = self.cfg.runner_env(ACTIONS_RUNNER_INPUT_JITCONFIG=str(jit))
            else:
                argv = ["./config.sh", "--unattended", "--url", self.cfg.url, "--name", str(self.name),
                        "--labels", f"{run_id},{self.cfg.label}", "--no-default-labels", "--replace",
                        "--disableupdate"]
                rc, out = run(argv, self.cfg.runner_dir, self.config_log, self.cfg.registration_timeout_s,
                              env=self.cfg.runner_env(ACTIONS_RUNNER_INPUT_TOKEN=str(token)),
                              user=self.cfg.runner_as)
                if rc != 0:
                    return False, f"config.sh {'killed at its deadline' if rc is None else f'exited {rc}'}: {out}"
                run_env = self.cfg.runner_env()
            self.jit = bool(jit)
            self.runner_id = self.local_runner_id()
            started = self.start_runner(run_env)
        except OSError as exc:
            return False, f"cannot run the runner: {exc}"
        deadline = time.monotonic() + self.cfg.listen_timeout_s
        while True:
            with open(os.path.join(self.cfg.home, "runner.log"), "rb") as fh:
                fh.seek(started)
                if LISTENING in fh.read():
                    self.runner_id = self.runner_id or self.local_runner_id()
                    return True, "listening"
            proc = self.proc
            if proc is None or proc.poll() is not None or self.stop_reason:
                code = proc.poll() if proc is not None else None
                why = "stop requested" if code is None else f"run.sh exited {code}"
                self.stop_runner()
                self.clean_local()
                return False, f"{why} before listening"
            if time.monotonic() > deadline:
                return True, f"run.sh up, no listening line after {self.cfg.listen_timeout_s:.0f} s"
            self.wake.wait(0.1)

    def start_runner(self, env: dict[str, str]) -> int:
        """Start run.sh (as the runner user); returns where its output starts in runner.log."""
        runner_log = os.path.join(self.cfg.home, "runner.log")
        with open(runner_log, "ab") as fh:
            start = fh.tell()
            self.proc = subprocess.Popen(["./run.sh"], cwd=self.cfg.runner_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                         **(self.cfg.runner_as or {}))
        return start

    def local_runner_id(self) -> int | None:
        """GitHub's id of the configured runner, from ``.runner`` (UTF-8 with a BOM)."""
        try:
            with open(os.path.join(self.cfg.runner_dir, ".runner"), encoding="utf-8-sig") as fh:
                value = json.load(fh).get("agentId")
        except (OSError, ValueError, AttributeError):
            return None
        return value if type(value) is int and value > 0 else None

    def runner_died(self, rc: int) -> str:
        """run.sh exited while registered; a shutdown reason, or '' when the agent carries on.

        * a just-in-time runner exits after its one job: done, the instance
          waits for release (which terminates it);
        * any other exit with the local registration intact (a crash): start
          run.sh again, without registering;
        * the runner was deleted on GitHub (exit 2): register again if the row
          holds a credential for a run (this run before commit, or the run a
          relabel fallback hands over), else, while a run holds the instance,
          there is nothing to register with: shut down, release will find it
          dead; an instance back in the pool waits without a runner (the next
          claim hands it a credential).
        """
        if self.interrupted:                            # interrupt() stopped it on purpose
            return ""
        run_id = str(self.run_id)
        why = "runner deleted on GitHub" if rc == RUNNER_DELETED else f"run.sh exited {rc}"
        self.log("runner_exited", why)
        self.stop_runner()
        if self.jit:                                    # its one job is over: release terminates us
            self.clean_local()
            return ""
        self.redos += 1
        if self.redos > self.cfg.attempts:
            self.clean_local()
            self.signal("registration_failed", run_id, f"{why}; {self.cfg.attempts} restarts used up")
            return f"the runner for run {run_id} kept dying ({why})"
        if rc != RUNNER_DELETED and self.local_runner_id():
            try:
                started = self.start_runner(self.cfg.runner_env())
            except OSError as exc:
                return f"cannot restart run.sh: {exc}"
            self.log("runner_restarted", started)
            return ""
        self.clean_local()
        try:
            row = self.aws.state() or {}
        except AWS_ERRORS as exc:
            row = {}
            self.log("state_read_failed", exc)
        desired = row.get("run_id") if row.get("state") in RUN_STATES else None
        if desired and (row.get(TOKEN_ATTR) or row.get(JIT_ATTR)):
            self.run_id = self.runner_id = None
            self.count += 1
            return self.register(str(desired), row)
        if desired:
            self.signal("registration_failed", str(desired), f"{why}: no credential to register again")
            return f"runner for run {desired} gone, cannot register again"
        self.run_id = self.runner_id = self.name = self.log.run_id = None
        self.signal("waiting", detail=f"{why}: back in the pool without a runner")
        return ""

    # -- deregistration ---------------------------------------------------------------

    def stop_runner(self) -> None:
        """SIGTERM run.sh's process group; SIGKILL it after RP_STOP_TIMEOUT_S."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            kill(proc.pid, signal.SIGTERM)
            reap(proc, self.cfg.stop_timeout_s)
            if proc.poll() is None:
                self.log("runner_killed", f"run.sh ignored SIGTERM for {self.cfg.stop_timeout_s:.0f} s")
        kill(proc.pid, signal.SIGKILL)                  # whatever is left of the group (job processes)
        reap(proc, 5)

    def kill_leftovers(self) -> None:
        """With a runner user: no process of it may outlive its runner (see kill_user_processes)."""
        if self.cfg.runner_as is not None:
            n = kill_user_processes(int(self.cfg.runner_as["user"]))
            if n:
                self.log("leftovers_killed", n)

    def clean_local(self) -> None:
        """Wipe the runner's credential files: without them nothing on this instance can act as it."""
        for name in LOCAL_FILES:
            try:
                os.remove(os.path.join(self.cfg.runner_dir, name))
            except OSError:
                pass

    def deregister(self, run: str | None = None, announce: bool = True) -> None:
        """Stop run.sh and wipe its credentials, then signal ``deregistered`` for ``run`` (the run the
        row cleared; default: the one it registered for) with the runner's id, which the control
        plane deletes on GitHub."""
        started = time.monotonic()
        self.stop_runner()
        self.kill_leftovers()
        self.clean_local()
        note = f"stopped and wiped in {time.monotonic() - started:.1f} s"
        run = run or self.run_id
        self.acked = run
        if announce:
            self.signal("deregistered", run, note)
        else:
            self.log("deregistered", note)
        self.run_id = self.name = self.log.run_id = self.runner_id = None
        self.jit = False

    def interrupt(self) -> None:
        """EC2 announced a spot interruption or recommends a rebalance: stop taking jobs (stop and wipe
        the runner), signal ``interrupted`` once, and let the instance go -- EC2 reclaims it, or the
        control plane terminates it and removes the runner from GitHub. Never registers again."""
        if self.interrupted:
            return
        # Set first: the main loop seeing run.sh die under stop_runner() must not take it for a crash
        # (runner_died), re-register, or write a signal without the runner's id.
        self.interrupted = True
        run = self.run_id
        self.stop_runner()
        self.kill_leftovers()
        self.clean_local()
        self.acked = run
        # The runner's name and id stay in the row: the control plane deletes it on GitHub by that id.
        self.signal("interrupted", run, str(self.notice))
        self.run_id = self.log.run_id = None

    def stopped_by_ec2(self) -> bool:
        """A SIGTERM while the state row says ``stopped``: EC2 is stopping the instance (the stopped
        tier). It boots again later and the per-boot script starts a new agent: no ``shutdown``
        signal (the row would read dead) and no power-off (the stop is under way)."""
        if not self.sigterm:
            return False
        try:
            return (self.aws.state() or {}).get("state") == "stopped"
        except AWS_ERRORS:
            return False

    def shutdown(self, reason: str, announce: bool = True) -> int:
        """Signal ``shutdown`` (best effort), stop the runner and wipe it, power off.

        ``shutdown`` stays the row's last word: a ``deregistered`` written after
        it would read as "clean, back to the pool" for a dying instance; and
        ``announce=False`` keeps the failure signal written just before. The
        runner's GitHub registration is the control plane's to delete (the
        release or reconcile that finds this instance dead).
        """
        if self.stopped_by_ec2():
            self.log("stopping", "EC2 stops the instance: the agent starts again on its next boot")
            self.stop_runner()
            self.clean_local()
            return 0
        self.log("shutdown", reason)
        if announce:
            self.signal("shutdown", self.run_id, reason, quick=True)
        self.stop_runner()
        self.clean_local()
        return power_off(self.log, self.cfg.home)


def power_off(log: Log, home: str) -> int:
    """Run RUNNER_POOL_SHUTDOWN_CMD (3 tries); the exit code the agent ends with."""
    cmd = shutdown_cmd()
    for attempt in (1, 2, 3):
        try:
            out_path = os.path.join(home, "shutdown.log") if os.path.isdir(home) else os.devnull
            rc, out = run(cmd, "/", out_path, 60)
        except OSError as exc:
            rc, out = -1, str(exc)
        log("power_off", out, command=" ".join(cmd), exit_code=rc, attempt=attempt)
        if rc == 0:
            return 0
        time.sleep(5)
    return 1


def main() -> int:
    log = Log()
    home = os.environ.get("RUNNER_POOL_HOME") or "/opt/runner-pool"
    try:
        cfg = Cfg(dict(os.environ))
        doc, partition = identity(cfg.imds, cfg.imds_timeout_s, log)
    except AgentError as exc:
        log("fatal", exc)
        return power_off(log, home)
    log.instance_id = instance_id = str(doc["instanceId"])
    arn = f"arn:{partition}:ec2:{doc['region']}:{doc['accountId']}:instance/{instance_id}"
    log("start", arn, pool=cfg.pool, instance_type=doc.get("instanceType"), python=sys.version.split()[0])
    agent = Agent(cfg, log, Aws(cfg, cfg.region or str(doc["region"]), arn), instance_id)
    def on_sigterm(*_: Any) -> None:
        agent.sigterm = True
        agent.request_stop("received SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return agent.main()
    except Exception as exc:  # noqa: BLE001 - a bug must not leave an instance without an agent
        log("crash", f"{type(exc).__name__}: {exc}")
        return agent.shutdown(f"agent crashed: {type(exc).__name__}")


if __name__ == "__main__":
    sys.exit(main())
