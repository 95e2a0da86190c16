"""Who manages a pool's table, queues and launch template: the ``runner-pool:owner`` tag.

Every create of the Pulumi program is an idempotent "ensure", so without an
owner a second stack naming the same pool, or a resource renamed without
``aliases``, would adopt the existing table (or queue, or template) under a
new URN, and the engine would then delete the old URN: the pool's end. The
owner is ``<org>/<project>/<stack>/<resource name>``; a create refuses a
resource whose owner tag names someone else (:class:`OwnedElsewhere`), and
records its own. An untagged resource (made by ``runner-pool pool apply``)
is adopted and tagged. The CLI never reads or writes the tag.
"""
from __future__ import annotations

from typing import Any

from controlplane import aws
from controlplane.config import PoolConfig
from controlplane.errors import AwsError, RunnerPoolError

OWNER_TAG = "runner-pool:owner"


class OwnedElsewhere(RunnerPoolError):
    """The resource exists and another stack (or another resource of this stack) manages it."""


# ---------------------------------------------------------------- table


def _table_arn(cfg: PoolConfig) -> str | None:
    try:
        with aws.mapped("dynamodb:DescribeTable"):
            return str(aws.client("dynamodb", cfg.region).describe_table(TableName=cfg.table_name)["Table"]["TableArn"])
    except aws.NotFound:
        return None


def table_owner(cfg: PoolConfig) -> str | None:
    arn = _table_arn(cfg)
    if arn is None:
        return None
    with aws.mapped("dynamodb:ListTagsOfResource"):
        tags = aws.client("dynamodb", cfg.region).list_tags_of_resource(ResourceArn=arn).get("Tags", [])
    return next((t["Value"] for t in tags if t["Key"] == OWNER_TAG), None)


def set_table_owner(cfg: PoolConfig, owner: str) -> None:
    arn = _table_arn(cfg)
    if arn is None:
        raise AwsError(f"table {cfg.table_name} does not exist")
    ddb = aws.client("dynamodb", cfg.region)
    with aws.mapped("dynamodb:TagResource"):
        # Untag first: the emulator (moto) appends a tag of an existing key instead of replacing it.
        ddb.untag_resource(ResourceArn=arn, TagKeys=[OWNER_TAG])
        ddb.tag_resource(ResourceArn=arn, Tags=[{"Key": OWNER_TAG, "Value": owner}])


# ---------------------------------------------------------------- queues


def _queue_url(cfg: PoolConfig, name: str) -> str | None:
    try:
        with aws.mapped("sqs:GetQueueUrl"):
            return str(aws.client("sqs", cfg.region).get_queue_url(QueueName=name)["QueueUrl"])
    except aws.NotFound:
        return None


def queue_owner(cfg: PoolConfig, resource_class: str) -> str | None:
    url = _queue_url(cfg, cfg.queue_name(resource_class))
    if url is None:
        return None
    with aws.mapped("sqs:ListQueueTags"):
        tags = aws.client("sqs", cfg.region).list_queue_tags(QueueUrl=url).get("Tags", {})
    value = tags.get(OWNER_TAG)
    return str(value) if value is not None else None


def set_queue_owner(cfg: PoolConfig, resource_class: str, owner: str) -> None:
    sqs = aws.client("sqs", cfg.region)
    for name in (cfg.queue_name(resource_class), cfg.dlq_name(resource_class)):
        url = _queue_url(cfg, name)
        if url is None:
            raise AwsError(f"queue {name} does not exist")
        with aws.mapped("sqs:TagQueue"):
            sqs.tag_queue(QueueUrl=url, Tags={OWNER_TAG: owner})


# ---------------------------------------------------------------- launch template


def _template(cfg: PoolConfig) -> dict[str, Any] | None:
    with aws.mapped("ec2:DescribeLaunchTemplates"):
        lts = aws.client("ec2", cfg.region).describe_launch_templates(
            Filters=[{"Name": "launch-template-name", "Values": [cfg.launch_template_name]}])["LaunchTemplates"]
    return lts[0] if lts else None


def template_owner(cfg: PoolConfig) -> str | None:
    lt = _template(cfg)
    tags = (lt or {}).get("Tags") or []
    return next((str(t["Value"]) for t in tags if t["Key"] == OWNER_TAG), None)


def set_template_owner(cfg: PoolConfig, owner: str) -> None:
    lt = _template(cfg)
    if lt is None:
        raise AwsError(f"launch template {cfg.launch_template_name} does not exist")
    with aws.mapped("ec2:CreateTags"):
        aws.client("ec2", cfg.region).create_tags(Resources=[str(lt["LaunchTemplateId"])],
                                                  Tags=[{"Key": OWNER_TAG, "Value": owner}])


# ---------------------------------------------------------------- the rule


def refuse_if_owned_elsewhere(what: str, current: str | None, owner: str) -> None:
    """A create may adopt what nobody owns, or what it owns itself; never another's."""
    if current is not None and current != owner:
        raise OwnedElsewhere(
            f"{what} is managed by {current}, not {owner}",
            hint="a renamed or re-parented resource needs `aliases` to the old name; a second stack must "
                 "name a pool of its own; if the other stack is gone, remove the runner-pool:owner tag")
