"""Records inside the control plane, and the table's wire format in one place.

Frozen dataclasses, not pydantic: these never cross a trust boundary. Each
record knows how to read itself from a DynamoDB item (``from_item``) and, for
the control plane's own rows, how to write one (``to_item``), so attribute
names and types appear nowhere else. Times are epoch seconds.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

_des = TypeDeserializer()
_ser = TypeSerializer()

STATE_SK = "state"
AGENT_SK = "agent"
POOL_PK = "pool"
AGENT_PREFIX = "agent#"

# The table's key attributes: every request names them (AWS wants them in a dynamodb:Attributes list).
KEY_ATTRIBUTES: tuple[str, ...] = ("pk", "sk")
# The attributes an instance may write to its own agent row -- the one list: the instance policy's
# dynamodb:Attributes condition is built from it, and a unit test checks that the agent
# (controlplane/agent/agent.py, which cannot import this package) writes nothing else. None of them
# is a key of the table's indexes (run_id, state, threshold), so no agent write lands in an index.
AGENT_ATTRIBUTES: tuple[str, ...] = (
    "heartbeat_at", "signal", "signal_at", "signal_run", "runner_name", "runner_id", "detail", "instance_id",
    "expires_at",
)


class State(str, enum.Enum):
    CREATED = "created"
    IDLE = "idle"
    CLAIMED = "claimed"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    TERMINATED = "terminated"

    def __str__(self) -> str:
        return self.value


LIVE_STATES = (State.CREATED, State.IDLE, State.CLAIMED, State.RUNNING, State.DRAINING, State.STOPPED)


class Signal(str, enum.Enum):
    """What an agent last reported (attribute ``signal`` of its agent row)."""

    BOOTING = "booting"
    WAITING = "waiting"
    REGISTERED = "registered"
    DEREGISTERED = "deregistered"
    REGISTRATION_FAILED = "registration_failed"
    PRERUNNER_FAILED = "prerunner_failed"
    SHUTDOWN = "shutdown"
    INTERRUPTED = "interrupted"       # a spot interruption notice or rebalance recommendation: runner stopped

    def __str__(self) -> str:
        return self.value


FAILURE_SIGNALS = frozenset({Signal.REGISTRATION_FAILED, Signal.PRERUNNER_FAILED, Signal.SHUTDOWN,
                             Signal.INTERRUPTED})

# State-row attributes that carry what one agent needs to register one runner: the pool's
# registration token (reused mode) or a just-in-time runner config (ephemeral mode). The control
# plane sets one of them only on a ``created`` or ``claimed`` row, and every transition out of
# those states removes both (controlplane.state.transition), so no row past commit or rollback
# holds one. Only the instance itself can read its state row.
REGISTRATION_TOKEN = "registration_token"
JIT_CONFIG = "jit_config"
REGISTRATION_ATTRIBUTES = (REGISTRATION_TOKEN, JIT_CONFIG)


class UnreadableRow(ValueError):
    """An item that is not a row this version can read (junk an instance planted, a half-written row).

    Raised by ``from_item``; readers in :mod:`controlplane.store` skip, log and count such rows
    instead of failing the whole operation.
    """

    def __init__(self, pk: str, sk: str, reason: str) -> None:
        super().__init__(f"row pk={pk!r} sk={sk!r}: {reason}")
        self.pk, self.sk, self.reason = pk, sk, reason


def _key_of(item: dict[str, Any]) -> tuple[str, str]:
    def text(name: str) -> str:
        v = item.get(name)
        return str(v.get("S", v)) if isinstance(v, dict) else str(v)
    return text("pk"), text("sk")


def _readable(kind: str, sk: str, item: dict[str, Any], read: Any) -> Any:
    """``read(plain(item))``, with every way a foreign item can fail turned into :class:`UnreadableRow`."""
    pk, got_sk = _key_of(item)
    if got_sk != sk:
        raise UnreadableRow(pk, got_sk, f"not a {kind} row (sk is not {sk!r})")
    try:
        return read(plain(item))
    except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError) as exc:
        raise UnreadableRow(pk, got_sk, f"unreadable {kind} row: {type(exc).__name__}: {exc}") from exc


def _num(v: Any) -> float:
    """A finite number, as DynamoDB's N type holds it (a string, a bool or NaN is junk)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{v!r} is not a number")
    return float(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else _num(v)


def _opt_text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v or None
    raise TypeError(f"{v!r} is not a string")


def instance_arn(partition: str, region: str, account: str, instance_id: str) -> str:
    return f"arn:{partition}:ec2:{region}:{account}:instance/{instance_id}"


def instance_id_of(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def agent_pk(arn: str) -> str:
    return AGENT_PREFIX + arn


def plain(item: dict[str, Any]) -> dict[str, Any]:
    """DynamoDB AttributeValue map -> Python values (Decimals become int/float)."""
    out: dict[str, Any] = {}
    for k, v in item.items():
        val = _des.deserialize(v)
        if isinstance(val, Decimal):
            val = int(val) if val == val.to_integral_value() else float(val)
        out[k] = val
    return out


def wire(values: dict[str, Any]) -> dict[str, Any]:
    """Python values -> DynamoDB AttributeValue map (floats go through Decimal)."""
    out = {}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, float):
            v = Decimal(repr(round(v, 3)))
        out[k] = _ser.serialize(v)
    return out


def num(v: float) -> dict[str, str]:
    return {"N": repr(round(float(v), 3))}


@dataclass(frozen=True)
class InstanceRecord:
    """The control plane's view of one instance (item ``pk=<arn>, sk=state``)."""

    arn: str
    state: State
    threshold: float
    resource_class: str
    instance_type: str
    usage_class: str
    subnet_id: str
    launched_at: float
    run_id: str | None = None
    last_run_id: str | None = None
    reuse_count: int = 0
    version: int = 1
    updated_at: float = 0.0
    expires_at: float | None = None
    availability_zone: str = ""

    @property
    def instance_id(self) -> str:
        return instance_id_of(self.arn)

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> InstanceRecord:
        """The record of a state row; :class:`UnreadableRow` for anything else."""
        def read(v: dict[str, Any]) -> InstanceRecord:
            if not str(v["pk"]).startswith("arn:"):
                raise ValueError("pk is not an instance ARN")
            return cls(
                arn=v["pk"], state=State(v["state"]), threshold=_num(v["threshold"]),
                resource_class=str(v.get("resource_class", "")), instance_type=str(v.get("instance_type", "")),
                usage_class=str(v.get("usage_class", "")), subnet_id=str(v.get("subnet_id", "")),
                launched_at=_num(v.get("launched_at", 0)), run_id=_opt_text(v.get("run_id")),
                last_run_id=_opt_text(v.get("last_run_id")), reuse_count=int(_num(v.get("reuse_count", 0))),
                version=int(_num(v.get("version", 1))), updated_at=_num(v.get("updated_at", 0)),
                expires_at=_opt_float(v.get("expires_at")),
                availability_zone=str(v.get("availability_zone", "")),
            )
        return _readable("state", STATE_SK, item, read)  # type: ignore[no-any-return]

    def to_item(self) -> dict[str, Any]:
        return wire({
            "pk": self.arn, "sk": STATE_SK, "instance_id": self.instance_id, "state": self.state.value,
            "threshold": float(self.threshold), "resource_class": self.resource_class,
            "instance_type": self.instance_type, "usage_class": self.usage_class, "subnet_id": self.subnet_id,
            "launched_at": float(self.launched_at), "run_id": self.run_id, "last_run_id": self.last_run_id,
            "reuse_count": self.reuse_count, "version": self.version, "updated_at": float(self.updated_at),
            "expires_at": self.expires_at, "availability_zone": self.availability_zone or None,
        })

    def is_expired(self, now: float) -> bool:
        return self.threshold < now


@dataclass(frozen=True)
class AgentRecord:
    """What an instance's agent reports (item ``pk=agent#<arn>, sk=agent``)."""

    arn: str
    heartbeat_at: float | None = None
    signal: Signal | None = None
    signal_run: str | None = None
    signal_at: float | None = None
    runner_name: str | None = None
    detail: str | None = None
    runner_id: int | None = None          # GitHub's id of the runner named runner_name (agent-reported)

    @property
    def instance_id(self) -> str:
        return instance_id_of(self.arn)

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> AgentRecord:
        """The record of an agent row; :class:`UnreadableRow` for anything else.

        An unknown ``signal`` reads as no signal (a newer agent may know more); a heartbeat or a
        time that is not a number makes the row unreadable.
        """
        def read(v: dict[str, Any]) -> AgentRecord:
            sig = v.get("signal")
            try:
                signal = Signal(sig) if sig else None
            except ValueError:
                signal = None
            if not str(v["pk"]).startswith(AGENT_PREFIX + "arn:"):
                raise ValueError("pk is not agent#<instance ARN>")
            return cls(
                arn=v["pk"].removeprefix(AGENT_PREFIX),
                heartbeat_at=_opt_float(v.get("heartbeat_at")),
                signal=signal, signal_run=_opt_text(v.get("signal_run")),
                signal_at=_opt_float(v.get("signal_at")),
                runner_name=_opt_text(v.get("runner_name")), detail=_opt_text(v.get("detail")),
                runner_id=_runner_id(v.get("runner_id")),
            )
        return _readable("agent", AGENT_SK, item, read)  # type: ignore[no-any-return]

    def heartbeat_age(self, now: float) -> float | None:
        return None if self.heartbeat_at is None else max(0.0, now - self.heartbeat_at)

    def is_healthy(self, now: float, stale_s: float) -> bool:
        age = self.heartbeat_age(now)
        return age is not None and age <= stale_s

    @property
    def holds_runner(self) -> bool:
        """The agent reports a registered runner (with relabelling it stays registered across runs)."""
        return self.signal == Signal.REGISTERED and self.runner_id is not None and bool(self.runner_name)

    def registered_for(self, run_id: str) -> bool:
        return self.signal == Signal.REGISTERED and self.signal_run == run_id

    def deregistered_from(self, run_id: str) -> bool:
        return self.signal in (Signal.DEREGISTERED, Signal.WAITING) and self.signal_run == run_id

    @property
    def interrupted(self) -> bool:
        """EC2 announced it will reclaim this (spot) instance: it takes no more jobs."""
        return self.signal == Signal.INTERRUPTED

    def failed_for(self, run_id: str) -> bool:
        if self.signal in (Signal.PRERUNNER_FAILED, Signal.SHUTDOWN, Signal.INTERRUPTED):
            return True
        return self.signal == Signal.REGISTRATION_FAILED and self.signal_run == run_id


def _runner_id(value: Any) -> int | None:
    """The agent writes it, so it may be anything: a positive int or nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


@dataclass(frozen=True)
class LaunchedInstance:
    """One instance as CreateFleet reported it."""

    instance_id: str
    instance_type: str
    subnet_id: str
    usage_class: str
    availability_zone: str = ""


@dataclass(frozen=True)
class Member:
    """An instance in a provision's set, and where it came from."""

    instance_id: str
    arn: str
    source: str                       # "pool" (idle runner), "stopped" (started for this run) or "created"
    instance_type: str
    subnet_id: str
    usage_class: str
    resource_class: str
    receipt: str | None = field(default=None, compare=False)
    started_at: float | None = None   # "stopped": when StartInstances was asked; older agent rows are its last boot
