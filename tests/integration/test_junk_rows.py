"""Junk in the table: every reader skips, logs and counts a row it cannot read; the pool keeps working.

An instance can write only the agent attributes of its own agent row (the
instance policy), but the readers must not depend on that: a row written by an
older agent, by hand, or by an attacker with a wider role must not take
refresh, release, status or reconcile down for everyone. Here the junk is
planted straight into the table, as an instance with the old, unlimited
UpdateItem could: ``state``/``threshold``/``run_id`` on its agent row put it into
both indexes, and ``launched_at="x"`` and ``heartbeat_at="x"`` are not numbers.
"""
from __future__ import annotations

import json
from typing import Any

from controlplane import aws
from controlplane.provision import ProvisionRequest, provision
from tests.conftest import Emu, run_cli
from tests.factories import run_id


def plant_junk(pool: Any, instance_id: str, run_id: str) -> str:
    """Write, on ``instance_id``'s agent row, what an instance with an unlimited UpdateItem could."""
    pk = f"agent#{pool.arn(instance_id)}"
    aws.client("dynamodb", pool.region).update_item(
        TableName=pool.table, Key={"pk": {"S": pk}, "sk": {"S": "agent"}},
        UpdateExpression="SET #s = :s, threshold = :t, run_id = :r, launched_at = :l, heartbeat_at = :h",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": {"S": "idle"}, ":t": {"N": "1"}, ":r": {"S": run_id},
                                   ":l": {"S": "x"}, ":h": {"S": "x"}})
    return pk


def cli_json(*args: str) -> tuple[int, dict[str, Any], str]:
    res = run_cli(*args, "--json")
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else {}), res.stderr


def test_refresh_release_status_and_reconcile_skip_a_junk_agent_row_and_report_it(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(run_id(), "small", 2))
    assert a.ok, a.reason
    victim = a.instance_ids[0]
    emu.kill_agent(victim)                    # so no heartbeat of its own overwrites the junk
    pk = plant_junk(pool, victim, a.run_id)
    name = ["--pool", pool.name]

    code, refreshed, err = cli_json("refresh", *name)
    assert code == 0, err
    assert pk in [r["pk"] for r in refreshed["skipped_rows"]]

    code, status, err = cli_json("status", *name)
    assert code == 0, err
    assert pk in [r["pk"] for r in status["skipped_rows"]]            # heartbeat_at "x": not an agent row
    assert status["by_state"].get("running", 0) + status["by_state"].get("claimed", 0) == 2

    code, released, err = cli_json("release", *name, "--run-id", a.run_id)
    assert code == 0, err
    # The junk agent row cannot vouch for its instance: that one is retired, the other goes back to the pool.
    assert released["terminated"] == [victim] and released["returned_to_pool"] == [a.instance_ids[1]]
    assert pk in [r["pk"] for r in released["skipped_rows"]]

    code, reconciled, err = cli_json("reconcile", *name)
    assert code == 0, err
    assert reconciled["failed"] == []

    # And the pool still serves: a new run gets its runner.
    b = provision(pool, ProvisionRequest(run_id(), "small", 1))
    assert b.ok, b.reason


def test_the_human_output_warns_once_about_the_skipped_row(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(run_id(), "small", 1))
    assert a.ok, a.reason
    emu.kill_agent(a.instance_ids[0])
    pk = plant_junk(pool, a.instance_ids[0], a.run_id)
    res = run_cli("status", "--pool", pool.name)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and pk in warnings[0] and "unreadable agent row" in warnings[0]
