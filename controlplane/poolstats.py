"""What ``runner-pool status`` reports beyond the rows: recent provisions.

**Provisions.** Every provision that got its runners writes one item
``pk=provisions, sk=<class>#<epoch ms>#<run id>`` with how many came from the
pool and how many were created (TTL :data:`HISTORY_RETENTION_S`). The pool
hit rate of a class is ``from_pool / (from_pool + created)`` over its last
:data:`HIT_RATE_WINDOW` provisions: one Query on the table, newest first.

Spot interruptions per class come from :mod:`controlplane.interruptions`.

Neither item has ``state``, ``run_id`` or ``threshold``, so neither lands in an
index, and neither has ``sk`` ``state`` or ``agent``, so no row reader sees them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane import aws
from controlplane.config import PoolConfig
from controlplane.errors import AwsError
from controlplane.logs import event
from controlplane.records import num

PROVISIONS_PK = "provisions"
HIT_RATE_WINDOW = 20
HISTORY_RETENTION_S = 7 * 86400


@dataclass(frozen=True)
class HitRate:
    provisions: int            # how many provisions it is computed over (<= HIT_RATE_WINDOW)
    from_pool: int
    created: int

    @property
    def rate(self) -> float | None:
        total = self.from_pool + self.created
        return round(self.from_pool / total, 3) if total else None


def record_provision(cfg: PoolConfig, resource_class: str, run_id: str, from_pool: int, created: int,
                     now: float) -> None:
    """Best effort: a provision that got its runners, for the hit rate (status only)."""
    try:
        with aws.mapped("dynamodb:PutItem provision history"):
            aws.client("dynamodb", cfg.region).put_item(TableName=cfg.table_name, Item={
                "pk": {"S": PROVISIONS_PK}, "sk": {"S": f"{resource_class}#{int(now * 1000):015d}#{run_id}"},
                "from_pool": {"N": str(from_pool)}, "created": {"N": str(created)}, "at": num(now),
                "expires_at": num(now + HISTORY_RETENTION_S)})
    except AwsError as exc:                        # the run has its runners; only status loses a data point
        event("poolstats.record_failed", run_id=run_id, error=str(exc))


def hit_rate(cfg: PoolConfig, resource_class: str, window: int = HIT_RATE_WINDOW) -> HitRate:
    """The class's last ``window`` provisions (one Query, newest first)."""
    ddb = aws.client("dynamodb", cfg.region)
    with aws.mapped("dynamodb:Query provision history"):
        resp = ddb.query(TableName=cfg.table_name, KeyConditionExpression="pk = :p AND begins_with(sk, :c)",
                         ExpressionAttributeValues={":p": {"S": PROVISIONS_PK}, ":c": {"S": f"{resource_class}#"}},
                         ScanIndexForward=False, Limit=window, ConsistentRead=True)
    items: list[dict[str, Any]] = resp.get("Items", [])
    return HitRate(len(items), sum(int(i["from_pool"]["N"]) for i in items),
                   sum(int(i["created"]["N"]) for i in items))
