"""The pool: one SQS queue (plus a dead-letter queue) per resource class.

A message says "this idle instance can be claimed". The queue is only a hint:
the claim (a conditional write in the state table) decides, so duplicates and
stale messages are harmless. Rules that follow from that:

* receive in batches of up to 10 with long polling (the reference's 1-message
  short polls could report an empty queue that was not empty);
* a message is deleted only once the claim it led to is decided: won, or lost
  because the row moved on (stale). Valid messages a provision did not need go
  back at once (visibility 0) for the next consumer;
* a body that cannot be parsed is deleted on sight; messages received more
  than ``MAX_RECEIVES`` times move to the DLQ, which refresh re-drives.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from controlplane import aws
from controlplane.config import PoolConfig
from controlplane.errors import ConfigError

VISIBILITY_TIMEOUT_S = 60          # a crashed provisioner's messages reappear after this
RETENTION_S = 14 * 86400           # SQS maximum; idle rows expire long before
MAX_RECEIVES = 10
BATCH_MAX = 10                     # messages per ReceiveMessage or *Batch call: SQS's limit
LONG_POLL_S = 1                    # first receive of a provision waits this long on an empty queue


@dataclass(frozen=True)
class PoolMessage:
    instance_id: str
    resource_class: str
    instance_type: str
    usage_class: str
    enqueued_at: float
    receipt: str = field(default="", compare=False)

    def body(self) -> str:
        return json.dumps({"instance_id": self.instance_id, "resource_class": self.resource_class,
                           "instance_type": self.instance_type, "usage_class": self.usage_class,
                           "enqueued_at": self.enqueued_at})

    @classmethod
    def parse(cls, msg: dict[str, Any]) -> PoolMessage | None:
        try:
            b = json.loads(msg["Body"])
            return cls(str(b["instance_id"]), str(b["resource_class"]), str(b["instance_type"]),
                       str(b["usage_class"]), float(b["enqueued_at"]), msg["ReceiptHandle"])
        except (KeyError, ValueError, TypeError):
            return None


def ensure_queues(cfg: PoolConfig) -> dict[str, str]:
    """Create (or keep) each class's queue and DLQ. Returns class -> queue URL."""
    sqs = aws.client("sqs", cfg.region)
    urls = {}
    for cls in cfg.resource_classes:
        tags = {"runner-pool:pool": cfg.name, "runner-pool:class": cls}
        with aws.mapped(f"sqs:CreateQueue for class {cls}"):
            dlq_url = sqs.create_queue(QueueName=cfg.dlq_name(cls), tags=tags,
                                       Attributes={"MessageRetentionPeriod": str(RETENTION_S)})["QueueUrl"]
            dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            attrs = {
                "VisibilityTimeout": str(VISIBILITY_TIMEOUT_S),
                "MessageRetentionPeriod": str(RETENTION_S),
                "ReceiveMessageWaitTimeSeconds": str(LONG_POLL_S),
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVES)}),
            }
        try:
            with aws.mapped(f"sqs:CreateQueue for class {cls}"):
                url = sqs.create_queue(QueueName=cfg.queue_name(cls), Attributes=attrs, tags=tags)["QueueUrl"]
        except aws.AlreadyExists:                   # exists with other attributes: converge them
            with aws.mapped(f"sqs:SetQueueAttributes for class {cls}"):
                url = sqs.get_queue_url(QueueName=cfg.queue_name(cls))["QueueUrl"]
                sqs.set_queue_attributes(QueueUrl=url, Attributes=attrs)
        urls[cls] = url
    return urls


def pool_queues(cfg: PoolConfig) -> dict[str, str]:
    """Every class queue this pool has in SQS (by tag), configured or not."""
    sqs = aws.client("sqs", cfg.region)
    found = {}
    prefix = f"runner-pool-{cfg.name}-"
    for page in sqs.get_paginator("list_queues").paginate(QueueNamePrefix=prefix):
        for url in page.get("QueueUrls", []):
            if url.endswith("-dlq"):
                continue
            try:
                with aws.mapped("sqs:ListQueueTags"):
                    tags = sqs.list_queue_tags(QueueUrl=url).get("Tags", {})
            except aws.NotFound:
                continue                            # deleted since it was listed
            if tags.get("runner-pool:pool") == cfg.name and "runner-pool:class" in tags:
                found[tags["runner-pool:class"]] = url
    return found


def queue_url(cfg: PoolConfig, resource_class: str) -> str:
    sqs = aws.client("sqs", cfg.region)
    try:
        with aws.mapped("sqs:GetQueueUrl"):
            return str(sqs.get_queue_url(QueueName=cfg.queue_name(resource_class))["QueueUrl"])
    except aws.NotFound as exc:
        raise ConfigError(f"queue for class {resource_class!r} of pool {cfg.name!r} does not exist",
                          hint="run `runner-pool pool apply` or `runner-pool refresh`") from exc


def dlq_url(cfg: PoolConfig, resource_class: str) -> str | None:
    sqs = aws.client("sqs", cfg.region)
    try:
        with aws.mapped("sqs:GetQueueUrl"):
            return str(sqs.get_queue_url(QueueName=cfg.dlq_name(resource_class))["QueueUrl"])
    except aws.NotFound:
        return None


def delete_queue(region: str, url: str) -> None:
    sqs = aws.client("sqs", region)
    try:
        with aws.mapped("sqs:DeleteQueue"):
            sqs.delete_queue(QueueUrl=url)
    except aws.NotFound:
        pass                                        # gone already: what a delete wants


def send(region: str, url: str, messages: Iterable[PoolMessage]) -> None:
    sqs = aws.client("sqs", region)
    for chunk in aws.chunks(list(messages), 10):
        entries = [{"Id": str(i), "MessageBody": m.body()} for i, m in enumerate(chunk)]
        with aws.mapped("sqs:SendMessageBatch"):
            resp = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        if resp.get("Failed"):
            codes = sorted({f.get("Code", "?") for f in resp["Failed"]})
            raise aws.AwsError(f"SQS refused {len(resp['Failed'])} message(s): {', '.join(codes)}")


class Poolable(Protocol):
    """What a pool message is made of: a Member or an InstanceRecord."""

    @property
    def instance_id(self) -> str: ...
    @property
    def resource_class(self) -> str: ...
    @property
    def instance_type(self) -> str: ...
    @property
    def usage_class(self) -> str: ...


def requeue(cfg: PoolConfig, instances: Iterable[Poolable], now: float) -> None:
    """Put idle instances (back) into their class's queue: one SendMessageBatch per 10 per class."""
    by_class: dict[str, list[Poolable]] = {}
    for i in instances:
        by_class.setdefault(i.resource_class, []).append(i)
    for cls, items in by_class.items():
        send(cfg.region, queue_url(cfg, cls),
             [PoolMessage(i.instance_id, cls, i.instance_type, i.usage_class, now) for i in items])


def receive(region: str, url: str, max_messages: int, wait_s: int) -> list[PoolMessage]:
    """Up to ``max_messages`` (<= 10) messages; waits up to ``wait_s`` on an empty queue."""
    sqs = aws.client("sqs", region)
    with aws.mapped("sqs:ReceiveMessage"):
        raw = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=max(1, min(10, max_messages)),
                                  WaitTimeSeconds=wait_s).get("Messages", [])
    out, poison = [], []
    for m in raw:
        parsed = PoolMessage.parse(m)
        if parsed is None:
            poison.append(m["ReceiptHandle"])
        else:
            out.append(parsed)
    if poison:
        _delete_handles(sqs, url, poison)
    return out


def delete(region: str, url: str, messages: Iterable[PoolMessage]) -> None:
    handles = [m.receipt for m in messages if m.receipt]
    if handles:
        _delete_handles(aws.client("sqs", region), url, handles)


def _delete_handles(sqs: Any, url: str, handles: list[str]) -> None:
    def one(chunk: list[str]) -> None:
        with aws.mapped("sqs:DeleteMessageBatch"):
            sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": h}
                                                            for i, h in enumerate(chunk)])

    aws.parallel(one, list(aws.chunks(handles, BATCH_MAX)))       # the batches at once


def give_back(region: str, url: str, messages: Iterable[PoolMessage]) -> None:
    """Make received messages visible again at once (not needed by this provision)."""
    handles = [m.receipt for m in messages if m.receipt]
    sqs = aws.client("sqs", region)
    for chunk in aws.chunks(handles, 10):
        with aws.mapped("sqs:ChangeMessageVisibilityBatch"):
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0} for i, h in enumerate(chunk)])


def drain(region: str, url: str, max_rounds: int = 1000) -> list[PoolMessage]:
    """Receive and delete everything visible in a queue (bounded)."""
    got: list[PoolMessage] = []
    for _ in range(max_rounds):
        batch = receive(region, url, 10, 0)
        if not batch:
            break
        delete(region, url, batch)
        got.extend(batch)
    return got


def depth(region: str, url: str) -> dict[str, int]:
    sqs = aws.client("sqs", region)
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return {"visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))}
