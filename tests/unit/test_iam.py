"""IAM policy documents: an instance reaches only its own rows and its pool's token."""
from __future__ import annotations

import json
from typing import Any

import pytest

from controlplane.config import parse_config
from controlplane.iam import assume_role_policy, control_plane_policy, instance_policy

ACCOUNT = "123456789012"


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


def test_instance_updates_only_its_own_agent_row() -> None:
    s = statements(instance_policy(cfg(), ACCOUNT, "aws"))["WriteOwnAgentRow"]
    assert s["Action"] == ["dynamodb:UpdateItem"] and s["Resource"] == [TABLE]
    assert s["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"] == ["agent#${ec2:SourceInstanceARN}"]


def test_instance_reads_exactly_the_pools_token_parameter_and_decrypts_it_only_through_ssm() -> None:
    st = statements(instance_policy(cfg(), ACCOUNT, "aws"))
    assert st["ReadRunnerTokens"]["Action"] == ["ssm:GetParameter"]
    assert st["ReadRunnerTokens"]["Resource"] == [PARAMETER]
    kms = st["DecryptRunnerTokensThroughSsm"]
    assert kms["Action"] == ["kms:Decrypt"]
    assert kms["Condition"]["StringEquals"] == {"kms:ViaService": "ssm.eu-west-1.amazonaws.com",
                                                "kms:EncryptionContext:PARAMETER_ARN": PARAMETER}


def test_instance_policy_has_nothing_else_no_wildcard_action_and_no_ec2() -> None:
    doc = instance_policy(cfg(), ACCOUNT, "aws")
    assert sorted(actions(doc)) == ["dynamodb:GetItem", "dynamodb:UpdateItem", "kms:Decrypt", "ssm:GetParameter"]
    assert not [a for a in actions(doc) if "*" in a]
    assert not [a for a in actions(doc) if a.startswith("ec2:")]
    assert all(s["Effect"] == "Allow" for s in doc["Statement"])
    # Every statement but the KMS one names a single resource of this pool; KMS is pinned by its conditions.
    for s in doc["Statement"]:
        if s["Sid"] != "DecryptRunnerTokensThroughSsm":
            assert s["Resource"] in ([TABLE], [PARAMETER])
    json.dumps(doc)                                     # a valid JSON policy document


@pytest.mark.parametrize("partition", ["aws", "aws-us-gov", "aws-cn"])
def test_arns_carry_the_partition(partition: str) -> None:
    doc = json.dumps(instance_policy(cfg(), ACCOUNT, partition))
    assert f"arn:{partition}:dynamodb:" in doc and f"arn:{partition}:ssm:" in doc
    assert "arn:aws:" not in doc or partition == "aws"


def test_two_pools_get_disjoint_resources() -> None:
    a = json.dumps(instance_policy(cfg(name="alpha"), ACCOUNT, "aws"))
    b = json.dumps(instance_policy(cfg(name="beta"), ACCOUNT, "aws"))
    assert "runner-pool-alpha" in a and "runner-pool-beta" not in a
    assert "/runner-pool/beta/" in b and "/runner-pool/alpha/" not in b


def test_only_ec2_may_assume_the_instance_role() -> None:
    s = assume_role_policy()["Statement"]
    assert s == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": ["sts:AssumeRole"]}]


def test_control_plane_policy_covers_every_call_and_stays_on_the_pools_resources() -> None:
    doc = control_plane_policy(cfg(), ACCOUNT, "aws", instance_role_arn=f"arn:aws:iam::{ACCOUNT}:role/r")
    acts = set(actions(doc))
    assert {"dynamodb:CreateTable", "dynamodb:Query", "dynamodb:BatchWriteItem", "sqs:CreateQueue",
            "sqs:ReceiveMessage", "ec2:CreateFleet", "ec2:TerminateInstances", "ec2:CreateLaunchTemplateVersion",
            "ssm:PutParameter", "iam:PassRole"} <= acts
    assert not [a for a in acts if "*" in a]
    st = statements(doc)
    assert st["StateTable"]["Resource"] == [TABLE, f"{TABLE}/index/*"]
    assert st["PoolQueues"]["Resource"] == [f"arn:aws:sqs:eu-west-1:{ACCOUNT}:runner-pool-ci-*"]
    assert st["TerminatePoolInstances"]["Condition"] == {
        "StringEquals": {"aws:ResourceTag/runner-pool:pool": "ci"}}
    assert st["PassInstanceRole"]["Resource"] == [f"arn:aws:iam::{ACCOUNT}:role/r"]
    assert "Metrics" not in st


def test_control_plane_policy_adds_metrics_only_when_enabled_and_only_for_its_namespace() -> None:
    st = statements(control_plane_policy(cfg(metricsCloudwatch=True, metricsNamespace="CI"), ACCOUNT, "aws"))
    assert st["Metrics"]["Condition"] == {"StringEquals": {"cloudwatch:namespace": "CI"}}
