"""Shared fixtures: the embedded default as a real background process.

One daemon per test session (``runner-pool local start`` in a temporary state
directory): moto's server with our fixes, the GitHub stand-in and the
instance simulator running the real agent. Tests talk to it over HTTP with
the same boto3 code users run, and isolate themselves by pool name.
"""
from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


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

    def _call(self, url: str, method: str = "GET", body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def fault(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/faults", "POST", rule)

    def capacity(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/capacity", "POST", rule)

    def clear_faults(self) -> None:
        self._call(f"{self.aws}/_emulator/faults", "DELETE")
        self._call(f"{self.aws}/_emulator/sim/behaviour", "DELETE")
        self._call(f"{self.github}/_control/faults", "DELETE")

    def requests(self) -> dict[str, Any]:
        return self._call(f"{self.aws}/_emulator/requests")  # type: ignore[no-any-return]

    def behaviour(self, **rule: Any) -> None:
        self._call(f"{self.aws}/_emulator/sim/behaviour", "POST", rule)

    def kill_agent(self, instance_id: str, sig: int = 9) -> None:
        self._call(f"{self.aws}/_emulator/sim/kill", "POST", {"instance_id": instance_id, "signal": sig})

    def github_state(self) -> dict[str, Any]:
        return self._call(f"{self.github}/_control/state")  # type: ignore[no-any-return]

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

    return subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)
