"""IAM policy documents: what an instance may do, and what the control plane needs.

Pure functions over a :class:`PoolConfig`, an account id and a partition; they
return policy documents as dicts and call nothing. The Pulumi program attaches
:func:`instance_policy` to the role it creates when asked to
(``runner-pool:createInstanceRole``); :func:`control_plane_policy` documents
the permissions of whoever runs ``pulumi up`` or the CLI.

The instance policy is least privilege by construction:

* **DynamoDB**: ``GetItem`` on its own state row and ``UpdateItem`` on its own
  agent row, nothing else. The table's partition keys are instance ARNs
  (``<arn>`` / ``agent#<arn>``), so ``dynamodb:LeadingKeys`` compared with the
  ``${ec2:SourceInstanceARN}`` policy variable pins every request to the
  caller's own items. ``ec2:SourceInstanceARN`` is a global condition key set
  on requests signed with instance-profile credentials
  (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_condition-keys.html#condition-keys-ec2-sourceinstancearn).
* **SSM**: ``GetParameter`` on the pool's one token parameter.
* **KMS**: ``Decrypt`` only through SSM (``kms:ViaService``) and only for that
  parameter: Parameter Store encrypts a SecureString with the encryption
  context ``PARAMETER_ARN=<parameter ARN>``
  (https://docs.aws.amazon.com/kms/latest/developerguide/services-parameter-store.html).
* **No EC2 permission**: the agent retires its instance with an OS shutdown and
  the launch template's shutdown behaviour is ``terminate``.

Every action is named; no statement uses a wildcard action.
"""
from __future__ import annotations

from typing import Any

from controlplane.config import PoolConfig

POLICY_VERSION = "2012-10-17"
SOURCE_INSTANCE_ARN = "${ec2:SourceInstanceARN}"
ASSUME_ROLE_SERVICE = "ec2.amazonaws.com"


def table_arn(cfg: PoolConfig, account: str, partition: str) -> str:
    return f"arn:{partition}:dynamodb:{cfg.region}:{account}:table/{cfg.table_name}"


def token_parameter_arn(cfg: PoolConfig, account: str, partition: str) -> str:
    # The parameter name starts with "/", which the ARN does not repeat.
    return f"arn:{partition}:ssm:{cfg.region}:{account}:parameter/{cfg.token_parameter.lstrip('/')}"


def _ssm_via_service(cfg: PoolConfig) -> str:
    return f"ssm.{cfg.region}.amazonaws.com"


def instance_policy(cfg: PoolConfig, account: str, partition: str) -> dict[str, Any]:
    """The inline policy of the instance role: its own rows, its pool's tokens, nothing else."""
    table = table_arn(cfg, account, partition)
    parameter = token_parameter_arn(cfg, account, partition)
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "ReadOwnStateRow",
                "Effect": "Allow",
                "Action": ["dynamodb:GetItem"],
                "Resource": [table],
                "Condition": {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [SOURCE_INSTANCE_ARN]}},
            },
            {
                "Sid": "WriteOwnAgentRow",
                "Effect": "Allow",
                "Action": ["dynamodb:UpdateItem"],
                "Resource": [table],
                "Condition": {"ForAllValues:StringEquals": {
                    "dynamodb:LeadingKeys": [f"agent#{SOURCE_INSTANCE_ARN}"]}},
            },
            {
                "Sid": "ReadRunnerTokens",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter"],
                "Resource": [parameter],
            },
            {
                "Sid": "DecryptRunnerTokensThroughSsm",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": [f"arn:{partition}:kms:{cfg.region}:{account}:key/*"],
                "Condition": {"StringEquals": {
                    "kms:ViaService": _ssm_via_service(cfg),
                    "kms:EncryptionContext:PARAMETER_ARN": parameter,
                }},
            },
        ],
    }


def assume_role_policy() -> dict[str, Any]:
    """Trust policy of the instance role: EC2 only."""
    return {
        "Version": POLICY_VERSION,
        "Statement": [{"Effect": "Allow", "Principal": {"Service": ASSUME_ROLE_SERVICE},
                       "Action": ["sts:AssumeRole"]}],
    }


def control_plane_policy(cfg: PoolConfig, account: str, partition: str,
                         instance_role_arn: str | None = None) -> dict[str, Any]:
    """What `pulumi up`/`destroy` and the CLI (provision, release, refresh, reconcile) call.

    Scoped to the pool's own table, queues, launch template and parameter;
    EC2 actions that cannot be scoped by resource name are pinned to the
    pool's tag where EC2 supports it. ``iam:PassRole`` is limited to the
    instance role when its ARN is given (otherwise to roles passed to EC2).
    """
    region = cfg.region
    table = table_arn(cfg, account, partition)
    queues = f"arn:{partition}:sqs:{region}:{account}:runner-pool-{cfg.name}-*"
    parameter = token_parameter_arn(cfg, account, partition)
    ec2 = f"arn:{partition}:ec2:{region}"
    pool_tag = {"aws:ResourceTag/runner-pool:pool": cfg.name}
    statements: list[dict[str, Any]] = [
        {
            "Sid": "StateTable",
            "Effect": "Allow",
            "Action": [
                "dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:DeleteTable", "dynamodb:TagResource",
                "dynamodb:DescribeTimeToLive", "dynamodb:UpdateTimeToLive",
                "dynamodb:DescribeContinuousBackups", "dynamodb:UpdateContinuousBackups",
                "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                "dynamodb:BatchGetItem", "dynamodb:BatchWriteItem", "dynamodb:Query", "dynamodb:Scan",
            ],
            "Resource": [table, f"{table}/index/*"],
        },
        {
            "Sid": "PoolQueues",
            "Effect": "Allow",
            "Action": [
                "sqs:CreateQueue", "sqs:DeleteQueue", "sqs:GetQueueUrl", "sqs:GetQueueAttributes",
                "sqs:SetQueueAttributes", "sqs:TagQueue", "sqs:ListQueueTags", "sqs:SendMessage",
                "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
            ],
            "Resource": [queues],
        },
        {
            "Sid": "ListPoolQueues",              # ListQueues has no resource-level permissions
            "Effect": "Allow",
            "Action": ["sqs:ListQueues"],
            "Resource": ["*"],
        },
        {
            "Sid": "LaunchTemplate",
            "Effect": "Allow",
            "Action": [
                "ec2:CreateLaunchTemplate", "ec2:CreateLaunchTemplateVersion", "ec2:ModifyLaunchTemplate",
                "ec2:DeleteLaunchTemplate", "ec2:DeleteLaunchTemplateVersions",
            ],
            "Resource": [f"{ec2}:{account}:launch-template/*"],
        },
        {
            "Sid": "CreateFleet",
            "Effect": "Allow",
            "Action": ["ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateTags"],
            "Resource": [
                f"{ec2}:{account}:fleet/*", f"{ec2}:{account}:instance/*", f"{ec2}:{account}:volume/*",
                f"{ec2}:{account}:network-interface/*", f"{ec2}:{account}:launch-template/*",
                f"{ec2}:{account}:subnet/*", f"{ec2}:{account}:security-group/*", f"{ec2}::image/*",
                f"{ec2}:{account}:spot-instances-request/*",
            ],
        },
        {
            "Sid": "TerminatePoolInstances",
            "Effect": "Allow",
            "Action": ["ec2:TerminateInstances"],
            "Resource": [f"{ec2}:{account}:instance/*"],
            "Condition": {"StringEquals": pool_tag},
        },
        {
            "Sid": "Describe",                    # EC2 Describe* calls have no resource-level permissions
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances", "ec2:DescribeLaunchTemplates",
                       "ec2:DescribeLaunchTemplateVersions"],
            "Resource": ["*"],
        },
        {
            "Sid": "PassInstanceRole",
            "Effect": "Allow",
            "Action": ["iam:PassRole"],
            "Resource": [instance_role_arn or f"arn:{partition}:iam::{account}:role/*"],
            "Condition": {"StringEquals": {"iam:PassedToService": ASSUME_ROLE_SERVICE}},
        },
        {
            "Sid": "RunnerTokens",
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "ssm:PutParameter", "ssm:DeleteParameter"],
            "Resource": [parameter],
        },
        {
            "Sid": "EncryptRunnerTokensThroughSsm",
            "Effect": "Allow",
            "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": [f"arn:{partition}:kms:{region}:{account}:key/*"],
            "Condition": {"StringEquals": {"kms:ViaService": _ssm_via_service(cfg),
                                           "kms:EncryptionContext:PARAMETER_ARN": parameter}},
        },
    ]
    if cfg.metrics_cloudwatch:
        statements.append({
            "Sid": "Metrics",                     # PutMetricData is scoped by namespace, not by resource
            "Effect": "Allow",
            "Action": ["cloudwatch:PutMetricData"],
            "Resource": ["*"],
            "Condition": {"StringEquals": {"cloudwatch:namespace": cfg.metrics_namespace}},
        })
    return {"Version": POLICY_VERSION, "Statement": statements}
