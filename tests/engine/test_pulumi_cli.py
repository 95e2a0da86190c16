"""The real ``pulumi`` CLI on a pool stack and run stacks, against the embedded default.

The CLI is the one ``.ci/build-pulumi`` builds from Go modules (found in its
cache directory, else on PATH); the program runs through the Automation
API's inline path (:mod:`tests.engine.inline`). State is a file backend in a
temporary directory, secrets use a passphrase, ``PULUMI_HOME`` is isolated
and no plugin is ever downloaded. Everything a user would check is asserted:
the command's exit code and what it printed, the state table, EC2, the
queues, runners on the GitHub stand-in, the stack's checkpoint.

The tests of this module run in order on one pool stack (one worker runs a
file under ``--dist loadfile``): preview, up, a second up, a config change,
refresh, run stacks, then destroy.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane import aws, store, token
from controlplane import pool as pool_q
from controlplane.apply import pool_instance_ids
from controlplane.config import PoolConfig, parse_config
from controlplane.records import LIVE_STATES, State
from tests.conftest import Emu, pool_config_dict, wait_for
from tests.engine.project import Project, require_cli
from tests.reliability.invariants import online

pytestmark = [pytest.mark.cli, pytest.mark.timeout(900)]


@dataclass
class PoolStack:
    project: Project
    name: str
    pool: dict[str, Any]
    access_key: str                       # the CLI signs with a key of its own: its requests count apart

    @property
    def cfg(self) -> PoolConfig:
        return parse_config(self.pool)

    @property
    def ref(self) -> str:
        return f"organization/runner-pool/{self.name}"


def table_created_at(cfg: PoolConfig) -> Any:
    return aws.client("dynamodb", cfg.region).describe_table(TableName=cfg.table_name)["Table"]["CreationDateTime"]


def live_rows(cfg: PoolConfig) -> list[Any]:
    if not store.table_exists(cfg):
        return []
    return [r for r in store.all_records(store.load_pool(cfg.name, cfg.region)) if r.state in LIVE_STATES]


@pytest.fixture(scope="module")
def stack(local: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolStack]:
    require_cli()
    key = f"AKIDPULUMI{uuid.uuid4().hex[:10].upper()}"
    project = Project(tmp_path_factory.mktemp("pulumi-cli"), env={"AWS_ACCESS_KEY_ID": key})
    pool = pool_config_dict(local)
    s = PoolStack(project, f"pool-{pool['name']}", pool, key)
    project.new_stack(s.name, {"kind": "pool", "pool": pool})
    yield s
    # Whatever a failed test left: unprotect, destroy (the pool's end terminates its instances).
    project.pulumi("state", "unprotect", "--all", "--yes", stack=s.name, check=False)
    project.pulumi("destroy", "--yes", "--skip-preview", stack=s.name, check=False)


def test_preview_of_a_new_pool_stack_lists_six_creates_and_changes_nothing_in_aws(stack: PoolStack, emu: Emu) -> None:
    before = emu.requests(access_key=stack.access_key)
    res = stack.project.pulumi("preview", stack=stack.name)
    assert "+ 6 to create" in res.stdout, res.stdout
    after = emu.requests(access_key=stack.access_key)
    assert after["mutations"] == before["mutations"], after["counts"]
    assert not store.table_exists(stack.cfg)
    assert pool_q.pool_queues(stack.cfg) == {}


def test_up_creates_the_pool_and_a_second_up_reports_no_changes(stack: PoolStack) -> None:
    res = stack.project.pulumi("up", "--yes", "--skip-preview", stack=stack.name)
    assert "+ 6 created" in res.stdout, res.stdout
    out = stack.project.outputs(stack.name)
    assert out["poolName"] == stack.pool["name"] and out["tableName"] == f"runner-pool-{stack.pool['name']}"
    assert sorted(out["queueUrls"]) == ["large", "small"] and out["launchTemplateVersion"] == 1
    assert store.load_pool(stack.pool["name"], stack.pool["region"]).config.idle_time_s == stack.pool["idle_time_s"]
    assert sorted(pool_q.pool_queues(stack.cfg)) == ["large", "small"]

    again = stack.project.pulumi("up", "--yes", "--skip-preview", stack=stack.name)
    assert "6 unchanged" in again.stdout and not re.search(r"[+~-] \d+ (created|updated|deleted|replaced)",
                                                             again.stdout), again.stdout


def test_a_new_class_and_idle_time_update_the_table_in_place_and_add_one_queue(stack: PoolStack) -> None:
    created_at = table_created_at(stack.cfg)
    classes = {**stack.pool["resource_classes"], "medium": {"vcpu": {"min": 4, "max": 4}, "memory_mib": {"min": 8192}}}
    stack.pool = {**stack.pool, "resource_classes": classes, "idle_time_s": 240}
    stack.project.set_config(stack.name, {"kind": "pool", "pool": stack.pool})
    res = stack.project.pulumi("up", "--yes", "--skip-preview", stack=stack.name)
    assert "+ 1 created" in res.stdout and "replaced" not in res.stdout, res.stdout
    assert re.search(r"~ [12] updated", res.stdout), res.stdout
    assert table_created_at(stack.cfg) == created_at                      # the same table, not a new one
    assert sorted(pool_q.pool_queues(stack.cfg)) == ["large", "medium", "small"]
    assert store.load_pool(stack.cfg.name, stack.cfg.region).config.idle_time_s == 240
    assert sorted(stack.project.outputs(stack.name)["queueUrls"]) == ["large", "medium", "small"]


def test_refresh_of_a_converged_pool_is_clean(stack: PoolStack) -> None:
    res = stack.project.pulumi("refresh", "--yes", "--skip-preview", stack=stack.name)
    assert not re.search(r"(updated|deleted|replaced)", res.stdout.split("Resources:")[-1]), res.stdout
    assert "--expect-no-changes" not in res.stderr
    stack.project.pulumi("preview", "--expect-no-changes", stack=stack.name)


def test_an_unsatisfiable_run_stack_exits_non_zero_and_leaves_nothing(stack: PoolStack, emu: Emu) -> None:
    rid = f"cli-fail-{uuid.uuid4().hex[:8]}"
    name = f"run-{rid}"
    stack.project.new_stack(name, {"kind": "run", "poolStack": stack.ref, "runId": rid, "resourceClass": "small",
                                   "count": 2})
    emu.behaviour(match={"pool": stack.cfg.name}, registration="fail")     # no runner ever registers
    res = stack.project.pulumi("up", "--yes", "--skip-preview", stack=name, check=False)
    emu.clear_faults()
    assert res.returncode != 0, res.stdout
    assert f"provision of run {rid} failed" in res.stdout, res.stdout
    assert stack.project.resources(name) == []                            # no fleet in the stack
    assert stack.project.pending(name) == []
    assert store.run_records(store.load_pool(stack.cfg.name, stack.cfg.region), rid) == []
    wait_for(lambda: not pool_instance_ids(stack.cfg), "the rolled-back instances to terminate")
    assert not online(emu, rid)
    stack.project.pulumi("destroy", "--yes", "--skip-preview", stack=name)   # the stack itself and its reference
    stack.project.pulumi("stack", "rm", "--yes", stack=name)


def test_a_run_stack_on_the_pool_stack_gives_label_and_instances_and_destroy_returns_them(
        stack: PoolStack, emu: Emu) -> None:
    rid = f"cli-{uuid.uuid4().hex[:8]}"
    name = f"run-{rid}"
    stack.project.new_stack(name, {"kind": "run", "poolStack": stack.ref, "runId": rid, "resourceClass": "small",
                                   "count": 2})
    up = stack.project.pulumi("up", "--yes", "--skip-preview", stack=name)
    out = stack.project.outputs(name)
    assert out["label"] == rid and out["count"] == 2 and len(out["instanceIds"]) == 2
    # The pool's registration token is in none of what a user (or a job) can see of the run: what `up`
    # printed (the provider host's logs included), the outputs, either stack's state, the table after commit.
    stored = token.read_tokens(stack.cfg)
    assert stored is not None and len(stored.registration) > 8
    table = aws.client("dynamodb", stack.cfg.region).scan(TableName=stack.cfg.table_name)["Items"]
    for what, text in {"up's output": up.stdout + up.stderr, "stack outputs": json.dumps(out),
                       "the run stack's state": json.dumps(stack.project.export(name)),
                       "the pool stack's state": json.dumps(stack.project.export(stack.name)),
                       "the state table": json.dumps(table)}.items():
        assert stored.registration not in text, f"the registration token is in {what}"
    assert sorted(r["name"].rsplit("-", 1)[0] for r in online(emu, rid)) == sorted(out["instanceIds"])
    pool = store.load_pool(stack.cfg.name, stack.cfg.region)
    assert {r.instance_id for r in store.run_records(pool, rid)} == set(out["instanceIds"])

    stack.project.pulumi("destroy", "--yes", "--skip-preview", stack=name)
    rows = {r.instance_id: r for r in store.all_records(pool)}
    assert all(rows[i].state is State.IDLE and rows[i].run_id is None for i in out["instanceIds"])
    wait_for(lambda: not online(emu, rid), f"the runners of {rid} to leave GitHub")
    assert stack.project.resources(name) == []
    stack.project.pulumi("stack", "rm", "--yes", stack=name)


def test_destroy_is_refused_while_the_table_is_protected_and_then_removes_everything_table_last(
        stack: PoolStack, emu: Emu) -> None:
    assert live_rows(stack.cfg), "the pool should hold the runners the run stack gave back"
    refused = stack.project.pulumi("destroy", "--yes", "--skip-preview", stack=stack.name, check=False)
    assert refused.returncode != 0 and "protect" in (refused.stdout + refused.stderr)
    assert store.table_exists(stack.cfg) and pool_instance_ids(stack.cfg)

    stack.project.set_config(stack.name, {"kind": "pool", "pool": stack.pool, "protect": False})
    stack.project.pulumi("up", "--yes", "--skip-preview", stack=stack.name)
    res = stack.project.pulumi("destroy", "--yes", "--skip-preview", stack=stack.name)
    lines = [ln for ln in res.stdout.splitlines() if " deleted" in ln and "pulumi-python:dynamic" in ln]
    assert len(lines) == 6 and "StateTable" in lines[-1], res.stdout          # 3 queues, template, token, table
    assert not store.table_exists(stack.cfg)
    assert pool_q.pool_queues(stack.cfg) == {}
    assert pool_instance_ids(stack.cfg) == []
    wait_for(lambda: not [r for r in emu.runners() if stack.cfg.pool_label in [lb["name"] for lb in r["labels"]]],
             "the pool's runners to leave GitHub")
    assert stack.project.resources(stack.name) == []
