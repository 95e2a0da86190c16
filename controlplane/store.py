"""The state table: its lifecycle, the pool's stored config, reads and queries.

Writes of the ``state`` attribute live in :mod:`controlplane.state`; this
module creates rows (``created`` straight after CreateFleet), reads them in
batches, and pages through every query (the reference read one 1 MB page and
silently missed the rest).

Reads of the agent rows and state rows for a set of instances are one
BatchGetItem per 50 instances (two keys each), with consistent reads: that is
how validation and release watch many instances at once.

Every reader skips a row it cannot read (:class:`controlplane.records.UnreadableRow`:
junk an instance wrote into its agent row, an agent row that landed in an index,
a half-written row) instead of failing the operation: it logs a ``row.unreadable``
event and counts the row in :data:`SKIPPED`, which the CLI reports with the
command's result. A skipped state row is treated as absent; a skipped agent row
as an agent that never reported.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controlplane import aws
from controlplane.clock import Deadline, wait_until
from controlplane.errors import ConditionFailed, ConfigError
from controlplane.logs import event
from controlplane.records import (
    AGENT_SK,
    POOL_PK,
    REGISTRATION_ATTRIBUTES,
    STATE_SK,
    AgentRecord,
    InstanceRecord,
    LaunchedInstance,
    State,
    UnreadableRow,
    agent_pk,
    instance_arn,
    instance_id_of,
    num,
)

if TYPE_CHECKING:
    from controlplane.config import PoolConfig

TABLE_READY_TIMEOUT_S = 120
BATCH_GET_KEYS = 100
BATCH_WRITE_ITEMS = 25
UNPROCESSED_RETRY_S = 10


class SkippedRows:
    """Rows readers skipped in this process, by key (thread-safe; the CLI reports and clears them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], str] = {}

    def add(self, table: str, err: UnreadableRow) -> None:
        with self._lock:
            first = (err.pk, err.sk) not in self._rows
            self._rows[(err.pk, err.sk)] = err.reason
        if first:
            event("row.unreadable", logging.WARNING, table=table, pk=err.pk, sk=err.sk, reason=err.reason)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return [{"pk": pk, "sk": sk, "reason": why} for (pk, sk), why in sorted(self._rows.items())]

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


SKIPPED = SkippedRows()


def _readable(table: str, items: Iterable[dict[str, Any]], parse: Any) -> Iterator[Any]:
    """``parse(item)`` for each item, skipping (logged, counted) the ones it cannot read."""
    for item in items:
        try:
            yield parse(item)
        except UnreadableRow as err:
            SKIPPED.add(table, err)


@dataclass(frozen=True)
class Pool:
    """A pool as operations see it: its config plus the account it lives in."""

    config: PoolConfig
    account: str
    partition: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def region(self) -> str:
        return self.config.region

    @property
    def table(self) -> str:
        return self.config.table_name

    def arn(self, instance_id: str) -> str:
        return instance_arn(self.partition, self.region, self.account, instance_id)


# ---------------------------------------------------------------- table lifecycle

def table_exists(cfg: PoolConfig) -> bool:
    ddb = aws.client("dynamodb", cfg.region)
    return aws.found("dynamodb:DescribeTable", lambda: ddb.describe_table(TableName=cfg.table_name))


def ensure_table(cfg: PoolConfig) -> bool:
    """Create the table if missing (GSIs, TTL, point-in-time recovery). True if created."""
    ddb = aws.client("dynamodb", cfg.region)
    created = False
    if not table_exists(cfg):
        try:
            with aws.mapped("dynamodb:CreateTable"):
                ddb.create_table(
                    TableName=cfg.table_name,
                    BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[
                        {"AttributeName": "pk", "AttributeType": "S"},
                        {"AttributeName": "sk", "AttributeType": "S"},
                        {"AttributeName": "run_id", "AttributeType": "S"},
                        {"AttributeName": "state", "AttributeType": "S"},
                        {"AttributeName": "threshold", "AttributeType": "N"},
                    ],
                    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                    GlobalSecondaryIndexes=[
                        {"IndexName": "by_run", "KeySchema": [{"AttributeName": "run_id", "KeyType": "HASH"}],
                         "Projection": {"ProjectionType": "ALL"}},
                        {"IndexName": "by_state",
                         "KeySchema": [{"AttributeName": "state", "KeyType": "HASH"},
                                       {"AttributeName": "threshold", "KeyType": "RANGE"}],
                         "Projection": {"ProjectionType": "ALL"}},
                    ],
                    Tags=[{"Key": "runner-pool:pool", "Value": cfg.name}],
                )
                created = True
        except aws.AlreadyExists:      # created concurrently: fine
            pass
    ready = wait_until(
        lambda: ddb.describe_table(TableName=cfg.table_name)["Table"]["TableStatus"] == "ACTIVE",
        Deadline(TABLE_READY_TIMEOUT_S), 1.0)
    if not ready:
        raise aws.AwsError(f"table {cfg.table_name} not ACTIVE after {TABLE_READY_TIMEOUT_S} s")
    ttl = ddb.describe_time_to_live(TableName=cfg.table_name)["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        ddb.update_time_to_live(TableName=cfg.table_name,
                                TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"})
    with aws.mapped("dynamodb:UpdateContinuousBackups"):
        backups = ddb.describe_continuous_backups(TableName=cfg.table_name)["ContinuousBackupsDescription"]
        pitr = backups.get("PointInTimeRecoveryDescription", {}).get("PointInTimeRecoveryStatus")
        if pitr != "ENABLED":
            ddb.update_continuous_backups(TableName=cfg.table_name,
                                          PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
    return created


def delete_table(cfg: PoolConfig) -> bool:
    ddb = aws.client("dynamodb", cfg.region)
    return aws.found("dynamodb:DeleteTable", lambda: ddb.delete_table(TableName=cfg.table_name))


# ---------------------------------------------------------------- the pool's stored config

def save_pool(pool: Pool, extra: dict[str, Any] | None = None) -> None:
    ddb = aws.client("dynamodb", pool.region)
    body = {"config": json.loads(pool.config.to_json()), "account": pool.account, "partition": pool.partition,
            **(extra or {})}
    ddb.put_item(TableName=pool.table, Item={
        "pk": {"S": POOL_PK}, "sk": {"S": "config"}, "body": {"S": json.dumps(body)},
        "updated_at": num(time.time()),
    })


def load_pool(name: str, region: str) -> Pool:
    """The pool ``pool apply`` stored; ConfigError if there is none."""
    table = f"runner-pool-{name}"
    ddb = aws.client("dynamodb", region)
    try:
        with aws.mapped("dynamodb:GetItem pool config"):
            item = ddb.get_item(TableName=table, Key={"pk": {"S": POOL_PK}, "sk": {"S": "config"}},
                                ConsistentRead=True).get("Item")
    except aws.NotFound as exc:
        raise ConfigError(f"pool {name!r} not found in {region} (no table {table})",
                          hint="run `runner-pool pool apply --config pool.yaml` first, or check --region") from exc
    if not item:
        raise ConfigError(f"pool {name!r} has a table but no stored config",
                          hint="run `runner-pool pool apply --config pool.yaml`")
    body = json.loads(item["body"]["S"])
    # pydantic only now, after the first AWS call (fast command start)
    from controlplane.config import parse_config

    cfg = parse_config(body["config"], f"stored config of pool {name}")
    return Pool(cfg, body["account"], body["partition"])


def pool_meta(pool: Pool) -> dict[str, Any]:
    ddb = aws.client("dynamodb", pool.region)
    item = ddb.get_item(TableName=pool.table, Key={"pk": {"S": POOL_PK}, "sk": {"S": "config"}},
                        ConsistentRead=True).get("Item")
    return json.loads(item["body"]["S"]) if item else {}


def update_pool_meta(pool: Pool, **fields: Any) -> None:
    body = pool_meta(pool)
    body.update(fields)
    ddb = aws.client("dynamodb", pool.region)
    ddb.update_item(TableName=pool.table, Key={"pk": {"S": POOL_PK}, "sk": {"S": "config"}},
                    UpdateExpression="SET body = :b", ExpressionAttributeValues={":b": {"S": json.dumps(body)}})


# ---------------------------------------------------------------- rows

def put_created(pool: Pool, launched: Iterable[LaunchedInstance], run_id: str | None, resource_class: str,
                threshold: float, now: float, registration: dict[str, str] | None = None) -> list[InstanceRecord]:
    """Write ``created`` rows for instances CreateFleet just returned (BatchWriteItem).

    ``registration`` (see :data:`controlplane.records.REGISTRATION_ATTRIBUTES`)
    goes into every row: what each agent needs to register its one runner.
    """
    records = [
        InstanceRecord(arn=pool.arn(li.instance_id), state=State.CREATED, threshold=threshold,
                       resource_class=resource_class, instance_type=li.instance_type, usage_class=li.usage_class,
                       subnet_id=li.subnet_id, launched_at=now, run_id=run_id, updated_at=now,
                       availability_zone=li.availability_zone)
        for li in launched
    ]
    extra = {k: {"S": v} for k, v in (registration or {}).items() if k in REGISTRATION_ATTRIBUTES}
    _batch_write(pool, [{"PutRequest": {"Item": {**r.to_item(), **extra}}} for r in records])
    return records


def set_registration(pool: Pool, instance_id: str, run_id: str, state: State, attr: str, value: str) -> bool:
    """Put one runner's credential into a row still ``state`` (created/claimed) for ``run_id``.

    False when the row moved on (its credential would be useless: the next
    transition removes it anyway, so nothing is written).
    """
    if attr not in REGISTRATION_ATTRIBUTES or state not in (State.CREATED, State.CLAIMED):
        raise ValueError(f"no credential {attr!r} on a {state} row")
    ddb = aws.client("dynamodb", pool.region)
    try:
        with aws.mapped(f"dynamodb:UpdateItem credential of {instance_id}"):
            ddb.update_item(
                TableName=pool.table, Key={"pk": {"S": pool.arn(instance_id)}, "sk": {"S": STATE_SK}},
                ConditionExpression="#s = :s AND #r = :r", UpdateExpression="SET #g = :g",
                ExpressionAttributeNames={"#s": "state", "#r": "run_id", "#g": attr},
                ExpressionAttributeValues={":s": {"S": state.value}, ":r": {"S": run_id}, ":g": {"S": value}})
    except aws.ConditionFailed:
        return False
    return True


def extend_idle(pool: Pool, record: InstanceRecord, threshold: float, now: float) -> bool:
    """Give an idle row a new threshold if it is still idle, in no run, with the threshold read.

    Not a state change (the state attribute is not written): the warm minimum keeping an
    instance past its idle time. False when the row moved on (a claim, an expiry) meanwhile.
    """
    ddb = aws.client("dynamodb", pool.region)
    try:
        with aws.mapped(f"dynamodb:UpdateItem idle threshold of {record.instance_id}"):
            ddb.update_item(
                TableName=pool.table, Key={"pk": {"S": record.arn}, "sk": {"S": STATE_SK}},
                ConditionExpression="#s = :idle AND #t = :old AND attribute_not_exists(#r)",
                UpdateExpression="SET #t = :new, #u = :now ADD #v :one",
                ExpressionAttributeNames={"#s": "state", "#t": "threshold", "#r": "run_id", "#u": "updated_at",
                                          "#v": "version"},
                ExpressionAttributeValues={":idle": {"S": State.IDLE.value}, ":old": num(record.threshold),
                                           ":new": num(threshold), ":now": num(now), ":one": {"N": "1"}})
    except ConditionFailed:
        return False
    return True


def put_record(pool: Pool, record: InstanceRecord) -> None:
    aws.client("dynamodb", pool.region).put_item(TableName=pool.table, Item=record.to_item())


def delete_rows(pool: Pool, arns: Iterable[str], *, state: bool = True, agent: bool = True) -> None:
    reqs = []
    for arn in arns:
        if state:
            reqs.append({"DeleteRequest": {"Key": {"pk": {"S": arn}, "sk": {"S": STATE_SK}}}})
        if agent:
            reqs.append({"DeleteRequest": {"Key": {"pk": {"S": agent_pk(arn)}, "sk": {"S": AGENT_SK}}}})
    _batch_write(pool, reqs)


def _batch_write(pool: Pool, requests: list[dict[str, Any]]) -> None:
    ddb = aws.client("dynamodb", pool.region)
    for chunk in aws.chunks(requests, BATCH_WRITE_ITEMS):
        pending: dict[str, Any] = {pool.table: chunk}
        deadline = Deadline(UNPROCESSED_RETRY_S)
        delay = 0.05
        while pending:
            with aws.mapped("dynamodb:BatchWriteItem"):
                pending = ddb.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}
            if pending:
                if deadline.expired:
                    raise aws.AwsError(f"BatchWriteItem left {len(pending[pool.table])} items unprocessed")
                deadline.clock.sleep(delay)
                delay = min(delay * 2, 1.0)


def read_set(pool: Pool, instance_ids: Iterable[str]) -> dict[str, tuple[InstanceRecord | None, AgentRecord | None]]:
    """State and agent rows of many instances: one consistent BatchGetItem per 50."""
    ids = list(dict.fromkeys(instance_ids))
    out: dict[str, tuple[InstanceRecord | None, AgentRecord | None]] = {i: (None, None) for i in ids}
    keys = []
    for i in ids:
        arn = pool.arn(i)
        keys.append({"pk": {"S": arn}, "sk": {"S": STATE_SK}})
        keys.append({"pk": {"S": agent_pk(arn)}, "sk": {"S": AGENT_SK}})
    ddb = aws.client("dynamodb", pool.region)
    for chunk in aws.chunks(keys, BATCH_GET_KEYS):
        pending: dict[str, Any] = {pool.table: {"Keys": chunk, "ConsistentRead": True}}
        deadline = Deadline(UNPROCESSED_RETRY_S)
        while pending:
            with aws.mapped("dynamodb:BatchGetItem"):
                resp = ddb.batch_get_item(RequestItems=pending)
            items = resp.get("Responses", {}).get(pool.table, [])
            for rec in _readable(pool.table, (i for i in items if i.get("sk", {}).get("S") == STATE_SK),
                                 InstanceRecord.from_item):
                if rec.instance_id in out:
                    out[rec.instance_id] = (rec, out[rec.instance_id][1])
            for ag in _readable(pool.table, (i for i in items if i.get("sk", {}).get("S") != STATE_SK),
                                AgentRecord.from_item):
                if ag.instance_id in out:
                    out[ag.instance_id] = (out[ag.instance_id][0], ag)
            pending = resp.get("UnprocessedKeys") or {}
            if pending and deadline.expired:
                raise aws.AwsError("BatchGetItem kept returning unprocessed keys")
            if pending:
                deadline.clock.sleep(0.05)
    return out


def get_record(pool: Pool, instance_id: str) -> InstanceRecord | None:
    item = aws.client("dynamodb", pool.region).get_item(
        TableName=pool.table, Key={"pk": {"S": pool.arn(instance_id)}, "sk": {"S": STATE_SK}},
        ConsistentRead=True).get("Item")
    return next(_readable(pool.table, [item], InstanceRecord.from_item), None) if item else None


def _paginate(pool: Pool, op: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    ddb = aws.client("dynamodb", pool.region)
    paginator = ddb.get_paginator(op)
    with aws.mapped(f"dynamodb:{op}"):
        for page in paginator.paginate(TableName=pool.table, **kwargs):
            yield from page.get("Items", [])


def run_records(pool: Pool, run_id: str) -> list[InstanceRecord]:
    """Rows that belong to ``run_id`` (index ``by_run``, every page)."""
    items = _paginate(pool, "query", IndexName="by_run", KeyConditionExpression="run_id = :r",
                      ExpressionAttributeValues={":r": {"S": run_id}})
    # Only state rows carry run_id as the control plane writes it; anything else in the index is junk.
    return list(_readable(pool.table, items, InstanceRecord.from_item))


def records_in_state(pool: Pool, state: State, threshold_before: float | None = None,
                     launched_before: float | None = None) -> list[InstanceRecord]:
    """Rows in ``state`` (index ``by_state``), optionally only those whose threshold has passed,
    or only those launched at or before ``launched_before``.

    The launch time is not in the index's key, so that condition is a FilterExpression: DynamoDB
    still reads every row of the state, but returns only the old ones (refresh's lifetime check
    would otherwise pull every idle row of the pool, 6,500 of 10,000, on each run).
    """
    key = "#s = :s"
    names = {"#s": "state"}
    values: dict[str, Any] = {":s": {"S": state.value}}
    extra: dict[str, Any] = {}
    if threshold_before is not None:
        key += " AND threshold < :t"
        values[":t"] = num(threshold_before)
    if launched_before is not None:
        names["#l"] = "launched_at"
        values[":l"] = num(launched_before)
        extra["FilterExpression"] = "#l <= :l"
    items = _paginate(pool, "query", IndexName="by_state", KeyConditionExpression=key,
                      ExpressionAttributeNames=names, ExpressionAttributeValues=values, **extra)
    return list(_readable(pool.table, items, InstanceRecord.from_item))


def count_idle(pool: Pool, resource_class: str) -> int:
    """Idle rows of a class (index ``by_state``, COUNT only, every page)."""
    ddb = aws.client("dynamodb", pool.region)
    total = 0
    with aws.mapped("dynamodb:Query idle count"):
        for page in ddb.get_paginator("query").paginate(
                TableName=pool.table, IndexName="by_state", KeyConditionExpression="#s = :s", Select="COUNT",
                FilterExpression="resource_class = :c", ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues={":s": {"S": State.IDLE.value}, ":c": {"S": resource_class}}):
            total += int(page.get("Count", 0))
    return total


def all_records(pool: Pool) -> list[InstanceRecord]:
    """Every instance row (consistent Scan, every page)."""
    items = _paginate(pool, "scan", ConsistentRead=True, FilterExpression="sk = :s",
                      ExpressionAttributeValues={":s": {"S": STATE_SK}})
    return list(_readable(pool.table, items, InstanceRecord.from_item))


def all_agents(pool: Pool) -> dict[str, AgentRecord]:
    items = _paginate(pool, "scan", ConsistentRead=True, FilterExpression="sk = :s",
                      ExpressionAttributeValues={":s": {"S": AGENT_SK}})
    return {instance_id_of(a.arn): a for a in _readable(pool.table, items, AgentRecord.from_item)}
