"""IAM policy documents: what an instance may do, and what the control plane needs.

Pure functions over a :class:`PoolConfig`, an account id and a partition; they
return policy documents as dicts and call nothing. ``runner-pool iam`` prints
them; the Pulumi program attaches :func:`instance_policy` to the role it
creates when asked to (``runner-pool:createInstanceRole``). docs/security.md
explains each statement.

Three policies, three principals:

* :func:`instance_policy` -- the instance role. An instance reads its own state
  row and writes the agent attributes of its own agent row, nothing else: no
  SSM, no KMS, no EC2 (the agent retires its instance with an OS shutdown and
  the launch template's shutdown behaviour is ``terminate``). What it needs to
  register a runner the control plane puts into its own state row.
* :func:`control_plane_policy` -- whoever runs the CLI (provision, release,
  refresh, reconcile, status, ``pool apply``/``destroy``) or ``pulumi up``. Every
  AWS call the code makes, scoped to the pool's own names or tag; nothing else.
* :func:`pool_admin_policy` -- added for whoever runs the pool stack with
  ``createInstanceRole``: the IAM calls pulumi-aws makes for the role, its
  inline policy and the instance profile, on those two names only.

How the instance is pinned to its own rows: the table's partition keys are
instance ARNs (``<arn>`` for the state row, ``agent#<arn>`` for the agent row),
and ``dynamodb:LeadingKeys`` compared with the ``${ec2:SourceInstanceARN}``
policy variable admits only the caller's own keys. ``ec2:SourceInstanceARN`` is
set on requests signed with instance-profile credentials
(https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_condition-keys.html#condition-keys-ec2-sourceinstancearn).
``dynamodb:Attributes`` with ``ForAllValues:StringEquals`` limits the attributes
an UpdateItem may name to :data:`controlplane.records.AGENT_ATTRIBUTES` (with the
key attributes, as AWS requires), and ``dynamodb:ReturnValues`` is limited as
AWS documents for attribute-level access
(https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/specifying-conditions.html).

Every action is named; no statement uses a wildcard action. Where an action
has no resource-level permissions (EC2 ``Describe*``, ``sqs:ListQueues``,
``cloudwatch:PutMetricData``) the statement says so in its ``Sid``'s comment.
"""
from __future__ import annotations

from typing import Any

from controlplane import costtags
from controlplane.config import PoolConfig
from controlplane.ownership import OWNER_TAG
from controlplane.records import AGENT_ATTRIBUTES, KEY_ATTRIBUTES

POLICY_VERSION = "2012-10-17"
SOURCE_INSTANCE_ARN = "${ec2:SourceInstanceARN}"
ASSUME_ROLE_SERVICE = "ec2.amazonaws.com"
POOL_TAG = "runner-pool:pool"
# ReturnValues an UpdateItem limited to some attributes may ask for: ALL_OLD/ALL_NEW would return
# attributes the caller may not name (AWS's documented pairing with dynamodb:Attributes).
ATTRIBUTE_LIMITED_RETURN_VALUES = ["NONE", "UPDATED_OLD", "UPDATED_NEW"]
POLICY_NAMES = ("control-plane", "pool-admin", "instance")


def instance_role_name(cfg: PoolConfig) -> str:
    """The role ``createInstanceRole`` makes (the Pulumi program uses this name)."""
    return f"runner-pool-{cfg.name}-instance"


def role_arn(account: str, partition: str, name: str) -> str:
    return f"arn:{partition}:iam::{account}:role/{name}"


def table_arn(cfg: PoolConfig, account: str, partition: str) -> str:
    return f"arn:{partition}:dynamodb:{cfg.region}:{account}:table/{cfg.table_name}"


def token_parameter_arn(cfg: PoolConfig, account: str, partition: str) -> str:
    # The parameter name starts with "/", which the ARN does not repeat.
    return f"arn:{partition}:ssm:{cfg.region}:{account}:parameter/{cfg.token_parameter.lstrip('/')}"


def queue_arn(cfg: PoolConfig, account: str, partition: str, name: str) -> str:
    return f"arn:{partition}:sqs:{cfg.region}:{account}:{name}"


def instance_policy(cfg: PoolConfig, account: str, partition: str) -> dict[str, Any]:
    """The inline policy of the instance role: its own two rows, nothing else."""
    table = table_arn(cfg, account, partition)
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
                "Sid": "WriteAgentAttributesOfOwnAgentRow",
                "Effect": "Allow",
                "Action": ["dynamodb:UpdateItem"],
                "Resource": [table],
                "Condition": {
                    "ForAllValues:StringEquals": {
                        "dynamodb:LeadingKeys": [f"agent#{SOURCE_INSTANCE_ARN}"],
                        "dynamodb:Attributes": sorted(KEY_ATTRIBUTES + AGENT_ATTRIBUTES),
                    },
                    "StringEqualsIfExists": {"dynamodb:ReturnValues": ATTRIBUTE_LIMITED_RETURN_VALUES},
                },
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
                         instance_role: str | None = None) -> dict[str, Any]:
    """Every AWS call of the CLI and the Pulumi resources, on this pool's resources only.

    ``instance_role`` is the name of the role in the pool's instance profile
    (default: the one ``createInstanceRole`` makes); ``iam:PassRole`` names
    exactly that role.
    """
    region = cfg.region
    table = table_arn(cfg, account, partition)
    ec2 = f"arn:{partition}:ec2:{region}"
    own = f"{ec2}:{account}"
    queues = sorted(queue_arn(cfg, account, partition, n)
                    for cls in cfg.resource_classes for n in (cfg.queue_name(cls), cfg.dlq_name(cls)))
    any_pool_queue = queue_arn(cfg, account, partition, f"runner-pool-{cfg.name}-*")
    resource_tag = {f"aws:ResourceTag/{POOL_TAG}": cfg.name}
    request_tag = {f"aws:RequestTag/{POOL_TAG}": cfg.name}
    statements: list[dict[str, Any]] = [
        {
            "Sid": "StateTable",
            "Effect": "Allow",
            "Action": [
                "dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:DeleteTable", "dynamodb:TagResource",
                "dynamodb:UntagResource", "dynamodb:ListTagsOfResource",     # the runner-pool:owner tag
                "dynamodb:DescribeTimeToLive", "dynamodb:UpdateTimeToLive",
                "dynamodb:DescribeContinuousBackups", "dynamodb:UpdateContinuousBackups",
                "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem",
                "dynamodb:BatchGetItem", "dynamodb:BatchWriteItem", "dynamodb:Scan",
            ],
            "Resource": [table],
        },
        {
            "Sid": "StateTableIndexes",           # and the table itself: provision history, spot interruptions
            "Effect": "Allow",
            "Action": ["dynamodb:Query"],
            "Resource": [table, f"{table}/index/*"],
        },
        {
            "Sid": "PoolQueues",                  # the configured classes' queues and dead-letter queues
            "Effect": "Allow",
            "Action": [
                "sqs:CreateQueue", "sqs:TagQueue", "sqs:GetQueueUrl", "sqs:GetQueueAttributes",
                "sqs:SetQueueAttributes", "sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage",
                "sqs:ChangeMessageVisibility", "sqs:ListQueueTags", "sqs:DeleteQueue",
            ],
            "Resource": queues,
        },
        {
            "Sid": "RemovedClassQueues",          # queues of a class no longer configured: found by tag, deleted
            "Effect": "Allow",
            "Action": ["sqs:GetQueueUrl", "sqs:ListQueueTags", "sqs:ReceiveMessage", "sqs:DeleteMessage",
                       "sqs:DeleteQueue"],
            "Resource": [any_pool_queue],
            "Condition": {"StringEquals": resource_tag},
        },
        {
            "Sid": "ListQueues",                  # ListQueues has no resource-level permissions
            "Effect": "Allow",
            "Action": ["sqs:ListQueues"],
            "Resource": ["*"],
        },
        {
            "Sid": "Describe",                    # EC2 Describe* calls have no resource-level permissions
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances", "ec2:DescribeLaunchTemplates", "ec2:DescribeLaunchTemplateVersions",
                       "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeImages"],
            "Resource": ["*"],
        },
        {
            "Sid": "CreateLaunchTemplate",        # only with the pool's tag on it
            "Effect": "Allow",
            "Action": ["ec2:CreateLaunchTemplate"],
            "Resource": [f"{own}:launch-template/*"],
            "Condition": {"StringEquals": request_tag},
        },
        {
            "Sid": "PoolLaunchTemplate",          # only the template carrying the pool's tag
            "Effect": "Allow",
            "Action": ["ec2:CreateLaunchTemplateVersion", "ec2:ModifyLaunchTemplate", "ec2:DeleteLaunchTemplate",
                       "ec2:DeleteLaunchTemplateVersions"],
            "Resource": [f"{own}:launch-template/*"],
            "Condition": {"StringEquals": resource_tag},
        },
        {
            "Sid": "LaunchFromPoolTemplate",      # CreateFleet (instant) also authorizes RunInstances
            "Effect": "Allow",
            "Action": ["ec2:CreateFleet", "ec2:RunInstances"],
            "Resource": [f"{own}:launch-template/*"],
            "Condition": {"StringEquals": resource_tag},
        },
        {
            "Sid": "LaunchTaggedInstances",       # the fleet and its instances must carry the pool's tag
            "Effect": "Allow",
            "Action": ["ec2:CreateFleet", "ec2:RunInstances"],
            "Resource": [f"{own}:fleet/*", f"{own}:instance/*"],
            "Condition": {"StringEquals": request_tag},
        },
        {
            "Sid": "LaunchInto",                  # what a launch uses or creates with the instance
            "Effect": "Allow",
            "Action": ["ec2:CreateFleet", "ec2:RunInstances"],
            "Resource": [f"{own}:subnet/*", f"{own}:security-group/*", f"{own}:network-interface/*",
                         f"{own}:volume/*", f"{own}:spot-instances-request/*", f"{ec2}::image/*"],
        },
        {
            "Sid": "TagOnLaunch",                 # tags only as part of the launch, never on their own
            "Effect": "Allow",
            "Action": ["ec2:CreateTags"],
            "Resource": [f"{own}:fleet/*", f"{own}:instance/*", f"{own}:volume/*", f"{own}:network-interface/*",
                         f"{own}:spot-instances-request/*"],
            "Condition": {"StringEquals": {"ec2:CreateAction": ["CreateFleet", "RunInstances"]}},
        },
        {
            "Sid": "TagLaunchTemplateOnCreate",   # the pool tag the template is created with
            "Effect": "Allow",
            "Action": ["ec2:CreateTags"],
            "Resource": [f"{own}:launch-template/*"],
            "Condition": {"StringEquals": {"ec2:CreateAction": "CreateLaunchTemplate"}},
        },
        {
            "Sid": "OwnerTagOnPoolTemplate",      # a Pulumi create records its stack on the pool's template
            "Effect": "Allow",
            "Action": ["ec2:CreateTags"],
            "Resource": [f"{own}:launch-template/*"],
            "Condition": {"StringEquals": resource_tag,
                          "ForAllValues:StringEquals": {"aws:TagKeys": [OWNER_TAG]}},
        },
        {
            # Cost tags (controlplane/costtags.py): a run's tags onto the pool instances it claimed, off
            # again on release; only those keys (never runner-pool:pool), and DeleteTags must name its
            # keys: without any it would remove every tag, and ForAllValues holds for no keys at all.
            "Sid": "RunTagsOnPoolInstances",
            "Effect": "Allow",
            "Action": ["ec2:CreateTags", "ec2:DeleteTags"],
            "Resource": [f"{own}:instance/*"],
            "Condition": {"StringEquals": resource_tag,
                          "ForAllValues:StringEquals": {"aws:TagKeys": costtags.tag_keys(cfg)},
                          "Null": {"aws:TagKeys": "false"}},
        },
        {
            "Sid": "TerminatePoolInstances",
            "Effect": "Allow",
            "Action": ["ec2:TerminateInstances"],
            "Resource": [f"{own}:instance/*"],
            "Condition": {"StringEquals": resource_tag},
        },
        {
            "Sid": "StopStartPoolInstances",      # the stopped tier: park idle runners, start them for a run
            "Effect": "Allow",
            "Action": ["ec2:StopInstances", "ec2:StartInstances"],
            "Resource": [f"{own}:instance/*"],
            "Condition": {"StringEquals": resource_tag},
        },
        {
            "Sid": "PassInstanceRole",
            "Effect": "Allow",
            "Action": ["iam:PassRole"],
            "Resource": [role_arn(account, partition, instance_role or instance_role_name(cfg))],
            "Condition": {"StringEquals": {"iam:PassedToService": ASSUME_ROLE_SERVICE}},
        },
        {
            # SecureString under the AWS-managed key aws/ssm: its key policy admits callers of this
            # account through SSM, so no KMS statement is needed (docs/security.md).
            "Sid": "RunnerTokens",
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "ssm:PutParameter", "ssm:DeleteParameter"],
            "Resource": [token_parameter_arn(cfg, account, partition)],
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


def pool_admin_policy(cfg: PoolConfig, account: str, partition: str) -> dict[str, Any]:
    """What the pool stack needs on top of :func:`control_plane_policy` with ``createInstanceRole``.

    The calls pulumi-aws makes to create, read, update and delete the role, its
    inline policy and the instance profile, on exactly those names.
    """
    role = role_arn(account, partition, instance_role_name(cfg))
    profile = f"arn:{partition}:iam::{account}:instance-profile/{cfg.instance_profile}"
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "InstanceRole",
                "Effect": "Allow",
                "Action": [
                    "iam:CreateRole", "iam:GetRole", "iam:DeleteRole", "iam:UpdateRole",
                    "iam:UpdateRoleDescription", "iam:UpdateAssumeRolePolicy", "iam:TagRole", "iam:UntagRole",
                    "iam:ListRoleTags", "iam:PutRolePolicy", "iam:GetRolePolicy", "iam:DeleteRolePolicy",
                    "iam:ListRolePolicies", "iam:ListAttachedRolePolicies", "iam:ListInstanceProfilesForRole",
                ],
                "Resource": [role],
            },
            {
                "Sid": "InstanceProfile",
                "Effect": "Allow",
                "Action": [
                    "iam:CreateInstanceProfile", "iam:GetInstanceProfile", "iam:DeleteInstanceProfile",
                    "iam:AddRoleToInstanceProfile", "iam:RemoveRoleFromInstanceProfile",
                    "iam:TagInstanceProfile", "iam:UntagInstanceProfile",
                ],
                "Resource": [profile],
            },
        ],
    }


def policy(name: str, cfg: PoolConfig, account: str, partition: str,
           instance_role: str | None = None) -> dict[str, Any]:
    """One of :data:`POLICY_NAMES` by name."""
    if name == "control-plane":
        return control_plane_policy(cfg, account, partition, instance_role)
    if name == "pool-admin":
        return pool_admin_policy(cfg, account, partition)
    if name == "instance":
        return instance_policy(cfg, account, partition)
    raise ValueError(f"no policy {name!r} (one of {', '.join(POLICY_NAMES)})")
