"""The real CLI: ``pulumi up`` / ``stack output`` / ``destroy`` of both stack kinds.

Runs where the ``pulumi`` CLI is on PATH (its Python language host and
``pulumi-resource-pulumi-python`` next to it or on PATH), against a local
file backend and the embedded default, with no network: the program has only
dynamic resources (``createInstanceRole`` stays false, so no pulumi-aws
plugin is needed). The project files are copied to a temporary directory so
the stack files ``pulumi`` writes never land in the repository;
``PYTHONPATH`` points the program and the provider host at the repository's
packages, as ``pip install -e .`` would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import store
from controlplane.config import parse_config
from tests.conftest import ROOT, Emu, pool_config_dict

pytestmark = [
    pytest.mark.cli,
    pytest.mark.skipif(shutil.which("pulumi") is None, reason="pulumi CLI not on PATH"),
    pytest.mark.timeout(600),
]


class Project:
    """A copy of the project in a temporary directory, with an offline file backend."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "project"
        self.dir.mkdir()
        for name in ("Pulumi.yaml", "__main__.py"):
            shutil.copy(ROOT / name, self.dir / name)
        (tmp / "state").mkdir()
        self.env = {
            **os.environ,
            "PULUMI_BACKEND_URL": f"file://{tmp / 'state'}",
            "PULUMI_HOME": str(tmp / "pulumi-home"),
            "PULUMI_CONFIG_PASSPHRASE": "engine-test",
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_PYTHON_CMD": sys.executable,
            "PYTHONPATH": str(ROOT),
        }

    def pulumi(self, *args: str, stack: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["pulumi", *args, "--non-interactive"] + (["--stack", stack] if stack else [])
        res = subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=540,
                             check=False)
        if check and res.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
        return res

    def new_stack(self, name: str, config: dict[str, Any]) -> None:
        """``stack init``, then the config written into the stack file (objects included)."""
        self.pulumi("stack", "init", name)
        path = self.dir / f"Pulumi.{name}.yaml"
        doc = yaml.safe_load(path.read_text()) if path.exists() else {}
        doc = doc or {}
        doc["config"] = {f"runner-pool:{k}": v for k, v in config.items()}
        path.write_text(yaml.safe_dump(doc))

    def outputs(self, stack: str) -> dict[str, Any]:
        return dict(json.loads(self.pulumi("stack", "output", "--json", stack=stack).stdout))


def test_pool_stack_and_run_stack_up_output_destroy(local: dict[str, Any], emu: Emu, tmp_path: Path) -> None:
    project = Project(tmp_path)
    pool = pool_config_dict(local)
    pool_stack, run_stack = f"pool-{pool['name']}", f"run-{uuid.uuid4().hex[:8]}"
    rid = f"cli-{uuid.uuid4().hex[:8]}"

    project.new_stack(pool_stack, {"kind": "pool", "pool": pool})
    try:
        project.pulumi("up", "--yes", "--skip-preview", stack=pool_stack)
        out = project.outputs(pool_stack)
        assert out["poolName"] == pool["name"] and out["tableName"] == f"runner-pool-{pool['name']}"
        assert sorted(out["queueUrls"]) == ["large", "small"] and out["launchTemplateVersion"] == 1
        assert store.load_pool(pool["name"], pool["region"]).name == pool["name"]

        project.new_stack(run_stack, {"kind": "run", "poolName": pool["name"], "region": pool["region"],
                                      "runId": rid, "resourceClass": "small", "count": 2})
        project.pulumi("up", "--yes", "--skip-preview", stack=run_stack)
        run_out = project.outputs(run_stack)
        assert run_out["label"] == rid and run_out["count"] == 2 and len(run_out["instanceIds"]) == 2
        online = [r for r in emu.runners() if rid in [lb["name"] for lb in r["labels"]] and r["status"] == "online"]
        assert len(online) == 2

        project.pulumi("destroy", "--yes", "--skip-preview", stack=run_stack)
        p = store.load_pool(pool["name"], pool["region"])
        assert {r.state.value for r in store.all_records(p)} == {"idle"}
        project.pulumi("stack", "rm", "--yes", stack=run_stack)
    finally:
        project.pulumi("destroy", "--yes", "--skip-preview", stack=pool_stack, check=False)
    assert not store.table_exists(parse_config(pool))
    project.pulumi("stack", "rm", "--yes", stack=pool_stack)
