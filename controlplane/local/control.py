"""Start, stop and describe the embedded default (``runner-pool local ...``).

``start`` launches :mod:`controlplane.local.daemon` as a detached process and
waits (bounded) until it answers; ``stop`` ends it and then makes sure no
agent process it started is left behind, even if the daemon itself was killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from controlplane.clock import Deadline, wait_until
from controlplane.errors import ConfigError, RunnerPoolError
from controlplane.local.daemon import aws_env, default_state_dir

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                    # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_daemon(pid: int, state_dir: Path) -> bool:
    """``pid`` is alive and is the daemon of ``state_dir``, not whatever process reuses a dead one's pid.

    A ``state.json`` outlives a daemon that was killed (or a reboot): its pid may belong to
    anything by now, and ``local stop`` must never signal that.
    """
    if pid <= 0 or not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    if b"controlplane.local.daemon" not in argv or b"--state-dir" not in argv:
        return False
    given = argv[argv.index(b"--state-dir") + 1:][:1]
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return bool(given) and (Path(cwd) / os.fsdecode(given[0])).resolve() == Path(state_dir).resolve()


def _healthy(aws_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{aws_url}/_emulator/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def read_state(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The running daemon's state, or None if it is not running."""
    path = (state_dir or default_state_dir()) / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _is_daemon(int(state.get("pid", 0)), state_dir or default_state_dir()):
        return None
    return state


def start(state_dir: Path | None = None, enforce_iam: bool = False,
          pool_config: Path | None = None) -> tuple[dict[str, Any], bool]:
    """Start the daemon (or find it running). Returns (state, started_now).

    ``enforce_iam``: moto enforces IAM (see :mod:`controlplane.local.daemon`);
    ``pool_config``: the pool whose control-plane user ``local env`` exports.
    A daemon already running in the other mode is bad input, not reused.
    """
    state_dir = state_dir or default_state_dir()
    existing = read_state(state_dir)
    if existing and _healthy(existing["aws_url"]):
        if bool(existing.get("iam", {}).get("enforced")) != enforce_iam:
            mode = "with" if existing.get("iam", {}).get("enforced") else "without"
            raise ConfigError(f"the local emulator already runs {mode} IAM enforcement",
                              hint="run `runner-pool local stop` first")
        return existing, False
    extra = ["--enforce-iam"] if enforce_iam else []
    if pool_config is not None:
        extra += ["--config", str(Path(pool_config).resolve())]
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").unlink(missing_ok=True)
    log = open(state_dir / "daemon.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.local.daemon", "--state-dir", str(state_dir), *extra],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
    )
    log.close()

    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise RunnerPoolError(f"the local emulator exited with code {proc.returncode}",
                                  hint=f"see {state_dir / 'daemon.log'}")
        st = read_state(state_dir)
        return st if st and _healthy(st["aws_url"]) else None

    state = wait_until(ready, Deadline(START_TIMEOUT_S), 0.1)
    if state is None:
        proc.kill()
        raise RunnerPoolError(f"the local emulator did not answer within {START_TIMEOUT_S} s",
                              hint=f"see {state_dir / 'daemon.log'}")
    return state, True


def _stray_agents(state_dir: Path) -> list[int]:
    """Processes of simulated instances under this state dir (agents, runners)."""
    from controlplane.local.simulator import processes_of

    return [p for p in processes_of(state_dir, below=True) if p != os.getpid()]


def stop(state_dir: Path | None = None) -> dict[str, Any]:
    state_dir = state_dir or default_state_dir()
    path = state_dir / "state.json"
    stopped_daemon = False
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pid = 0
    if pid and _is_daemon(pid, state_dir):
        os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not _alive(pid), Deadline(STOP_TIMEOUT_S), 0.1):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped_daemon = True
    strays = _stray_agents(state_dir)
    for p in strays:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    path.unlink(missing_ok=True)
    wait_until(lambda: not any(_alive(p) for p in strays), Deadline(5), 0.05)
    from controlplane.local.rootfs import cleanup_below

    left = cleanup_below(state_dir)            # rootfs instances of a daemon that could not clean up
    return {"stopped": stopped_daemon, "pid": pid or None, "stray_agents_killed": len(strays) + left["killed"],
            "rootfs_left": left}


def env_vars(state: dict[str, Any]) -> dict[str, str]:
    """The exports of ``local env``; with IAM enforced, the key of the pool's control-plane user
    (``local start --enforce-iam --config FILE``), else the daemon's admin key."""
    iam = state.get("iam") or {}
    key = iam.get("env_key") or iam.get("admin") if iam.get("enforced") else None
    return {
        **aws_env(state["aws_url"], key),
        "RUNNER_POOL_GITHUB_TOKEN": state["github_pat"],
        "RUNNER_POOL_GITHUB_URL": state["github_url"],
        "RUNNER_POOL_GITHUB_API_URL": state["github_url"],
        "RUNNER_POOL_LOCAL_DIR": state["state_dir"],
    }

