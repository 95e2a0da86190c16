"""A copy of the project driven by the real ``pulumi`` CLI on an offline file backend.

Used by the real-CLI tests and ``bench/pulumi_engine.py``. The project files
are copied to a temporary directory so the stack files ``pulumi`` writes never
land in the repository; ``PYTHONPATH`` points the program and the provider
host at the repository's packages, as ``pip install -e .`` would. The CLI is
the one ``.ci/build-pulumi`` builds (its cache directory, else PATH), run
through :mod:`tests.engine.inline` (no Python language host is built).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.engine.inline import BUILD_HINT, ROOT, cache_bin, find_pulumi

PASSPHRASE = "engine-test"
CLI_TIMEOUT_S = 540


def require_cli() -> None:
    """In CI (``CI=true``) a missing CLI fails the test; elsewhere it skips, saying how to build it."""
    if find_pulumi() is not None:
        return
    msg = f"pulumi CLI not in {cache_bin()} or on PATH: build it with `{BUILD_HINT}`"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(msg)
    pytest.skip(msg)


class CliFailed(AssertionError):
    pass


class Project:
    """The project in ``tmp/project``, its state in ``tmp/state``, ``PULUMI_HOME`` in ``tmp/pulumi-home``."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.dir = tmp / "project"
        self.dir.mkdir(parents=True)
        for name in ("Pulumi.yaml", "__main__.py"):
            shutil.copy(ROOT / name, self.dir / name)
        self.state = tmp / "state"
        self.state.mkdir()
        pulumi = find_pulumi()
        assert pulumi is not None, "pulumi CLI not built (bash .ci/build-pulumi)"
        self.bin = str(Path(pulumi).parent)
        # `pulumi` on PATH for scripted steps (the example's): a shim into tests.engine.inline, which runs
        # the real CLI from RUNNER_POOL_PULUMI_BIN with the program served inline.
        shims = tmp / "shims"
        shims.mkdir()
        (shims / "pulumi").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.engine.inline "$@"\n')
        (shims / "pulumi").chmod(0o755)
        self.env = {
            **os.environ, **(env or {}),
            "PULUMI_BACKEND_URL": f"file://{self.state}",
            "PULUMI_HOME": str(tmp / "pulumi-home"),
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_PYTHON_CMD": sys.executable,
            "PYTHONPATH": str(ROOT),
            # the example's steps call `pulumi` and `runner-pool` by name
            "RUNNER_POOL_PULUMI_BIN": self.bin,
            "PATH": os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        self.env.pop("PULUMI_ACCESS_TOKEN", None)

    def command(self, *args: str, stack: str | None = None) -> list[str]:
        extra = ["--non-interactive"] if args and args[0] not in ("version",) else []
        return [sys.executable, "-m", "tests.engine.inline", *args, *extra, *(["--stack", stack] if stack else [])]

    def pulumi(self, *args: str, stack: str | None = None, check: bool = True,
               timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args, stack=stack)
        res = subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=timeout,
                             check=False, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise CliFailed(f"pulumi {' '.join(args)} exited {res.returncode}:\n"
                            f"{res.stdout[-6000:]}\n{res.stderr[-6000:]}")
        return res

    def start(self, *args: str, stack: str | None = None, log: Path) -> subprocess.Popen[bytes]:
        """``pulumi ARGS`` in the background, in a process group of its own (as a job step's tree)."""
        out = open(log, "wb")
        try:
            return subprocess.Popen(self.command(*args, stack=stack), cwd=self.dir, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()

    def new_stack(self, name: str, config: dict[str, Any]) -> None:
        """``stack init``, then the config written into the stack file (objects included)."""
        self.pulumi("stack", "init", name)
        self.set_config(name, config)

    def set_config(self, name: str, config: dict[str, Any]) -> None:
        path = self.dir / f"Pulumi.{name}.yaml"
        doc = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
        doc["config"] = {f"runner-pool:{k}": v for k, v in config.items()}
        path.write_text(yaml.safe_dump(doc))

    def outputs(self, stack: str) -> dict[str, Any]:
        return dict(json.loads(self.pulumi("stack", "output", "--json", stack=stack).stdout))

    def export(self, stack: str) -> dict[str, Any]:
        """``pulumi stack export``: the checkpoint (resources, pending operations)."""
        return dict(json.loads(self.pulumi("stack", "export", stack=stack).stdout))

    def resources(self, stack: str) -> list[dict[str, Any]]:
        """The stack's resources other than the stack, its stack references and its providers."""
        deployment = self.export(stack).get("deployment") or {}
        return [r for r in deployment.get("resources") or []
                if not r["type"].startswith("pulumi:pulumi:") and not r["type"].startswith("pulumi:providers:")]

    def pending(self, stack: str) -> list[dict[str, Any]]:
        """Pending operations the checkpoint records (an interrupted create leaves one)."""
        return list((self.export(stack).get("deployment") or {}).get("pending_operations") or [])

    def locks(self) -> list[Path]:
        """Lock files of the file backend (one per stack while an update holds it)."""
        return sorted(p for p in self.state.rglob("*") if p.is_file() and "locks" in p.parts)
