"""Test data made in one place: ids and names each scenario needs fresh."""
from __future__ import annotations

import uuid
from typing import Any

from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.release import release


def run_id() -> str:
    """A run id no other test uses (a GitHub run id as the CLI and the program take it)."""
    return f"run-{uuid.uuid4().hex[:10]}"


def provision_rolled_back_by_one_failed_registration(pool: Any, emu: Any) -> tuple[ProvisionResult, ProvisionResult]:
    """A run of three (one warm from the pool, two created) where one registration fails: rolled back.

    Returns (the earlier run that warmed the pool instance and was released, the failed provision).
    """
    warm = provision(pool, ProvisionRequest(run_id(), "small", 1))
    assert warm.ok, warm.reason
    release(pool, warm.run_id)
    emu.behaviour(match={"pool": pool.name}, count=1, registration="fail")
    return warm, provision(pool, ProvisionRequest(run_id(), "small", 3))


def warm_pool(make_pool: Any, n: int, **overrides: Any) -> tuple[Any, ProvisionResult]:
    """A fresh pool whose ``n`` runners were created by one run and released back into it."""
    pool = make_pool(**overrides)
    first = provision(pool, ProvisionRequest(run_id(), "small", n))
    assert first.ok, first.reason
    assert sorted(release(pool, first.run_id).returned_to_pool) == sorted(first.instance_ids)
    return pool, first
