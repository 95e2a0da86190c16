"""Each dynamic resource through the real provider host, as ``pulumi up`` drives it.

The provider host (``python -m pulumi.dynamic``) runs as its own process in
the project root with the session's environment (the embedded default: AWS
emulator, GitHub stand-in, simulated instances running the real agent), and
the tests speak gRPC to it like the engine: Configure, Check, Create, Diff,
Update, Read, Delete, with outputs round-tripped through protobuf (numbers
come back as floats). Assertions read what a user would check: the table,
queues, launch template versions and SSM parameter in the emulator, rows in
the state table, instances in EC2 and runners in the GitHub stand-in.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pulumi.runtime import rpc

from controlplane import aws, launch_template, store, token
from controlplane import pool as pool_q
from controlplane.config import PoolConfig, parse_config
from controlplane.records import State as Row
from dynamic_providers import (
    LaunchTemplateProvider,
    RegistrationTokenProvider,
    ResourceClassPoolProvider,
    RunnerFleetProvider,
    StateTableProvider,
)
from tests.conftest import Emu, pool_config_dict
from tests.engine.harness import Dyn, ProviderCallError, ProviderHost, State, to_struct
from tests.factories import run_id

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def host(local: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderHost]:
    h = ProviderHost(tmp_path_factory.mktemp("provider-host") / "stderr.log")
    yield h
    h.close()


def camel_pool(local: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A pool config as Pulumi stack config carries it: camelCase keys everywhere."""
    cfg = parse_config(pool_config_dict(local, **overrides))
    return json.loads(cfg.model_dump_json(by_alias=True, exclude_none=True))


@pytest.fixture
def pool_dict(local: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A fresh pool name; whatever the test leaves of it is destroyed afterwards."""
    d = camel_pool(local)
    yield d
    leave_nothing(parse_config(d))


def leave_nothing(cfg: PoolConfig) -> None:
    """Remove whatever a test left of a pool (each piece may already be gone)."""
    for cls, url in pool_q.pool_queues(cfg).items():
        pool_q.delete_queue(cfg.region, url)
        pool_q.delete_queue(cfg.region, pool_q.dlq_url(cfg, cls) or url)
    if launch_template.current(cfg) is not None:      # moto: deleting a missing template is MissingParameter
        launch_template.delete(cfg)
    token.delete_tokens(cfg)
    store.delete_table(cfg)


def with_(d: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**d, **changes}



# ---------------------------------------------------------------- StateTable


def test_state_table_create_update_delete(host: ProviderHost, pool_dict: dict[str, Any]) -> None:
    table = Dyn(host, StateTableProvider(), "StateTable", "table")
    cfg = parse_config(pool_dict)
    ddb = aws.client("dynamodb", cfg.region)

    st = table.create({"pool": pool_dict})
    assert st.id == cfg.table_name == st.outs["tableName"]
    assert st.outs["poolName"] == cfg.name and st.outs["region"] == cfg.region
    assert st.outs["tableArn"].endswith(f":table/{cfg.table_name}")
    assert ddb.describe_time_to_live(TableName=cfg.table_name)["TimeToLiveDescription"]["TimeToLiveStatus"] in (
        "ENABLED", "ENABLING")
    backups = ddb.describe_continuous_backups(TableName=cfg.table_name)["ContinuousBackupsDescription"]
    assert backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "ENABLED"
    assert store.load_pool(cfg.name, cfg.region).config.idle_time_s == cfg.idle_time_s   # run stacks can load it

    assert table.diff(st, {"pool": pool_dict}).changes is False           # floats from the engine are no change
    changed = with_(pool_dict, idleTimeS=900)
    d = table.diff(st, {"pool": changed})
    assert d.changes is True and d.replaces == []
    st = table.update(st, {"pool": changed})
    assert store.load_pool(cfg.name, cfg.region).config.idle_time_s == 900                 # stored config updated
    assert table.diff(st, {"pool": with_(pool_dict, name="other")}).replaces == ["pool"]
    assert table.diff(st, {"pool": with_(pool_dict, region="us-west-2")}).replaces == ["pool"]

    assert table.read(st).id == st.id
    table.delete(st)
    assert not store.table_exists(cfg)
    assert table.read(st).id == ""
    table.delete(st)                                                      # a second delete succeeds


# ---------------------------------------------------------------- ResourceClassPool


def test_resource_class_pool_create_update_delete(host: ProviderHost, pool_dict: dict[str, Any]) -> None:
    q = Dyn(host, ResourceClassPoolProvider(), "ResourceClassPool", "queue-small")
    cfg = parse_config(pool_dict)
    sqs = aws.client("sqs", cfg.region)

    st = q.create({"pool": pool_dict, "resourceClass": "small"})
    assert st.id == st.outs["queueUrl"] == pool_q.queue_url(cfg, "small")
    assert st.outs["dlqUrl"] == pool_q.dlq_url(cfg, "small") and st.outs["queueName"] == cfg.queue_name("small")
    redrive = json.loads(sqs.get_queue_attributes(QueueUrl=st.id, AttributeNames=["RedrivePolicy"])
                         ["Attributes"]["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(cfg.dlq_name("small"))
    assert pool_q.dlq_url(cfg, "large") is None                           # one class only

    assert q.diff(st, {"pool": with_(pool_dict, idleTimeS=900), "resourceClass": "small"}).changes is False
    d = q.diff(st, {"pool": pool_dict, "resourceClass": "large"})
    assert d.replaces == ["resourceClass"]
    st = q.update(st, {"pool": pool_dict, "resourceClass": "small"})       # converges, same queue
    assert st.outs["queueUrl"] == st.id

    assert q.read(st).id == st.id
    q.delete(st)
    assert pool_q.dlq_url(cfg, "small") is None
    assert q.read(st).id == ""
    q.delete(st)


# ---------------------------------------------------------------- LaunchTemplate


def test_launch_template_update_adds_a_default_version_and_keeps_the_template(
        host: ProviderHost, pool_dict: dict[str, Any]) -> None:
    lt = Dyn(host, LaunchTemplateProvider(), "LaunchTemplate", "launch-template")
    cfg = parse_config(pool_dict)
    ec2 = aws.client("ec2", cfg.region)

    st = lt.create({"pool": pool_dict})
    assert st.id == st.outs["launchTemplateId"] and st.outs["version"] == 1
    assert lt.diff(st, {"pool": pool_dict}).changes is False
    assert lt.diff(st, {"pool": with_(pool_dict, idleTimeS=900)}).changes is False  # not in the template

    changed = with_(pool_dict, preRunnerScript="echo warm caches")
    d = lt.diff(st, {"pool": changed})
    assert d.changes is True and d.replaces == []
    st2 = lt.update(st, {"pool": changed})
    assert st2.id == st.id and st2.outs["launchTemplateId"] == st.id               # never replaced
    assert st2.outs["version"] == 2
    desc = ec2.describe_launch_templates(LaunchTemplateIds=[st.id])["LaunchTemplates"][0]
    assert int(desc["DefaultVersionNumber"]) == 2
    assert lt.diff(st2, {"pool": changed}).changes is False
    assert lt.read(st2).outs["version"] == 2

    lt.delete(st2)
    assert ec2.describe_launch_templates(Filters=[{"Name": "launch-template-name",
                                                   "Values": [cfg.launch_template_name]}])["LaunchTemplates"] == []
    assert lt.read(st2).id == ""
    lt.delete(st2)


def test_launch_template_check_refuses_user_data_over_the_ec2_limit(host: ProviderHost,
                                                                   pool_dict: dict[str, Any]) -> None:
    lt = Dyn(host, LaunchTemplateProvider(), "LaunchTemplate", "launch-template")
    # Distinct digests: the user data is gzipped, so a repetitive script would compress under the limit.
    script = "".join(f"echo {hashlib.sha256(str(i).encode()).hexdigest()}\n" for i in range(400))
    chk = lt.check({"pool": with_(pool_dict, preRunnerScript=script)})
    assert [p for p, _ in chk.failures] == ["pool"]
    assert "16384 byte limit" in chk.failures[0][1]


# ---------------------------------------------------------------- RegistrationToken


def test_registration_token_rotates_when_an_up_finds_it_near_expiry(host: ProviderHost,
                                                                   pool_dict: dict[str, Any]) -> None:
    tok = Dyn(host, RegistrationTokenProvider(), "RegistrationToken", "runner-tokens")
    cfg = parse_config(pool_dict)

    st = tok.create({"pool": pool_dict})
    stored = token.read_tokens(cfg)
    assert stored is not None and st.id == cfg.token_parameter == st.outs["parameterName"]
    assert st.outs["expiresAt"] == int(stored.expires_at)
    wire = json.dumps(st.outs)
    assert stored.registration not in wire        # never an output

    assert tok.diff(st, {"pool": pool_dict}).changes is False                    # a fresh hour left
    token.write_tokens(cfg, token.StoredTokens(stored.registration, time.time() + 60))
    d = tok.diff(st, {"pool": pool_dict})
    assert d.changes is True and d.replaces == []
    st = tok.update(st, {"pool": pool_dict})
    fresh = token.read_tokens(cfg)
    assert fresh is not None and fresh.registration != stored.registration
    assert fresh.seconds_left(time.time()) > cfg.token_refresh_margin_s
    assert st.outs["expiresAt"] == int(fresh.expires_at)

    other_repo = with_(pool_dict, github={**pool_dict["github"], "repository": "octo-org/other-repo"})
    d = tok.diff(st, {"pool": other_repo})
    assert d.changes is True and d.replaces == []                        # tokens of another scope
    st = tok.update(st, {"pool": other_repo})
    rescoped = token.read_tokens(cfg)
    assert rescoped is not None and rescoped.registration != fresh.registration   # forced, though fresh
    assert set(st.outs) == {"pool", "parameterName", "expiresAt", "__provider"}

    assert tok.read(st).id == st.id
    tok.delete(st)
    assert token.read_tokens(cfg) is None
    assert tok.read(st).id == ""
    tok.delete(st)


# ---------------------------------------------------------------- RunnerFleet


def fleet_inputs(pool: store.Pool, rid: str, count: int = 2, **extra: Any) -> dict[str, Any]:
    return {"poolName": pool.name, "region": pool.region, "runId": rid, "resourceClass": "small", "count": count,
            **extra}


def online_for(emu: Emu, label: str) -> list[dict[str, Any]]:
    return [r for r in emu.runners() if label in [lb["name"] for lb in r["labels"]] and r["status"] == "online"]


def live_ec2(pool: store.Pool, rid: str) -> list[str]:
    ec2 = aws.client("ec2", pool.region)
    resp = ec2.describe_instances(Filters=[{"Name": "tag:runner-pool:run-id", "Values": [rid]},
                                           {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i["InstanceId"] for r in resp["Reservations"] for i in r["Instances"]]


def row_states(pool: store.Pool, ids: list[str]) -> set[str]:
    return {(r.state.value if r else "missing") for r, _ in store.read_set(pool, ids).values()}


def test_fleet_create_delete_and_a_rolled_back_create_through_the_engine(
        host: ProviderHost, make_pool: Any, emu: Emu) -> None:
    pool = make_pool()
    fleet = Dyn(host, RunnerFleetProvider(), "RunnerFleet", "fleet")
    rid = run_id()

    st = fleet.create(fleet_inputs(pool, rid))
    ids = st.outs["instanceIds"]
    assert st.id == rid and st.outs["label"] == rid and st.outs["count"] == 2 and len(ids) == 2
    assert {i["id"] for i in st.outs["instances"]} == set(ids)
    assert row_states(pool, ids) == {"running"}
    assert len(online_for(emu, rid)) == 2

    d = fleet.diff(st, fleet_inputs(pool, rid, count=3))
    assert d.changes is True and d.replaces == ["count"] and d.delete_before_replace is True
    assert fleet.diff(st, fleet_inputs(pool, rid)).changes is False        # 2.0 from the engine is 2
    assert fleet.diff(st, fleet_inputs(pool, rid, usageClass="spot")).replaces == ["usageClass"]
    assert fleet.read(st).outs["instanceIds"] == sorted(ids)

    fleet.delete(st)                                                      # release: back to the pool
    assert row_states(pool, ids) == {"idle"}
    assert online_for(emu, rid) == []
    assert fleet.read(st).id == ""
    fleet.delete(st)                                                      # a re-run of delete succeeds

    # One of the new instances fails to register: the create raises after the rollback,
    # the pooled runner it claimed goes back idle and the created one is terminated.
    emu.behaviour(match={"pool": pool.name}, count=1, registration="fail")
    failed_rid = run_id()
    with pytest.raises(ProviderCallError) as err:
        fleet.create(fleet_inputs(pool, failed_rid, count=3))
    assert "failed validation" in err.value.details and "rolled back" in err.value.details
    assert live_ec2(pool, failed_rid) == []
    assert online_for(emu, failed_rid) == []
    assert [r for r in store.run_records(pool, failed_rid) if r.state is not Row.TERMINATED] == []
    assert row_states(pool, ids) == {"idle"}


def test_fleet_check_reports_each_bad_input(host: ProviderHost) -> None:
    fleet = Dyn(host, RunnerFleetProvider(), "RunnerFleet", "fleet")
    chk = fleet.check({"poolName": "Bad_Pool", "region": "mars", "runId": "no spaces allowed",
                       "count": 2.5, "usageClass": "reserved"})
    reasons = dict(chk.failures)
    assert set(reasons) == {"poolName", "region", "runId", "resourceClass", "count", "usageClass"}
    assert "whole number" in reasons["count"] and "spot, on-demand" in reasons["usageClass"]
    assert "is required" in reasons["resourceClass"]
    assert dict(fleet.check({**fleet_inputs_plain(), "count": 0}).failures) == {
        "count": "count must be from 1 to 500, got 0"}
    assert fleet.check(fleet_inputs_plain()).failures == []
    assert fleet.check(fleet_inputs_plain()).props["count"] == 2


def test_preview_with_unknown_inputs_checks_what_is_known_and_diffs_as_changed(
        host: ProviderHost, local: dict[str, Any]) -> None:
    fleet = Dyn(host, RunnerFleetProvider(), "RunnerFleet", "fleet")
    unknown = rpc.UNKNOWN                                 # what the engine sends for a value not known yet
    assert fleet.check({**fleet_inputs_plain(), "poolName": unknown, "count": unknown}).failures == []
    assert [p for p, _ in fleet.check({**fleet_inputs_plain(), "count": unknown, "runId": "a b"}).failures] == [
        "runId"]
    table = Dyn(host, StateTableProvider(), "StateTable", "table")
    assert table.check({"pool": {**camel_pool(local), "name": unknown}}).failures == []
    old = State("r", to_struct(fleet_inputs_plain()), to_struct(fleet_inputs_plain()))
    d = fleet.diff(old, {**fleet_inputs_plain(), "poolName": unknown})
    assert d.changes is True and d.replaces == ["poolName"]


def fleet_inputs_plain() -> dict[str, Any]:
    return {"poolName": "demo", "region": "us-east-1", "runId": "123-1", "resourceClass": "small", "count": 2}


def test_pool_check_names_every_bad_field(host: ProviderHost, local: dict[str, Any]) -> None:
    table = Dyn(host, StateTableProvider(), "StateTable", "table")
    bad = with_(camel_pool(local), subnets=["subnet-zz"], ami="ubuntu")
    failures = table.check({"pool": bad}).failures
    assert {p for p, _ in failures} == {"pool"}
    assert any(r.startswith("pool.subnets") for _, r in failures) and any(r.startswith("pool.ami") for _, r in failures)
    q = Dyn(host, ResourceClassPoolProvider(), "ResourceClassPool", "queue-x")
    assert [p for p, _ in q.check({"pool": camel_pool(local), "resourceClass": "xl"}).failures] == ["resourceClass"]


def test_provider_host_error_reads_like_the_cli(host: ProviderHost, local: dict[str, Any]) -> None:
    fleet = Dyn(host, RunnerFleetProvider(), "RunnerFleet", "fleet")
    with pytest.raises(ProviderCallError) as err:
        fleet.create({"poolName": "nosuchpool", "region": local["network"]["region"], "runId": run_id(),
                      "resourceClass": "small", "count": 1})
    assert "pool 'nosuchpool' not found" in err.value.details
    assert "runner-pool pool apply" in err.value.details                 # the hint travels with it

