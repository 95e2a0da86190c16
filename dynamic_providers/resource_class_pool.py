"""``ResourceClassPool``: one resource class's SQS queue and dead-letter queue.

Inputs: ``pool`` (the pool config dict), ``resourceClass`` (a class of that
config). Outputs: ``queueUrl``, ``queueName``, ``dlqUrl``, ``dlqName``.

* create / update -> :func:`controlplane.pool.ensure_queues` for this one
  class (the config narrowed to it): queue + DLQ with the redrive policy,
  "already exists" converges the attributes.
* delete -> :func:`controlplane.pool.delete_queue` for the queue and its DLQ
  ("not found" is success). Idle instances of a removed class are retired by
  release and expire through refresh; nothing else reads the queue.
* read -> the queue exists (:func:`controlplane.pool.queue_url`), or the
  resource is gone (empty id).
* A new pool name, region or class name replaces it. Other config changes do
  not touch the queue: its attributes are constants of ``controlplane.pool``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi.dynamic
from pulumi.dynamic import CheckFailure, CreateResult, ReadResult, UpdateResult

from controlplane import ownership
from controlplane import pool as pool_q
from controlplane.config import PoolConfig
from controlplane.errors import ConfigError
from dynamic_providers import _base


def ensure_class_queues(cfg: PoolConfig, resource_class: str) -> dict[str, str]:
    """Queue and DLQ of one class; returns the outputs."""
    one = cfg.model_copy(update={"resource_classes": {resource_class: cfg.resource_class(resource_class)}})
    url = pool_q.ensure_queues(one)[resource_class]
    return {"queueUrl": url, "queueName": cfg.queue_name(resource_class),
            "dlqUrl": pool_q.dlq_url(cfg, resource_class) or "", "dlqName": cfg.dlq_name(resource_class)}


class ResourceClassPoolProvider(_base.PoolResourceProvider):
    replace_keys = ("resourceClass",)

    def check_more(self, cfg: PoolConfig, news: Mapping[str, Any]) -> list[CheckFailure]:
        cls = news.get("resourceClass")
        if _base.is_unknown(cls):
            return []
        if cls not in cfg.resource_classes:
            return [CheckFailure("resourceClass", f"resourceClass {cls!r} is not a class of pool {cfg.name!r}: "
                                                  f"use one of {', '.join(sorted(cfg.resource_classes))}")]
        return []

    def needs_update(self, olds: Mapping[str, Any], news: Mapping[str, Any]) -> bool:
        return False

    def create(self, props: dict[str, Any]) -> CreateResult:
        with _base.mapped_errors(f"queues of class {props.get('resourceClass')}"):
            cfg = _base.pool_config(props["pool"])
            owner = _base.owner_of(props)
            if owner:
                ownership.refuse_if_owned_elsewhere(f"queue {cfg.queue_name(props['resourceClass'])}",
                                                    ownership.queue_owner(cfg, props["resourceClass"]), owner)
            outs = ensure_class_queues(cfg, props["resourceClass"])
            if owner:
                ownership.set_queue_owner(cfg, props["resourceClass"], owner)
        return CreateResult(outs["queueUrl"], _base.outputs(props, **outs))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        with _base.mapped_errors(f"queues of class {news.get('resourceClass')}"):
            cfg = _base.pool_config(news["pool"])
            outs = ensure_class_queues(cfg, news["resourceClass"])
            owner = _base.owner_of(news)
            if owner:
                ownership.set_queue_owner(cfg, news["resourceClass"], owner)
        return UpdateResult(_base.outputs(news, **outs))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with _base.mapped_errors(f"queues of class {props.get('resourceClass')}"):
            cfg = _base.pool_config(props["pool"])
            try:
                url = pool_q.queue_url(cfg, props["resourceClass"])
            except ConfigError:                       # the queue does not exist
                return ReadResult("", {})
            dlq = pool_q.dlq_url(cfg, props["resourceClass"]) or ""
        return ReadResult(url, _base.outputs(props, queueUrl=url, dlqUrl=dlq))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        region = _base.pool_identity(props.get("pool"))[1]
        with _base.mapped_errors(f"delete queues of class {props.get('resourceClass')}"):
            for url in (props.get("queueUrl") or id_, props.get("dlqUrl")):
                if url:
                    pool_q.delete_queue(region, url)


class ResourceClassPoolArgs:
    """Inputs of :class:`ResourceClassPool`."""

    def __init__(self, pool: pulumi.Input[dict[str, Any]], resource_class: pulumi.Input[str],
                 owner: pulumi.Input[str] | None = None) -> None:
        self.pool = pool
        self.resource_class = resource_class
        self.owner = owner


class ResourceClassPool(pulumi.dynamic.Resource, module="runnerpool", name="ResourceClassPool"):
    queueUrl: pulumi.Output[str]
    queueName: pulumi.Output[str]
    dlqUrl: pulumi.Output[str]
    dlqName: pulumi.Output[str]

    def __init__(self, name: str, args: ResourceClassPoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(ResourceClassPoolProvider(), name, {
            "pool": args.pool, "resourceClass": args.resource_class, "owner": args.owner,
            "queueUrl": None, "queueName": None, "dlqUrl": None, "dlqName": None,
        }, opts)
