"""The example workflows and the composite action pass ``actionlint``.

``actionlint`` is built from its Go module by ``.ci/build-pulumi`` (cached beside
the CLI). It checks workflow files only, so the composite action's steps are
also linted as the steps of a workflow whose ``workflow_dispatch`` inputs are
the action's inputs: expressions, contexts (``inputs``, ``github.action_path``),
step keys and action references are checked as they would be in a workflow.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.engine.inline import BUILD_HINT, find_tool

pytestmark = pytest.mark.cli


def actionlint() -> str:
    path = find_tool("actionlint")
    if path is None:
        import os
        msg = f"actionlint not built: `{BUILD_HINT}`"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def lint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([actionlint(), "-no-color", *map(str, files)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)


def test_the_example_workflows_pass_actionlint() -> None:
    res = lint(ROOT / "examples" / "workflow.yml", ROOT / "examples" / "refresh.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_composite_actions_steps_pass_actionlint_as_a_workflow(tmp_path: Path) -> None:
    action = yaml.safe_load((ROOT / "examples" / "action" / "action.yml").read_text())
    inputs = {name: {"description": spec.get("description", ""), "required": bool(spec.get("required")),
                     "type": "string"} for name, spec in action["inputs"].items()}
    workflow = {"name": "composite action as a workflow", "on": {"workflow_dispatch": {"inputs": inputs}},
                "permissions": {}, "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": action["runs"]["steps"]}}}
    path = tmp_path / "action-as-workflow.yml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    res = lint(path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check can fail: an undefined job output and a bad runs-on expression are reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ${{ needs.nope.outputs.label }}\n"
                   "    steps:\n      - run: echo ${{ steps.x.outputs.y }}\n")
    res = lint(bad)
    assert res.returncode != 0 and "needs" in res.stdout, res.stdout
