"""A URN change must not destroy the pool: owners, protection and aliases, with the real CLI.

Every create of the program is an idempotent "ensure", so without an owner
the engine would adopt an existing table under a new URN and then delete the
old URN: every instance terminated, the table gone. Here a second stack naming
the same pool, and a rename of the table without ``aliases``, both fail and
leave the pool as it was; the same rename with ``aliases`` is an in-place
re-tag of the same table.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import aws, launch_template, ownership, store
from controlplane import pool as pool_q
from controlplane.config import PoolConfig, parse_config
from tests.conftest import pool_config_dict
from tests.engine.project import Project, require_cli

pytestmark = [pytest.mark.cli, pytest.mark.timeout(900)]

TABLE_LINE = 'StateTable("table", StateTableArgs(pool=raw, owner=owner("table"))'
RENAMED_LINE = 'StateTable("state-table", StateTableArgs(pool=raw, owner=owner("state-table"))'
PROTECT = "pulumi.ResourceOptions(protect=protect is not False)"
WITH_ALIAS = 'pulumi.ResourceOptions(protect=protect is not False, aliases=[pulumi.Alias(name="table")])'


def created_at(cfg: PoolConfig) -> Any:
    return aws.client("dynamodb", cfg.region).describe_table(TableName=cfg.table_name)["Table"]["CreationDateTime"]


def program_with(project: Project, *replacements: tuple[str, str]) -> None:
    """Edit the project's copy of ``__main__.py`` as a user renaming a resource would."""
    path = project.dir / "__main__.py"
    text = path.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)


@pytest.fixture
def pool_up(local: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Project, dict[str, Any], str]]:
    require_cli()
    project = Project(tmp_path)
    pool = pool_config_dict(local, name=f"own{uuid.uuid4().hex[:8]}")
    name = "owner-a"
    project.new_stack(name, {"kind": "pool", "pool": pool})
    project.pulumi("up", "--yes", "--skip-preview", stack=name)
    yield project, pool, name
    project.pulumi("state", "unprotect", "--all", "--yes", stack=name, check=False)
    project.pulumi("destroy", "--yes", "--skip-preview", stack=name, check=False)


def test_a_second_stack_naming_the_same_pool_fails_and_leaves_the_first_ones_pool_alone(
        pool_up: tuple[Project, dict[str, Any], str]) -> None:
    project, pool, first = pool_up
    cfg = parse_config(pool)
    before = created_at(cfg)
    project.new_stack("owner-b", {"kind": "pool", "pool": pool, "protect": False})
    res = project.pulumi("up", "--yes", "--skip-preview", stack="owner-b", check=False)
    assert res.returncode != 0
    assert f"is managed by organization/runner-pool/{first}/table" in res.stdout, res.stdout
    assert project.resources("owner-b") == []
    assert created_at(cfg) == before and store.load_pool(cfg.name, cfg.region).name == cfg.name
    assert sorted(pool_q.pool_queues(cfg)) == ["large", "small"] and launch_template.current(cfg) is not None
    assert ownership.table_owner(cfg) == f"organization/runner-pool/{first}/table"
    # Removing the failed stack touches nothing of the first one's.
    project.pulumi("destroy", "--yes", "--skip-preview", "--remove", stack="owner-b")
    assert store.table_exists(cfg) and sorted(pool_q.pool_queues(cfg)) == ["large", "small"]
    project.pulumi("preview", "--expect-no-changes", stack=first)


def test_renaming_the_table_without_aliases_fails_and_with_aliases_keeps_the_same_table(
        pool_up: tuple[Project, dict[str, Any], str]) -> None:
    project, pool, stack = pool_up
    cfg = parse_config(pool)
    before = created_at(cfg)

    program_with(project, (TABLE_LINE, RENAMED_LINE))
    res = project.pulumi("up", "--yes", "--skip-preview", stack=stack, check=False)
    assert res.returncode != 0 and "aliases" in res.stdout, res.stdout
    assert f"managed by organization/runner-pool/{stack}/table" in res.stdout
    assert store.table_exists(cfg) and created_at(cfg) == before
    assert sorted(pool_q.pool_queues(cfg)) == ["large", "small"]

    program_with(project, (PROTECT, WITH_ALIAS))
    res = project.pulumi("up", "--yes", "--skip-preview", stack=stack)
    assert "created" not in res.stdout.split("Resources:")[-1] and "deleted" not in res.stdout, res.stdout
    assert created_at(cfg) == before                                   # the same table
    assert ownership.table_owner(cfg) == f"organization/runner-pool/{stack}/state-table", res.stdout
    assert any(r["urn"].endswith("::state-table") and r.get("protect") for r in project.resources(stack))
    project.pulumi("preview", "--expect-no-changes", stack=stack)
