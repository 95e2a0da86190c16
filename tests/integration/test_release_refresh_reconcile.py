"""Release, refresh and reconcile on the embedded default: nothing leaks."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid
from typing import Any

from controlplane import launch_template, store, token
from controlplane import pool as pool_q
from controlplane.clock import AheadClock
from controlplane.github import github_client_from_env
from controlplane.provision import ProvisionRequest, provision
from controlplane.reconcile import reconcile
from controlplane.records import InstanceRecord, State
from controlplane.refresh import refresh
from controlplane.release import release
from tests.conftest import Emu
from tests.integration.test_provision import ec2_states, online_runners, states


def rid() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


def test_release_returns_every_runner_and_the_next_provision_claims_them(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "small", 3))
    assert a.ok, a.reason
    r = release(pool, a.run_id)
    assert sorted(r.returned_to_pool) == sorted(a.instance_ids) and r.terminated == []
    assert pool_q.depth(pool.region, pool_q.queue_url(pool.config, "small"))["visible"] == 3
    b = provision(pool, ProvisionRequest(rid(), "small", 3))
    assert sorted(b.instance_ids) == sorted(a.instance_ids)
    rows = store.read_set(pool, b.instance_ids)
    assert all(rec.reuse_count == 1 for rec, _ in rows.values())


def test_release_twice_is_safe_and_says_so(make_pool: Any) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "small", 1))
    first, second = release(pool, a.run_id), release(pool, a.run_id)
    assert first.returned_to_pool == a.instance_ids
    assert second.found == [] and "nothing to release" in second.summary()
    assert states(pool, a.instance_ids) == {a.instance_ids[0]: "idle"}


def test_release_when_the_agent_is_dead_terminates_the_instance(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert a.ok
    dead = a.instance_ids[0]
    emu.kill_agent(dead)
    time.sleep(pool.config.heartbeat_stale_s + 1)
    r = release(pool, a.run_id)
    assert r.terminated == [dead] and r.returned_to_pool == [a.instance_ids[1]]
    assert ec2_states(pool, [dead])[dead] in ("terminated", "shutting-down")
    assert states(pool, [dead])[dead] == "terminated"


def test_release_retires_an_instance_at_its_reuse_cap(make_pool: Any, emu: Emu) -> None:
    pool = make_pool(max_reuse=1)
    a = provision(pool, ProvisionRequest(rid(), "small", 1))
    release(pool, a.run_id)
    b = provision(pool, ProvisionRequest(rid(), "small", 1))
    assert b.instance_ids == a.instance_ids
    r = release(pool, b.run_id)
    assert r.terminated == b.instance_ids and r.returned_to_pool == []
    assert online_runners(emu, b.label) == []                       # deregistered before termination


def test_refresh_with_a_changed_ami_makes_one_new_template_version_and_leaves_running_instances(
        make_pool: Any, local: dict[str, Any]) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "small", 1))
    assert a.ok
    before = launch_template.current(pool.config)
    assert before is not None
    changed = pool.config.model_copy(update={"ami": "ami-0fedcba9876543210"})
    res = refresh(changed)
    assert res.launch_template_changed and res.launch_template_version == before.default_version + 1
    again = refresh(changed)
    assert not again.launch_template_changed and again.launch_template_version == res.launch_template_version
    assert states(pool, a.instance_ids) == {a.instance_ids[0]: "running"}
    assert ec2_states(pool, a.instance_ids)[a.instance_ids[0]] == "running"
    assert store.load_pool(pool.name, pool.region).config.ami == "ami-0fedcba9876543210"


def test_refresh_rotates_tokens_near_expiry_only(make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    cfg = pool.config
    fresh = token.read_tokens(cfg)
    assert fresh is not None and fresh.seconds_left(time.time()) > cfg.token_refresh_margin_s
    assert not refresh(cfg, run_reconcile=False).tokens_rotated
    token.write_tokens(cfg, token.StoredTokens(fresh.registration, time.time() + 60))
    res = refresh(cfg, run_reconcile=False)
    assert res.tokens_rotated
    now = token.read_tokens(cfg)
    assert now is not None and now.registration != fresh.registration and now.seconds_left(time.time()) > 3000


def test_a_class_removed_from_config_has_its_queue_drained_and_idle_instances_terminated(make_pool: Any) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "large", 1))
    assert a.ok, a.reason
    release(pool, a.run_id)
    only_small = pool.config.model_copy(update={"resource_classes": {"small": pool.config.resource_classes["small"]}})
    res = refresh(only_small, run_reconcile=False)
    assert res.classes_removed == ["large"] and a.instance_ids[0] in res.terminated
    assert set(pool_q.pool_queues(only_small)) == {"small"}
    assert states(pool, a.instance_ids)[a.instance_ids[0]] == "terminated"


def test_expired_instances_of_each_state_are_terminated(make_pool: Any) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "small", 4))
    assert a.ok
    ids = a.instance_ids
    past = time.time() - 10
    # running past max runtime
    _force(pool, ids[0], State.RUNNING, a.run_id, past)
    # idle past its idle time
    _force(pool, ids[1], State.IDLE, None, past)
    # claimed / created past their deadline (a provisioner that died)
    _force(pool, ids[2], State.CLAIMED, "dead-run", past)
    _force(pool, ids[3], State.CREATED, "dead-run", past)
    res = refresh(pool.config, run_reconcile=False)
    assert {k: sorted(v) for k, v in res.expired.items()} == {
        "running": [ids[0]], "idle": [ids[1]], "claimed": [ids[2]], "created": [ids[3]]}
    assert set(states(pool, ids).values()) == {"terminated"}
    assert set(ec2_states(pool, ids).values()) <= {"terminated", "shutting-down"}


def _force(pool: Any, iid: str, state: State, run: str | None, threshold: float) -> None:
    rec = store.get_record(pool, iid)
    assert rec is not None
    store.put_record(pool, InstanceRecord(**{**rec.__dict__, "state": state, "run_id": run, "threshold": threshold}))


def test_reconcile_finds_and_fixes_each_kind_of_drift(make_pool: Any, emu: Emu, local: dict[str, Any]) -> None:
    pool = make_pool()
    a = provision(pool, ProvisionRequest(rid(), "small", 2))
    assert a.ok
    keep, lose_row = a.instance_ids
    # 1. an instance with no row (and old enough): a wedged instance (its agent killed, its runner still
    #    up) whose row is deleted by hand; the clock below is ahead of reconcile's grace period
    emu.kill_agent(lose_row)
    store.delete_rows(pool, [pool.arn(lose_row)])
    # 2. a row with no instance: write a row for an instance that does not exist
    ghost = "i-0123456789abcdef0"
    store.put_record(pool, InstanceRecord(arn=pool.arn(ghost), state=State.IDLE, threshold=time.time() + 300,
                                          resource_class="small", instance_type="c5a.large", usage_class="on-demand",
                                          subnet_id="subnet-1", launched_at=time.time()))
    # 3. a GitHub runner with no live instance, registered by hand through the runner service
    gh = github_client_from_env(pool.config.github.api_url, pool.config.github.scope)
    body = {"url": f"{local['github_url']}/octo-org/octo-repo", "token": gh.registration_token().token,
            "name": "i-00000000000dead00-1", "labels": [pool.config.pool_label], "replace": True}
    req = urllib.request.Request(f"{local['github_url']}/_runner/register", method="POST",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()
    dry = reconcile(pool, dry_run=True, clock=AheadClock(600))
    found = {(x.kind, x.target) for x in dry.actions}
    ghost_runner = [r.id for r in gh.list_runners() if r.name == "i-00000000000dead00-1"]
    orphan_runner = [r.id for r in gh.list_runners() if r.name.startswith(lose_row)]   # goes with its instance
    assert found == {("terminate_instance", lose_row), ("close_row", ghost),
                     ("delete_runner", str(ghost_runner[0])), ("delete_runner", str(orphan_runner[0]))}
    assert ec2_states(pool, [lose_row])[lose_row] == "running"          # dry run changed nothing
    fixed = reconcile(pool, clock=AheadClock(600))
    assert not fixed.failed and {(x.kind, x.target) for x in fixed.applied} == found
    assert ec2_states(pool, [lose_row])[lose_row] in ("terminated", "shutting-down")
    assert states(pool, [ghost])[ghost] == "terminated"
    assert ec2_states(pool, [keep])[keep] == "running"
    assert not [r for r in gh.list_runners() if r.name.startswith("i-00000000000dead00")]
    assert reconcile(pool).actions == []


def test_a_thousand_rows_are_all_seen_by_reconcile(make_pool: Any) -> None:
    pool = make_pool()
    recs = [InstanceRecord(arn=pool.arn(f"i-{k:017x}"), state=State.TERMINATED, threshold=time.time(),
                           resource_class="small", instance_type="c5a.large", usage_class="on-demand",
                           subnet_id="subnet-1", launched_at=time.time()) for k in range(1000)]
    store._batch_write(pool, [{"PutRequest": {"Item": r.to_item()}} for r in recs])
    res = reconcile(pool)
    assert res.checked["rows"] == 1000 and res.actions == []
