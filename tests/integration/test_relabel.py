"""Warm hits by relabelling: the pooled runner stays registered, a claim changes its labels.

End to end on the embedded default: the real agent per instance, the GitHub
stand-in matching its jobs to runners on their current labels. Assertions are
what a user would check: runner ids and labels on GitHub, which runner took
which job, rows in the table, what the provision reports.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from controlplane import store
from controlplane.provision import ProvisionRequest, ProvisionResult, provision
from controlplane.records import REGISTRATION_ATTRIBUTES, State
from controlplane.release import release
from tests.conftest import Emu, wait_for
from tests.factories import warm_pool


def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


def prov(pool: Any, n: int) -> ProvisionResult:
    return provision(pool, ProvisionRequest(run_id(), "small", n))


def runner_ids(pool: Any, ids: list[str]) -> dict[str, int | None]:
    """Each instance's GitHub runner id, as its agent row reports it."""
    return {i: (a.runner_id if a else None) for i, (_, a) in store.read_set(pool, ids).items()}


def github_runner(emu: Emu, runner_id: int | None) -> dict[str, Any] | None:
    return next((r for r in emu.runners() if r["id"] == runner_id), None)


def labels_of(runner: dict[str, Any] | None) -> set[str]:
    return {lb["name"] for lb in (runner or {}).get("labels", [])}


def add_job(emu: Emu, labels: list[str], name: str, duration_s: float = 0.0) -> int:
    reply = emu._call(f"{emu.github}/_control/jobs", "POST",
                      {"scope": "octo-org/octo-repo", "labels": labels, "name": name, "duration_s": duration_s})
    return int(reply["id"])


def job(emu: Emu, job_id: int) -> dict[str, Any]:
    return next(j for j in emu._call(f"{emu.github}/_control/jobs")["jobs"] if j["id"] == job_id)


def set_label_delay(emu: Emu, delay_s: float) -> None:
    emu._call(f"{emu.github}/_control/label-delay", "POST", {"delay_s": delay_s})


def test_a_warm_provision_keeps_every_runner_and_registers_nothing_new(make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 3)
    before = runner_ids(pool, first.instance_ids)
    assert all(before.values())
    for iid, rid in before.items():                 # released: still registered, online, no label at all
        runner = github_runner(emu, rid)
        assert runner is not None and runner["name"].startswith(f"{iid}-") and runner["status"] == "online"
        assert labels_of(runner) == set()
    registrations = emu.github_requests("POST /_runner/register")
    tokens = emu.github_state()["tokens_issued"]

    second = prov(pool, 3)

    assert second.ok, second.reason
    assert sorted(second.instance_ids) == sorted(first.instance_ids) and second.relabelled == 3
    assert second.fallback == {}
    assert runner_ids(pool, second.instance_ids) == before          # the same runners, no new registration
    assert emu.github_requests("POST /_runner/register") == registrations
    assert emu.github_state()["tokens_issued"] == tokens
    for rid in before.values():
        assert labels_of(github_runner(emu, rid)) == {second.label, pool.config.pool_label}
    for record, _ in store.read_set(pool, second.instance_ids).values():
        assert record is not None and record.state is State.RUNNING
        assert not set(REGISTRATION_ATTRIBUTES) & set(record.to_item())    # no credential was ever handed over


def test_relabelled_runners_take_a_job_of_their_run_and_none_of_an_earlier_run(make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 2)
    second = prov(pool, 2)
    assert second.ok and second.relabelled == 2, second.reason
    # The earlier run's job is queued first: the stand-in hands a runner the oldest job it matches.
    old = add_job(emu, [first.label], "late job of the released run")
    new = add_job(emu, [second.label], "job of the new run")

    taken = wait_for(lambda: job(emu, new) if job(emu, new)["status"] == "completed" else None,
                     "a runner of the new run to take and finish its job")

    assert taken["runner_id"] in runner_ids(pool, second.instance_ids).values()
    assert set(taken["runner_labels"]) == {second.label, pool.config.pool_label}
    assert job(emu, old)["status"] == "queued"                          # no runner carries the old label


def test_a_refused_relabel_falls_back_to_a_fresh_registration_for_that_runner_alone(
        make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 3)
    before = runner_ids(pool, first.instance_ids)
    refused = min(first.instance_ids)
    emu.github_fault(mode="fail", name_contains=refused, path_contains="/labels", status=422, count=1,
                     message="Validation Failed")

    second = prov(pool, 3)

    assert second.ok, second.reason
    assert sorted(second.instance_ids) == sorted(first.instance_ids) and second.created == 0
    assert second.relabelled == 2 and list(second.fallback) == [refused]
    assert "relabel refused" in second.fallback[refused]
    after = runner_ids(pool, second.instance_ids)
    assert {i: r for i, r in after.items() if i != refused} == {i: r for i, r in before.items() if i != refused}
    assert after[refused] not in (None, before[refused])                # a new registration, the old one gone
    assert github_runner(emu, before[refused]) is None
    fresh = github_runner(emu, after[refused])
    assert fresh is not None and fresh["name"] == f"{refused}-2"
    assert labels_of(fresh) == {second.label, pool.config.pool_label}
    for record, _ in store.read_set(pool, second.instance_ids).values():
        assert record is not None and not set(REGISTRATION_ATTRIBUTES) & set(record.to_item())
    rel = release(pool, second.run_id)                                  # and all three go back, listening
    assert sorted(rel.returned_to_pool) == sorted(first.instance_ids)
    assert all(labels_of(github_runner(emu, r)) == set() for r in after.values())


def test_a_label_change_that_takes_effect_late_is_waited_for_not_assumed(make_pool: Any, emu: Emu) -> None:
    pool, _ = warm_pool(make_pool, 2)
    set_label_delay(emu, 2.0)
    try:
        second = prov(pool, 2)
        returned_at = time.time()
    finally:
        set_label_delay(emu, 0.0)
    assert second.ok and second.relabelled == 2, second.reason
    for rid in runner_ids(pool, second.instance_ids).values():
        runner = github_runner(emu, rid)
        assert runner is not None and runner["pending_labels"] is None
        assert labels_of(runner) == {second.label, pool.config.pool_label}
        assert runner["labels_changed_at"] <= returned_at                # in effect before the claim succeeded


def test_release_drains_a_runner_that_is_busy_and_the_next_claim_registers_it_anew(
        make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 2)
    second = prov(pool, 2)
    assert second.ok and second.relabelled == 2, second.reason
    long_job = add_job(emu, [second.label], "still running at release", duration_s=300)
    busy = wait_for(lambda: job(emu, long_job) if job(emu, long_job)["status"] == "in_progress" else None,
                    "a runner to take the long job")
    busy_iid = next(i for i, r in runner_ids(pool, second.instance_ids).items() if r == busy["runner_id"])

    rel = release(pool, second.run_id)

    assert sorted(rel.returned_to_pool) == sorted(first.instance_ids)
    assert github_runner(emu, busy["runner_id"]) is None                # stopped and deleted, not relabelled
    assert job(emu, long_job)["status"] == "abandoned"
    third = prov(pool, 2)
    assert third.ok, third.reason
    assert third.relabelled == 1 and list(third.fallback) == [busy_iid]
    assert labels_of(github_runner(emu, runner_ids(pool, [busy_iid])[busy_iid])) == {
        third.label, pool.config.pool_label}


def test_a_pool_with_fresh_registration_registers_every_run_anew(make_pool: Any, emu: Emu) -> None:
    pool, first = warm_pool(make_pool, 2, fresh_registration=True)
    before = runner_ids(pool, first.instance_ids)
    assert all(github_runner(emu, r) is None for r in before.values())  # release deregistered them
    second = prov(pool, 2)
    assert second.ok, second.reason
    assert second.from_pool == 2 and second.relabelled == 0
    after = runner_ids(pool, second.instance_ids)
    assert set(after.values()).isdisjoint(before.values())
    assert all(labels_of(github_runner(emu, r)) == {second.label, pool.config.pool_label} for r in after.values())
