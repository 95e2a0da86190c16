"""IAM policy documents: an instance reaches only its own rows; the control plane only its pool."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import parse_config
from controlplane.iam import (
    POLICY_NAMES,
    assume_role_policy,
    control_plane_policy,
    instance_policy,
    policy,
    pool_admin_policy,
)
from controlplane.records import AGENT_ATTRIBUTES, KEY_ATTRIBUTES

ACCOUNT = "123456789012"
ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "controlplane" / "agent" / "agent.py"


def cfg(**overrides: Any) -> Any:
    base: dict[str, Any] = {
        "name": "ci", "region": "eu-west-1", "github": {"repository": "octo/repo"},
        "resourceClasses": {"small": {"vcpu": {"min": 2}, "memoryMib": {"min": 4096}}},
        "subnets": ["subnet-0123456789abcdef0"], "ami": "ami-0123456789abcdef0", "instanceProfile": "runner",
    }
    base.update(overrides)
    return parse_config(base)


def statements(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in doc["Statement"]}


def actions(doc: dict[str, Any]) -> list[str]:
    return [a for s in doc["Statement"] for a in s["Action"]]


TABLE = f"arn:aws:dynamodb:eu-west-1:{ACCOUNT}:table/runner-pool-ci"
PARAMETER = f"arn:aws:ssm:eu-west-1:{ACCOUNT}:parameter/runner-pool/ci/runner-tokens"


def test_instance_reads_only_its_own_state_row() -> None:
    s = statements(instance_policy(cfg(), ACCOUNT, "aws"))["ReadOwnStateRow"]
    assert s["Action"] == ["dynamodb:GetItem"] and s["Resource"] == [TABLE]
    assert s["Condition"] == {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}"]}}


def test_instance_updates_only_the_agent_attributes_of_its_own_agent_row() -> None:
    s = statements(instance_policy(cfg(), ACCOUNT, "aws"))["WriteAgentAttributesOfOwnAgentRow"]
    assert s["Action"] == ["dynamodb:UpdateItem"] and s["Resource"] == [TABLE]
    every = s["Condition"]["ForAllValues:StringEquals"]
    assert every["dynamodb:LeadingKeys"] == ["agent#${ec2:SourceInstanceARN}"]
    assert set(every["dynamodb:Attributes"]) == set(AGENT_ATTRIBUTES) | {"pk", "sk"}
    assert not {"state", "threshold", "run_id", "launched_at", "version"} & set(every["dynamodb:Attributes"])
    assert s["Condition"]["StringEqualsIfExists"] == {"dynamodb:ReturnValues": ["NONE", "UPDATED_OLD", "UPDATED_NEW"]}


def test_instance_policy_has_no_ssm_no_kms_no_ec2_and_no_wildcard() -> None:
    doc = instance_policy(cfg(), ACCOUNT, "aws")
    assert sorted(actions(doc)) == ["dynamodb:GetItem", "dynamodb:UpdateItem"]
    assert all(s["Effect"] == "Allow" and s["Resource"] == [TABLE] for s in doc["Statement"])
    assert "ssm" not in json.dumps(doc) and "kms" not in json.dumps(doc)


def _agent_written_attributes() -> set[str]:
    """Attribute names the agent writes, read from its source (it cannot import controlplane)."""
    tree = ast.parse(AGENT.read_text())
    written: set[str] = set()
    update_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr == "update" and ast.unparse(n.func.value) == "self.aws"]
    assert update_calls, "the agent writes its row through self.aws.update(...)"
    for call in update_calls:
        arg = call.args[0]
        if isinstance(arg, ast.Dict):
            written |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
        else:    # the pending signal: built from `fields` in Agent.signal
            assert ast.unparse(arg) == "self.pending[0]", f"unknown write path {ast.unparse(arg)}: extend this test"
    signal = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "signal")
    fields = [n.value for n in ast.walk(signal) if isinstance(n, ast.Assign)
              and any(getattr(t, "id", "") == "fields" for t in n.targets)]
    assert fields and isinstance(fields[0], ast.Dict)
    written |= {k.value for k in fields[0].keys if isinstance(k, ast.Constant)}
    pending = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any(ast.unparse(t) == "self.pending" for t in n.targets)]
    assert all(ast.unparse(p.value) in ("None", "(sets, tuple(sorted((k for k in fields if k not in sets))))")
               for p in pending), "self.pending is set from Agent.signal's fields only: extend this test"
    # The only UpdateItem of the agent goes to its agent row.
    raw = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
           and n.func.attr == "update_item"]
    assert raw and all(any(k.arg == "Key" and ast.unparse(k.value) == "self.agent_key" for k in c.keywords)
                       for c in raw)
    return written


def test_every_attribute_the_agent_writes_is_an_agent_attribute() -> None:
    written = _agent_written_attributes()
    assert {"heartbeat_at", "signal"} <= written               # the parse found the writes
    assert written <= set(AGENT_ATTRIBUTES), f"the agent writes {written - set(AGENT_ATTRIBUTES)}: add to AGENT_ATTRIBUTES"
    assert not set(KEY_ATTRIBUTES) & set(AGENT_ATTRIBUTES)


@pytest.mark.parametrize("partition", ["aws", "aws-us-gov", "aws-cn"])
def test_arns_carry_the_partition(partition: str) -> None:
    for name in POLICY_NAMES:
        doc = json.dumps(policy(name, cfg(), ACCOUNT, partition))
        assert f"arn:{partition}:" in doc
        assert "arn:aws:" not in doc or partition == "aws"


def test_two_pools_get_disjoint_resources() -> None:
    for name in POLICY_NAMES:
        a = json.dumps(policy(name, cfg(name="alpha"), ACCOUNT, "aws"))
        assert "alpha" in a and "beta" not in a


def test_only_ec2_may_assume_the_instance_role() -> None:
    s = assume_role_policy()["Statement"]
    assert s == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": ["sts:AssumeRole"]}]


# Every client call in controlplane/ outside the agent and the embedded default, by IAM action
# (paginators and batch calls named by the action AWS authorizes them as).
CALLS = {
    "dynamodb": {"CreateTable", "DescribeTable", "DeleteTable", "TagResource", "DescribeTimeToLive",
                 "UpdateTimeToLive", "DescribeContinuousBackups", "UpdateContinuousBackups", "GetItem", "PutItem",
                 "UpdateItem", "BatchGetItem", "BatchWriteItem", "Query", "Scan",
                 "UntagResource", "ListTagsOfResource"},   # the owner tag (controlplane/ownership.py)
    "sqs": {"CreateQueue", "TagQueue", "DeleteQueue", "GetQueueUrl", "GetQueueAttributes", "SetQueueAttributes",
            "ListQueues", "ListQueueTags", "SendMessage", "ReceiveMessage", "DeleteMessage",
            "ChangeMessageVisibility"},
    "ec2": {"DescribeSubnets", "DescribeSecurityGroups", "DescribeInstances", "DescribeLaunchTemplates",
            "DescribeLaunchTemplateVersions", "CreateLaunchTemplate", "CreateLaunchTemplateVersion",
            "ModifyLaunchTemplate", "DeleteLaunchTemplate", "DeleteLaunchTemplateVersions", "CreateFleet",
            "RunInstances", "CreateTags", "DeleteTags", "TerminateInstances",     # *Tags: cost tags
            "StopInstances", "StartInstances", "DescribeImages"},   # the stopped tier; a class image's architecture
    "ssm": {"GetParameter", "PutParameter", "DeleteParameter"},
    "iam": {"PassRole"},
}


def test_control_plane_policy_names_exactly_the_calls_the_code_makes() -> None:
    acts = set(actions(control_plane_policy(cfg(), ACCOUNT, "aws")))
    assert acts == {f"{svc}:{op}" for svc, ops in CALLS.items() for op in ops}
    with_metrics = set(actions(control_plane_policy(cfg(metricsCloudwatch=True), ACCOUNT, "aws")))
    assert with_metrics - acts == {"cloudwatch:PutMetricData"}


def test_every_boto3_call_in_the_control_plane_is_in_the_policy() -> None:
    """Read the calls from the source: a new call without a policy line fails here."""
    import re

    import botocore.session

    session = botocore.session.get_session()
    py_names: dict[str, dict[str, str]] = {}
    for svc in ("dynamodb", "sqs", "ec2", "ssm", "cloudwatch"):
        model = session.get_service_model(svc)
        py_names[svc] = {re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower(): op for op in model.operation_names}
    # IAM authorizes a batch call as its single call, and a transaction as its actions: the control
    # plane's transactions are Updates only (aws.transact_updates).
    batch = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
             "ChangeMessageVisibilityBatch": "ChangeMessageVisibility", "TransactWriteItems": "UpdateItem"}
    allowed = set(actions(control_plane_policy(cfg(metricsCloudwatch=True), ACCOUNT, "aws")))
    missing = []
    files = [p for p in (ROOT / "controlplane").rglob("*.py") if "agent" not in p.parts and "local" not in p.parts]
    for path in files:
        text = path.read_text()
        for name in set(re.findall(r"\.(?:get_paginator\(\")?([a-z_]+)[\"(]", text)):
            for svc, ops in py_names.items():
                op = ops.get(name)
                if op is None or name in ("get", "update", "delete", "list", "describe"):
                    continue
                if f"{svc}:{batch.get(op, op)}" in allowed:
                    break
            else:
                hits = [svc for svc, ops in py_names.items() if name in ops]
                if hits:
                    missing.append(f"{path.name}: {name} ({', '.join(hits)})")
    assert not missing, missing


def test_control_plane_policy_scopes_ec2_to_the_pool() -> None:
    st = statements(control_plane_policy(cfg(), ACCOUNT, "aws"))
    pool_tag = {"aws:ResourceTag/runner-pool:pool": "ci"}
    for sid in ("PoolLaunchTemplate", "LaunchFromPoolTemplate", "TerminatePoolInstances"):
        assert st[sid]["Condition"] == {"StringEquals": pool_tag}, sid
    for sid in ("CreateLaunchTemplate", "LaunchTaggedInstances"):
        assert st[sid]["Condition"] == {"StringEquals": {"aws:RequestTag/runner-pool:pool": "ci"}}, sid
    assert st["TagOnLaunch"]["Condition"] == {"StringEquals": {"ec2:CreateAction": ["CreateFleet", "RunInstances"]}}
    assert st["TagLaunchTemplateOnCreate"]["Condition"] == {"StringEquals": {"ec2:CreateAction": "CreateLaunchTemplate"}}
    # CreateTags on its own is allowed only for the owner tag, only on the pool's template; every other
    # CreateTags statement is tagging as part of a launch or a template's creation.
    assert st["OwnerTagOnPoolTemplate"]["Condition"] == {
        "StringEquals": pool_tag, "ForAllValues:StringEquals": {"aws:TagKeys": ["runner-pool:owner"]}}
    assert st["OwnerTagOnPoolTemplate"]["Resource"] == [f"arn:aws:ec2:eu-west-1:{ACCOUNT}:launch-template/*"]
    # Cost tags: CreateTags/DeleteTags on the pool's instances, only the run tag keys, and the keys named.
    assert st["RunTagsOnPoolInstances"]["Condition"] == {
        "StringEquals": pool_tag,
        "ForAllValues:StringEquals": {"aws:TagKeys": ["runner-pool:run-id", "repository", "workflow", "team"]},
        "Null": {"aws:TagKeys": "false"}}
    assert st["RunTagsOnPoolInstances"]["Resource"] == [f"arn:aws:ec2:eu-west-1:{ACCOUNT}:instance/*"]
    tagging = [s for s in st.values() if "ec2:CreateTags" in s["Action"]
               and s["Sid"] not in ("OwnerTagOnPoolTemplate", "RunTagsOnPoolInstances")]
    assert tagging and all("ec2:CreateAction" in s["Condition"]["StringEquals"] for s in tagging)
    unconditioned = {s["Sid"] for s in st.values() if "Condition" not in s}
    assert unconditioned == {"StateTable", "StateTableIndexes", "PoolQueues", "ListQueues", "Describe",
                             "LaunchInto", "RunnerTokens"}
    assert st["Describe"]["Action"] == [a for a in st["Describe"]["Action"] if a.startswith("ec2:Describe")]


def test_control_plane_policy_passes_only_the_pools_instance_role() -> None:
    st = statements(control_plane_policy(cfg(), ACCOUNT, "aws"))
    assert st["PassInstanceRole"]["Resource"] == [f"arn:aws:iam::{ACCOUNT}:role/runner-pool-ci-instance"]
    assert st["PassInstanceRole"]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    own = statements(control_plane_policy(cfg(), ACCOUNT, "aws", instance_role="my-role"))
    assert own["PassInstanceRole"]["Resource"] == [f"arn:aws:iam::{ACCOUNT}:role/my-role"]
    assert "role/*" not in json.dumps(control_plane_policy(cfg(), ACCOUNT, "aws"))


def test_control_plane_policy_names_the_pools_table_queues_and_parameter() -> None:
    st = statements(control_plane_policy(cfg(resourceClasses={
        "small": {"vcpu": {"min": 2}, "memoryMib": {"min": 4096}},
        "big": {"vcpu": {"min": 8}, "memoryMib": {"min": 16384}}}), ACCOUNT, "aws"))
    q = f"arn:aws:sqs:eu-west-1:{ACCOUNT}:runner-pool-ci-"
    assert st["StateTable"]["Resource"] == [TABLE]
    assert st["StateTableIndexes"]["Resource"] == [TABLE, f"{TABLE}/index/*"]
    assert st["PoolQueues"]["Resource"] == sorted(f"{q}{c}" for c in ("small", "small-dlq", "big", "big-dlq"))
    assert st["RemovedClassQueues"]["Resource"] == [f"{q}*"]
    assert st["RemovedClassQueues"]["Condition"] == {"StringEquals": {"aws:ResourceTag/runner-pool:pool": "ci"}}
    assert st["RunnerTokens"]["Resource"] == [PARAMETER]
    assert "Metrics" not in st and "kms" not in json.dumps(st)


def test_control_plane_policy_adds_metrics_only_when_enabled_and_only_for_its_namespace() -> None:
    st = statements(control_plane_policy(cfg(metricsCloudwatch=True, metricsNamespace="CI"), ACCOUNT, "aws"))
    assert st["Metrics"]["Condition"] == {"StringEquals": {"cloudwatch:namespace": "CI"}}


def test_pool_admin_policy_touches_only_the_pools_role_and_profile() -> None:
    doc = pool_admin_policy(cfg(), ACCOUNT, "aws")
    assert all(a.startswith("iam:") for a in actions(doc))
    assert {s["Resource"][0] for s in doc["Statement"]} == {
        f"arn:aws:iam::{ACCOUNT}:role/runner-pool-ci-instance", f"arn:aws:iam::{ACCOUNT}:instance-profile/runner"}
    assert "iam:PassRole" not in actions(doc) and "iam:AttachRolePolicy" not in actions(doc)


def test_the_pulumi_program_creates_the_role_the_policies_name() -> None:
    assert 'name=f"runner-pool-{pool_cfg.name}-instance"' in (ROOT / "__main__.py").read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=60)


@pytest.fixture
def pool_file(tmp_path: Path) -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(json.dumps({
        "name": "ci", "region": "eu-west-1", "github": {"repository": "octo/repo"},
        "resourceClasses": {"small": {"vcpu": {"min": 2}, "memoryMib": {"min": 4096}}},
        "subnets": ["subnet-0123456789abcdef0"], "ami": "ami-0123456789abcdef0", "instanceProfile": "runner"}))
    return path


def test_iam_command_prints_all_three_policies_for_a_config(pool_file: Path) -> None:
    res = run_cli("iam", "--config", str(pool_file), "--account", ACCOUNT, "--partition", "aws-us-gov")
    assert res.returncode == 0, res.stderr
    docs = json.loads(res.stdout)
    c = parse_config(json.loads(pool_file.read_text()))
    assert docs == {n: policy(n, c, ACCOUNT, "aws-us-gov") for n in POLICY_NAMES}


def test_iam_command_prints_one_policy_document_ready_for_aws(pool_file: Path) -> None:
    res = run_cli("iam", "--config", str(pool_file), "--account", ACCOUNT, "--policy", "control-plane",
                  "--instance-role", "my-role")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["Version"] == "2012-10-17"
    assert statements(doc)["PassInstanceRole"]["Resource"] == [f"arn:aws:iam::{ACCOUNT}:role/my-role"]


@pytest.mark.parametrize("args, line", [
    (["--account", "12"], "error: --account '12' is not an AWS account id (pass 12 digits)"),
    (["--account", ACCOUNT, "--policy", "root"], "error: --policy: 'root' is not a choice"),
    (["--account", ACCOUNT, "--partition", "azure"], "error: --partition: 'azure' is not a choice"),
    (["--account", ACCOUNT, "--instance-role", "a/b"], "error: --instance-role 'a/b' is not a role name"),
    ([], "error: --account: required"),
])
def test_iam_command_rejects_bad_input_with_one_line_and_exit_2(pool_file: Path, args: list[str], line: str) -> None:
    res = run_cli("iam", "--config", str(pool_file), *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(line) and len(res.stderr.strip().splitlines()) == 1


def test_iam_command_rejects_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "pool.yaml"
    bad.write_text("name: Bad_Name\n")
    res = run_cli("iam", "--config", str(bad), "--account", ACCOUNT)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("error: ")


def test_docs_security_explains_every_statement_of_every_policy() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    doc = control_plane_policy(cfg(metricsCloudwatch=True), ACCOUNT, "aws")
    sids = [s["Sid"] for s in doc["Statement"] + instance_policy(cfg(), ACCOUNT, "aws")["Statement"]]
    assert [sid for sid in sids if f"`{sid}`" not in text and f'"{sid}"' not in text] == []
    admin = [a.split(":")[1] for a in actions(pool_admin_policy(cfg(), ACCOUNT, "aws"))]
    assert [a for a in admin if a not in text] == []


def test_local_start_with_a_config_but_without_enforce_iam_is_bad_input(pool_file: Path, tmp_path: Path) -> None:
    res = run_cli("local", "start", "--config", str(pool_file), "--state-dir", str(tmp_path / "local"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: --config is given without --enforce-iam")
    assert not (tmp_path / "local").exists()                 # nothing started
