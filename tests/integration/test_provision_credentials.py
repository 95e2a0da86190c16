"""What a provision hands its instances, and what is left of it afterwards.

End to end on the embedded default (emulator, simulator running the real agent,
GitHub stand-in): the registration credential is in an instance's state row
only while it registers; commit and rollback take it away; runners leave
GitHub through the control plane's REST calls; ephemeral classes register
just-in-time runners and are never reused.
"""
from __future__ import annotations

from typing import Any

from controlplane import aws, store
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.records import REGISTRATION_ATTRIBUTES
from controlplane.release import release
from tests.conftest import Emu
from tests.factories import provision_rolled_back_by_one_failed_registration, run_id


def prov(pool: Any, n: int, cls: str = "small") -> ProvisionResult:
    return provision(pool, ProvisionRequest(run_id(), cls, n))


def state_items(pool: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    ddb = aws.client("dynamodb", pool.region)
    return {i: ddb.get_item(TableName=pool.table, Key={"pk": {"S": pool.arn(i)}, "sk": {"S": "state"}},
                            ConsistentRead=True).get("Item") or {} for i in ids}


def credentials_left(pool: Any, ids: list[str]) -> dict[str, list[str]]:
    return {i: sorted(set(item) & set(REGISTRATION_ATTRIBUTES)) for i, item in state_items(pool, ids).items()
            if set(item) & set(REGISTRATION_ATTRIBUTES)}


def runners_of(emu: Emu, ids: list[str]) -> list[dict[str, Any]]:
    return [r for r in emu.runners() if any(r["name"].startswith(f"{i}-") for i in ids)]


def test_after_commit_no_row_holds_a_credential_and_every_runner_stays_registered(make_pool: Any,
                                                                                  emu: Emu) -> None:
    # Re-registration every run (a relabelling pool keeps its runners across runs: tests/integration/test_relabel.py).
    pool = make_pool(fresh_registration=True)
    cold = prov(pool, 2)
    assert cold.ok, cold.reason
    assert credentials_left(pool, cold.instance_ids) == {}
    runners = runners_of(emu, cold.instance_ids)
    assert sorted(r["status"] for r in runners) == ["online", "online"]
    agents = {i: a for i, (_, a) in store.read_set(pool, cold.instance_ids).items()}
    assert sorted(a.runner_id for a in agents.values() if a) == sorted(r["id"] for r in runners), \
        "each agent row records its runner's GitHub id"

    rel = release(pool, cold.run_id)
    assert sorted(rel.returned_to_pool) == sorted(cold.instance_ids)
    assert runners_of(emu, cold.instance_ids) == [], "release deleted the runners on GitHub, not just stopped them"

    warm = prov(pool, 2)
    assert warm.ok and warm.from_pool == 2, warm.reason
    assert credentials_left(pool, warm.instance_ids) == {}
    assert {r["name"].rsplit("-", 1)[1] for r in runners_of(emu, warm.instance_ids)} == {"2"}
    release(pool, warm.run_id)


def test_after_rollback_no_row_holds_a_credential_and_no_runner_of_the_run_is_left(make_pool: Any,
                                                                                  emu: Emu) -> None:
    pool = make_pool()
    warm, res = provision_rolled_back_by_one_failed_registration(pool, emu)
    assert not res.ok
    touched = res.cleanup.terminated + res.cleanup.returned_to_pool
    assert len(touched) == 3 and warm.instance_ids[0] in res.cleanup.returned_to_pool
    assert credentials_left(pool, touched) == {}
    assert [r["name"] for r in emu.runners() if res.label in [lb["name"] for lb in r["labels"]]] == [], \
        "no runner of the failed run stays on GitHub, online or offline"


def test_an_ephemeral_class_registers_just_in_time_runners_and_never_reuses_an_instance(make_pool: Any,
                                                                                       emu: Emu) -> None:
    pool = make_pool(ephemeral=True)
    before = emu.github_state()["requests"]
    first = prov(pool, 2)
    assert first.ok, first.reason
    after = emu.github_state()["requests"]
    jit_key = "POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig"
    assert after.get(jit_key, 0) - before.get(jit_key, 0) == 2
    assert credentials_left(pool, first.instance_ids) == {}
    runners = runners_of(emu, first.instance_ids)
    assert sorted(r["name"] for r in runners) == sorted(f"{i}-1" for i in first.instance_ids)
    assert all({lb["name"] for lb in r["labels"]} == {first.label, pool.config.pool_label} for r in runners)

    rel = release(pool, first.run_id)
    assert sorted(rel.terminated) == sorted(first.instance_ids) and rel.returned_to_pool == []
    assert {r.state.value for r in store.run_records(pool, first.run_id)} <= {"terminated"}
    assert runners_of(emu, first.instance_ids) == []

    second = prov(pool, 1)
    assert second.ok and second.from_pool == 0 and second.created == 1
    assert not set(second.instance_ids) & set(first.instance_ids)
    release(pool, second.run_id)


def test_provision_without_a_github_credential_is_bad_input_and_launches_nothing(make_pool: Any, emu: Emu) -> None:
    from tests.conftest import run_cli_with_own_key

    pool = make_pool()
    p, key = run_cli_with_own_key("provision", "--pool", pool.name, "--run-id", "run-nocred",
                                  "--resource-class", "small", "--count", "1",
                                  env={"RUNNER_POOL_GITHUB_TOKEN": "", "GITHUB_TOKEN": ""})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: GitHub token not set (export RUNNER_POOL_GITHUB_TOKEN")
    assert emu.requests(access_key=key)["mutations"] == 0
    assert store.run_records(pool, "run-nocred") == []
