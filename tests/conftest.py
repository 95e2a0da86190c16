"""Shared fixtures: the embedded default as a real background process.

One daemon per test session (``runner-pool local start`` in a temporary state
directory): moto's server with our fixes, the GitHub stand-in and the
instance simulator running the real agent. Tests talk to it over HTTP with
the same boto3 code users run, and isolate themselves by pool name.
"""
from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
WAIT_S = 90.0                 # deadline of a wait for a condition (CI is slow, not stuck)
POLL_S = 0.2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used the embedded default shows the tail of its daemon's log: when the
    emulator went away mid-test, that log says why (a signal, a dying thread, a fatal error)."""
    outcome = yield
    report = outcome.get_result()
    state = getattr(item, "funcargs", {}).get("local")
    if report.failed and isinstance(state, dict):
        try:
            lines = (Path(state["state_dir"]) / "daemon.log").read_text(errors="replace").splitlines()
        except OSError as exc:
            lines = [f"(no daemon.log: {exc})"]
        report.sections.append(("daemon.log (last 60 lines)", "\n".join(lines[-60:])))


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """``probe()`` once it is truthy; fails the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


@pytest.fixture(scope="session")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The running embedded default; its env is exported for the whole session."""
    from controlplane.local import control

    state_dir = tmp_path_factory.mktemp("local")
    state, _ = control.start(state_dir)
    saved = dict(os.environ)
    os.environ.update(control.env_vars(state))
    os.environ.setdefault("RUNNER_POOL_LOG_LEVEL", "WARNING")
    try:
        yield state
    finally:
        control.stop(state_dir)
        os.environ.clear()
        os.environ.update(saved)


class Emu:
    """Control endpoints of the local emulator, the simulator and the GitHub stand-in."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.aws = state["aws_url"]
        self.github = state["github_url"]

    def _call(self, url: str, method: str = "GET", body: Any = None, timeout_s: float = 10) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    # -- AWS faults: errors, latency, capacity (see controlplane/local/emulator.py)

    def fault(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/faults", "POST", rule)

    def latency(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/latency", "POST", rule)

    def capacity(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/capacity", "POST", rule)

    def fault_rules(self) -> dict[str, list[dict[str, Any]]]:
        """Error, latency and capacity rules in force, each error and latency rule with its ``hits``."""
        return self._call(f"{self.aws}/_emulator/faults")  # type: ignore[no-any-return]

    def latency_hits(self, contains: str) -> int:
        """Requests the latency rules narrowed to bodies holding ``contains`` have started to delay."""
        return sum(int(r["hits"]) for r in self.fault_rules()["latency"] if r.get("contains") == contains)

    def clear_aws_faults(self) -> None:
        self._call(f"{self.aws}/_emulator/faults", "DELETE")

    def clear_faults(self) -> None:
        self.clear_aws_faults()
        self._call(f"{self.aws}/_emulator/sim/behaviour", "DELETE")
        self.clear_github_faults()

    # -- requests the emulator served

    def requests(self, access_key: str | None = None) -> dict[str, Any]:
        """``{"counts", "total", "mutations"}`` of every request, or only of those signed with ``access_key``."""
        query = f"?access_key={urllib.parse.quote(access_key)}" if access_key is not None else ""
        return self._call(f"{self.aws}/_emulator/requests{query}")  # type: ignore[no-any-return]

    def count(self, operation: str, access_key: str | None = None) -> int:
        """Requests of one ``service.Operation`` so far (``ec2.CreateFleet``)."""
        return int(self.requests(access_key)["counts"].get(operation, 0))

    # -- the AWS endpoint itself

    def health(self) -> dict[str, Any] | None:
        """The emulator's health, or None while it refuses connections."""
        try:
            return self._call(f"{self.aws}/_emulator/health", timeout_s=2)  # type: ignore[no-any-return]
        except OSError:
            return None

    def restart(self, down_s: float, timeout_s: float = 30) -> None:
        """Restart the emulator's server (state kept) and wait until it was down and is back."""
        before = self.health()
        assert before is not None, "the emulator is not serving"
        self._call(f"{self.aws}/_emulator/restart", "POST", {"down_s": down_s})
        wait_for(lambda: self.health() is None, "the emulator to refuse connections", timeout_s)
        wait_for(lambda: (self.health() or {}).get("restarts") == before["restarts"] + 1,
                 "the emulator to serve again", timeout_s + down_s)

    # -- the simulated instances

    def behaviour(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/sim/behaviour", "POST", rule)

    def kill_agent(self, instance_id: str, sig: int = 9) -> None:
        self._call(f"{self.aws}/_emulator/sim/kill", "POST", {"instance_id": instance_id, "signal": sig})

    def spot_notice(self, instance_id: str, kind: str = "instance-action", action: str = "terminate") -> Any:
        """IMDS of one instance announces a spot interruption (or a rebalance recommendation) from now on."""
        return self._call(f"{self.aws}/_emulator/sim/spot", "POST",
                          {"instance_id": instance_id, "kind": kind, "action": action})

    def machines(self) -> dict[str, dict[str, Any]]:
        """The simulator's view of each instance (phase, boots, pid), by instance id."""
        return {m["instance_id"]: m for m in self._call(f"{self.aws}/_emulator/sim/status")["instances"]}

    # -- the GitHub stand-in

    def github_fault(self, **rule: Any) -> None:
        self._call(f"{self.github}/_control/faults", "POST", rule)

    def clear_github_faults(self) -> None:
        """Lift GitHub's faults: a request it was holding is answered now."""
        self._call(f"{self.github}/_control/faults", "DELETE")

    def github_state(self) -> dict[str, Any]:
        return self._call(f"{self.github}/_control/state")  # type: ignore[no-any-return]

    def github_requests(self, key: str) -> int:
        """Requests the stand-in served for one ``METHOD /path`` so far."""
        return int(self.github_state()["requests"].get(key, 0))

    def runners(self) -> list[dict[str, Any]]:
        return list(self.github_state()["runners"])


@pytest.fixture
def emu(local: dict[str, Any]) -> Iterator[Emu]:
    e = Emu(local)
    yield e
    e.clear_faults()


FAST = {
    "heartbeat_interval_s": 1, "heartbeat_stale_s": 4, "validation_timeout_s": 40, "claim_timeout_s": 120,
    "deregistration_timeout_s": 20, "idle_time_s": 300, "max_runtime_s": 600,
}
# Timings of every reliability pool (tests/reliability). CI runs the suite as `pytest -n 2 --dist loadfile`
# on two cores, with 60 agents of the contention test on one worker while the other injects faults: a
# healthy agent's heartbeat can come seconds late, and AWS throttling backs off in seconds (base 1 s), so a
# 1 s heartbeat judged stale at 4 s calls live agents dead. These keep the product defaults' ratio of
# staleness to period (3x) and outlast a 3 s endpoint restart with its reconnect backoff; the timeouts stay
# far above what a loaded machine needs. A test waiting for a dead agent to be noticed waits this stale
# time, once.
RELIABLE = {
    "heartbeat_interval_s": 2, "heartbeat_stale_s": 15, "validation_timeout_s": 240, "claim_timeout_s": 600,
    "deregistration_timeout_s": 60,
}


def pool_config_dict(local: dict[str, Any], name: str | None = None, **overrides: Any) -> dict[str, Any]:
    net = local["network"]
    base: dict[str, Any] = {
        "name": name or f"t{uuid.uuid4().hex[:8]}",
        "region": net["region"],
        "github": {"repository": "octo-org/octo-repo", "url": local["github_url"], "api_url": local["github_url"]},
        "resource_classes": {
            "small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "instance_types": ["c*", "m*"]},
            "large": {"vcpu": {"min": 8, "max": 8}, "memory_mib": {"min": 16384}},
        },
        "subnets": net["subnets"], "ami": net["ami"], "security_groups": [net["security_group"]],
        "instance_profile": net["instance_profile"], **FAST,
    }
    base.update(overrides)
    return base


@pytest.fixture
def make_pool(local: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """Apply a fresh pool (unique name) and destroy it after the test."""
    from controlplane import store
    from controlplane.apply import apply_pool, destroy_pool
    from controlplane.config import parse_config
    from controlplane.github import github_client_from_env

    made = []

    def make(**overrides: Any) -> Any:
        cfg = parse_config(pool_config_dict(local, **overrides))
        apply_pool(cfg)
        made.append(cfg)
        return store.load_pool(cfg.name, cfg.region)

    yield make
    for cfg in made:
        destroy_pool(cfg, github_client_from_env(cfg.github.api_url, cfg.github.scope))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "controlplane", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def run_cli_with_own_key(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[Any, str]:
    """:func:`run_cli` signing with an AWS access key no other client uses; returns the process and the key.

    moto serves every key from the same account, so the CLI sees the same pools, while the emulator
    counts its requests apart (``Emu.requests(access_key=key)``): agents still heartbeating from an
    earlier test cannot blur what this command did.
    """
    key = f"AKIDCLI{uuid.uuid4().hex[:12].upper()}"
    return run_cli(*args, env={**(env or {}), "AWS_ACCESS_KEY_ID": key}, timeout=timeout), key
