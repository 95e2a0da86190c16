"""The generated policies under a real IAM evaluator, and linted.

moto evaluates actions and resources (test_iam_enforced.py) but no condition.
Here every request the code makes, and every attack the conditions exist to
stop, is evaluated by ``@cloud-copilot/iam-simulate`` (npm; AGPL-3.0, a test
tool only, installed by ``.ci/policy-tools`` into tests/security/policy-sim)
with the context AWS would send: ``ec2:SourceInstanceARN`` and the
``dynamodb:*`` keys for an agent, tags and ``ec2:CreateAction`` for EC2.
Each case also asserts that the evaluator used every context key it was
given (none "ignored" as not applying to the action), so a condition on a key
the action does not have cannot pass unnoticed.

Every generated policy is linted with parliament; each finding left is listed
with the reason it is not a defect.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import parse_config
from controlplane.iam import POLICY_NAMES, policy

SIM = Path(__file__).parent / "policy-sim"
ACCOUNT = "123456789012"
REGION = "eu-west-1"
POOL = "ci"
TABLE = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/runner-pool-{POOL}"
ME = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0aaaaaaaaaaaaaaaa"
OTHER = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0bbbbbbbbbbbbbbbb"
EC2 = f"arn:aws:ec2:{REGION}:{ACCOUNT}"
SQS = f"arn:aws:sqs:{REGION}:{ACCOUNT}"
SSM = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter"
AGENT = f"arn:aws:sts::{ACCOUNT}:assumed-role/runner-pool-{POOL}-instance/i-0aaaaaaaaaaaaaaaa"
CONTROL = f"arn:aws:iam::{ACCOUNT}:user/runner-pool-control-plane"
AGENT_WRITE = ["pk", "sk", "heartbeat_at", "instance_id", "expires_at"]


def cfg() -> Any:
    return parse_config({
        "name": POOL, "region": REGION, "github": {"repository": "octo/repo"},
        "resourceClasses": {"small": {"vcpu": {"min": 2}, "memoryMib": {"min": 4096}}},
        "subnets": ["subnet-0123456789abcdef0"], "ami": "ami-0123456789abcdef0", "instanceProfile": "runner",
        "metricsCloudwatch": True, "metricsNamespace": "RunnerPool"})


def simulate(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not (SIM / "node_modules" / "@cloud-copilot" / "iam-simulate").is_dir() or not shutil.which("node"):
        if os.environ.get("CI"):
            pytest.fail("the policy evaluator is not installed: run .ci/policy-tools")
        pytest.skip("the policy evaluator is not installed: run .ci/policy-tools")
    res = subprocess.run(["node", str(SIM / "evaluate.mjs")], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def agent(action: str, resource: str, expect: str, **context: Any) -> tuple[str, dict[str, Any], str]:
    return ("instance", {"principal": AGENT, "action": action, "resource": resource,
                         "context": {"ec2:SourceInstanceARN": ME, **context}}, expect)


def control(action: str, resource: str, expect: str, **context: Any) -> tuple[str, dict[str, Any], str]:
    return ("control-plane", {"principal": CONTROL, "action": action, "resource": resource, "context": context}, expect)


def tag(key: str, pool: str = POOL) -> dict[str, str]:
    return {f"aws:{key}/runner-pool:pool": pool}


ALLOW, DENY = "Allowed", "ImplicitlyDenied"
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    # -- the instance: its own two rows, the agent attributes only
    "agent reads its own state row": agent("dynamodb:GetItem", TABLE, ALLOW, **{"dynamodb:LeadingKeys": [ME]}),
    "agent reads another instance's state row": agent("dynamodb:GetItem", TABLE, DENY,
                                                      **{"dynamodb:LeadingKeys": [OTHER]}),
    "agent reads another instance's agent row": agent("dynamodb:GetItem", TABLE, DENY,
                                                      **{"dynamodb:LeadingKeys": [f"agent#{OTHER}"]}),
    "agent reads the pool's stored config": agent("dynamodb:GetItem", TABLE, DENY, **{"dynamodb:LeadingKeys": ["pool"]}),
    "agent writes its heartbeat": agent("dynamodb:UpdateItem", TABLE, ALLOW, **{
        "dynamodb:LeadingKeys": [f"agent#{ME}"], "dynamodb:Attributes": AGENT_WRITE}),
    "agent writes a signal asking for no return values": agent("dynamodb:UpdateItem", TABLE, ALLOW, **{
        "dynamodb:LeadingKeys": [f"agent#{ME}"], "dynamodb:ReturnValues": "NONE",
        "dynamodb:Attributes": ["pk", "sk", "signal", "signal_at", "signal_run", "runner_name", "detail"]}),
    "agent writes another instance's agent row": agent("dynamodb:UpdateItem", TABLE, DENY, **{
        "dynamodb:LeadingKeys": [f"agent#{OTHER}"], "dynamodb:Attributes": AGENT_WRITE}),
    "agent writes its own state row": agent("dynamodb:UpdateItem", TABLE, DENY, **{
        "dynamodb:LeadingKeys": [ME], "dynamodb:Attributes": ["pk", "sk", "state"]}),
    "agent writes a state attribute into its agent row": agent("dynamodb:UpdateItem", TABLE, DENY, **{
        "dynamodb:LeadingKeys": [f"agent#{ME}"], "dynamodb:Attributes": ["pk", "sk", "heartbeat_at", "state"]}),
    "agent writes run_id into its agent row (the by_run index)": agent("dynamodb:UpdateItem", TABLE, DENY, **{
        "dynamodb:LeadingKeys": [f"agent#{ME}"], "dynamodb:Attributes": ["pk", "sk", "run_id"]}),
    "agent writes junk launched_at into its agent row": agent("dynamodb:UpdateItem", TABLE, DENY, **{
        "dynamodb:LeadingKeys": [f"agent#{ME}"], "dynamodb:Attributes": ["pk", "sk", "heartbeat_at", "launched_at"]}),
    "agent reads its row back with ALL_OLD": agent("dynamodb:UpdateItem", TABLE, DENY, **{
        "dynamodb:LeadingKeys": [f"agent#{ME}"], "dynamodb:Attributes": AGENT_WRITE,
        "dynamodb:ReturnValues": "ALL_OLD"}),
    "agent puts a whole item": agent("dynamodb:PutItem", TABLE, DENY, **{"dynamodb:LeadingKeys": [f"agent#{ME}"]}),
    "agent deletes its state row": agent("dynamodb:DeleteItem", TABLE, DENY, **{"dynamodb:LeadingKeys": [ME]}),
    "agent reads the runner tokens": agent("ssm:GetParameter", f"{SSM}/runner-pool/{POOL}/runner-tokens", DENY),
    "agent terminates another instance": agent("ec2:TerminateInstances", OTHER, DENY, **tag("ResourceTag")),
    # -- the control plane: every call it makes is allowed ...
    "create the table": control("dynamodb:CreateTable", TABLE, ALLOW),
    "batch-write rows": control("dynamodb:BatchWriteItem", TABLE, ALLOW),
    "query the by_state index": control("dynamodb:Query", f"{TABLE}/index/by_state", ALLOW),
    "scan the table": control("dynamodb:Scan", TABLE, ALLOW),
    "create a class queue": control("sqs:CreateQueue", f"{SQS}:runner-pool-{POOL}-small", ALLOW, **tag("RequestTag")),
    "send to a class queue": control("sqs:SendMessage", f"{SQS}:runner-pool-{POOL}-small", ALLOW),
    "receive from a dead-letter queue": control("sqs:ReceiveMessage", f"{SQS}:runner-pool-{POOL}-small-dlq", ALLOW),
    "delete a removed class's queue": control("sqs:DeleteQueue", f"{SQS}:runner-pool-{POOL}-gone", ALLOW,
                                              **tag("ResourceTag")),
    "list queues": control("sqs:ListQueues", "*", ALLOW),
    "describe subnets": control("ec2:DescribeSubnets", "*", ALLOW),
    "describe security groups": control("ec2:DescribeSecurityGroups", "*", ALLOW),
    "create the launch template with the pool tag": control(
        "ec2:CreateLaunchTemplate", f"{EC2}:launch-template/lt-0123456789abcdef0", ALLOW, **tag("RequestTag")),
    "tag the launch template as it is created": control(
        "ec2:CreateTags", f"{EC2}:launch-template/lt-0123456789abcdef0", ALLOW,
        **{"ec2:CreateAction": "CreateLaunchTemplate"}),
    "record the owning stack on the pool's template": control(
        "ec2:CreateTags", f"{EC2}:launch-template/lt-0123456789abcdef0", ALLOW,
        **tag("ResourceTag"), **{"aws:TagKeys": ["runner-pool:owner"]}),
    "add a version to the pool's template": control(
        "ec2:CreateLaunchTemplateVersion", f"{EC2}:launch-template/lt-0123456789abcdef0", ALLOW, **tag("ResourceTag")),
    "create a fleet from the pool's template": control(
        "ec2:CreateFleet", f"{EC2}:launch-template/lt-0123456789abcdef0", ALLOW, **tag("ResourceTag")),
    "create a fleet tagged with the pool": control("ec2:CreateFleet", f"{EC2}:fleet/fleet-0123456789abcdef0", ALLOW,
                                                   **tag("RequestTag")),
    "launch instances tagged with the pool": control(
        "ec2:RunInstances", f"{EC2}:instance/i-0123456789abcdef0", ALLOW, **tag("RequestTag")),
    "launch into a subnet": control("ec2:RunInstances", f"{EC2}:subnet/subnet-0123456789abcdef0", ALLOW),
    "launch from an image": control("ec2:RunInstances", f"arn:aws:ec2:{REGION}::image/ami-0123456789abcdef0", ALLOW),
    "tag instances as they launch": control("ec2:CreateTags", f"{EC2}:instance/i-0123456789abcdef0", ALLOW,
                                            **{"ec2:CreateAction": "CreateFleet"}),
    "terminate a pool instance": control("ec2:TerminateInstances", f"{EC2}:instance/i-0123456789abcdef0", ALLOW,
                                         **tag("ResourceTag")),
    "pass the instance role to EC2": control("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/runner-pool-{POOL}-instance",
                                             ALLOW, **{"iam:PassedToService": "ec2.amazonaws.com"}),
    "write the runner tokens": control("ssm:PutParameter", f"{SSM}/runner-pool/{POOL}/runner-tokens", ALLOW),
    "publish metrics in the pool's namespace": control("cloudwatch:PutMetricData", "*", ALLOW,
                                                       **{"cloudwatch:namespace": "RunnerPool"}),
    # ... and what the conditions exist to stop is denied
    "retag the pool's template into another pool": control(
        "ec2:CreateTags", f"{EC2}:launch-template/lt-0123456789abcdef0", DENY,
        **tag("ResourceTag"), **{"aws:TagKeys": ["runner-pool:owner", "runner-pool:pool"]}),
    "set an owner on another pool's template": control(
        "ec2:CreateTags", f"{EC2}:launch-template/lt-0fedcba9876543210", DENY,
        **tag("ResourceTag", "prod"), **{"aws:TagKeys": ["runner-pool:owner"]}),
    "tag any instance into the pool": control("ec2:CreateTags", f"{EC2}:instance/i-0123456789abcdef0", DENY),
    "terminate another pool's instance": control("ec2:TerminateInstances", f"{EC2}:instance/i-0123456789abcdef0",
                                                 DENY, **tag("ResourceTag", "prod")),
    "terminate an untagged instance": control("ec2:TerminateInstances", f"{EC2}:instance/i-0123456789abcdef0", DENY),
    "launch an instance without the pool tag": control("ec2:RunInstances", f"{EC2}:instance/i-0123456789abcdef0",
                                                       DENY, **tag("RequestTag", "prod")),
    "create a fleet from another template": control(
        "ec2:CreateFleet", f"{EC2}:launch-template/lt-0fedcba9876543210", DENY, **tag("ResourceTag", "prod")),
    "change another pool's template": control(
        "ec2:ModifyLaunchTemplate", f"{EC2}:launch-template/lt-0fedcba9876543210", DENY, **tag("ResourceTag", "prod")),
    "create an untagged launch template": control(
        "ec2:CreateLaunchTemplate", f"{EC2}:launch-template/lt-0123456789abcdef0", DENY),
    "pass an admin role": control("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", DENY,
                                  **{"iam:PassedToService": "ec2.amazonaws.com"}),
    "pass the instance role to Lambda": control(
        "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/runner-pool-{POOL}-instance", DENY,
        **{"iam:PassedToService": "lambda.amazonaws.com"}),
    "read another pool's table": control("dynamodb:Scan", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/runner-pool-prod",
                                         DENY),
    "read another pool's tokens": control("ssm:GetParameter", f"{SSM}/runner-pool/prod/runner-tokens", DENY),
    "delete another pool's queue sharing the name prefix": control(
        "sqs:DeleteQueue", f"{SQS}:runner-pool-{POOL}-x-small", DENY, **tag("ResourceTag", f"{POOL}-x")),
    "publish metrics elsewhere": control("cloudwatch:PutMetricData", "*", DENY, **{"cloudwatch:namespace": "AWS/EC2"}),
}


def test_every_case_evaluates_as_intended_with_every_context_key_applying() -> None:
    policies = {n: policy(n, cfg(), ACCOUNT, "aws") for n in POLICY_NAMES}
    names = list(CASES)
    results = simulate([{**CASES[n][1], "account": ACCOUNT, "policies": {CASES[n][0]: policies[CASES[n][0]]}}
                        for n in names])
    wrong = {n: r for n, r in zip(names, results, strict=True) if r["result"] != CASES[n][2]}
    assert wrong == {}
    ignored = {n: r["ignoredContextKeys"] for n, r in zip(names, results, strict=True) if r.get("ignoredContextKeys")}
    assert ignored == {}


def test_every_statement_of_the_control_plane_policy_allows_some_case() -> None:
    """No statement is dead weight: each Sid grants at least one request the cases make."""
    doc = policy("control-plane", cfg(), ACCOUNT, "aws")
    covered: set[str] = set()
    for st in doc["Statement"]:
        alone = {"Version": doc["Version"], "Statement": [st]}
        allowed = [n for n, (who, _, want) in CASES.items() if who == "control-plane" and want == ALLOW]
        results = simulate([{**CASES[n][1], "account": ACCOUNT, "policies": {"p": alone}} for n in allowed])
        if any(r["result"] == ALLOW for r in results):
            covered.add(st["Sid"])
    assert {s["Sid"] for s in doc["Statement"]} - covered == set()


# parliament findings that are not defects, with why. Keyed by (statement Sid, finding).
PARLIAMENT_ALLOWED = {
    # A launch touches a launch template, the fleet, instances, subnets, images, ... Each statement of
    # the launch names only the resource types whose condition it carries (the template by its tag,
    # the fleet and instances by the tag they are created with, the rest unconditioned), so each one
    # alone lacks the others' types; parliament judges statements one at a time. The evaluator cases
    # above ("create a fleet ...", "launch ...") show the whole launch is allowed.
    ("LaunchFromPoolTemplate", "RESOURCE_MISMATCH"),
    ("LaunchTaggedInstances", "RESOURCE_MISMATCH"),
    ("LaunchInto", "RESOURCE_MISMATCH"),
}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_parliament_finds_nothing_unexplained(name: str) -> None:
    from parliament import analyze_policy_string

    doc = policy(name, cfg(), ACCOUNT, "aws")
    whole = analyze_policy_string(json.dumps(doc))
    found: set[tuple[str, str]] = set()
    for st in doc["Statement"]:
        one = analyze_policy_string(json.dumps({"Version": doc["Version"], "Statement": [st]}))
        found |= {(st["Sid"], f.issue) for f in one.findings}
    assert found <= PARLIAMENT_ALLOWED, found - PARLIAMENT_ALLOWED
    assert len(whole.findings) == len([f for f in found if f[1] == "RESOURCE_MISMATCH"])
