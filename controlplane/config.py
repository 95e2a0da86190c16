"""Pool configuration: every input of a pool, typed, with its default.

One model, :class:`PoolConfig`, is loaded from a YAML file (``pool.yaml``), from
Pulumi stack config (camelCase keys are accepted everywhere) or from the copy
``pool apply`` stores in the state table. All defaults live here and only here;
the README's configuration reference is generated from this module.

Defaults follow the reference implementation (idle 420 s, validation 180 s,
heartbeat 5 s, running threshold 30 min, claim 5 min, deregistration wait
120 s); where the reference had none (reuse cap, lifetime cap) we follow the
peers (20 reuses as namecheap's fork, 24 h lifetime).

Validation errors come out one line per problem: the field path, the bad value
and what is allowed. :func:`load_config` raises :class:`ConfigErrors` with all
of them so ``runner-pool config check`` can print every problem at once.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from controlplane.errors import ConfigError, ConfigErrors
from controlplane.patterns import CLASS_RE as CLASS_RE
from controlplane.patterns import NAME_RE as NAME_RE
from controlplane.patterns import REGION_RE as REGION_RE
from controlplane.patterns import RUN_ID_RE as RUN_ID_RE
from controlplane.patterns import USAGE_CLASSES as USAGE_CLASSES

UsageClass = Literal["spot", "on-demand"]

INSTANCE_TYPE_PATTERN_RE = re.compile(r"^[a-z0-9*.-]+$")
USER_DATA_LIMIT_BYTES = 16 * 1024
AMI_RE = r"^ami-[0-9a-f]{8,17}$"
Architecture = Literal["x86_64", "arm64"]
# Graviton families have a 'g' right after the generation digit (c7g, m7gd, t4g, im4gn) or are a1.
GRAVITON_FAMILY_RE = re.compile(r"(^a1$)|([0-9*]g)")
ARM64_INSTANCE_TYPES = ["c*g*.*", "m*g*.*", "r*g*.*"]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic takes true as 1 for an int: `max_reuse: true` would quietly mean one reuse.
        ann = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(v, bool) and (ann is int or ann == (int | None)):
            raise ValueError("expected a whole number, not true or false")
        return v


class Range(_Model):
    """An inclusive integer range; ``max`` omitted means no upper bound."""

    min: int = Field(ge=0, description="lower bound (inclusive)")
    max: int | None = Field(default=None, ge=0, description="upper bound (inclusive); omit for none")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


AcceleratorType = Literal["gpu", "fpga", "inference"]


def _default_accelerators() -> list[AcceleratorType]:
    return ["gpu"]


class Accelerators(_Model):
    """Accelerator requirements (GPU/FPGA/inference), passed to InstanceRequirements."""

    count: Range = Field(description="number of accelerators")
    types: list[AcceleratorType] = Field(default_factory=_default_accelerators)
    manufacturers: list[Literal["nvidia", "amd", "amazon-web-services", "xilinx"]] = Field(default_factory=list)


WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WORKING_DAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri")
CLOCK_TIME_RE = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
# EC2 tag keys: up to 128 characters of letters, digits, spaces and _ . : / = + - @
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9 _.:/=+\-@]{1,128}$")


class WarmSchedule(_Model):
    """When a class's ``min_idle`` applies: days and hours in a time zone; outside it the minimum is 0."""

    timezone: str = Field(default="UTC", description="IANA time zone of start and end, e.g. Europe/Berlin")
    days: list[Weekday] = Field(default_factory=lambda: list(WORKING_DAYS),
                                description="weekdays the window opens on (mon ... sun)")
    start: str = Field(default="08:00", pattern=CLOCK_TIME_RE, description="local time the window opens, HH:MM")
    end: str = Field(default="18:00", pattern=CLOCK_TIME_RE,
                     description="local time it closes, HH:MM (before start: the window ends the next day)")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as UTC or Europe/Berlin") from None
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one day is required, e.g. [mon, tue, wed, thu, fri]")
        return v

    @model_validator(mode="after")
    def _window(self) -> WarmSchedule:
        if self.start == self.end:
            raise ValueError(f"start and end are both {self.start}: the window would be empty")
        return self

    def is_open(self, epoch_s: float) -> bool:
        """Whether ``epoch_s`` falls in a window (one opening on a listed day, at ``start``)."""
        from datetime import datetime, timedelta
        from zoneinfo import ZoneInfo

        local = datetime.fromtimestamp(epoch_s, ZoneInfo(self.timezone))
        start = tuple(int(x) for x in self.start.split(":"))
        end = tuple(int(x) for x in self.end.split(":"))
        now = (local.hour, local.minute)
        if start < end:
            return WEEKDAYS[local.weekday()] in self.days and start <= now < end
        # overnight window: open from start on a listed day until end the day after
        if now >= start:
            return WEEKDAYS[local.weekday()] in self.days
        yesterday = (local - timedelta(days=1)).weekday()
        return now < end and WEEKDAYS[yesterday] in self.days


class ResourceClass(_Model):
    """What a runner of this class needs; EC2 picks any instance type that fits."""

    vcpu: Range = Field(description="vCPU count range, e.g. {min: 4, max: 4}")
    memory_mib: Range = Field(description="memory range in MiB, e.g. {min: 8192}")
    instance_types: list[str] = Field(
        default_factory=lambda: ["c*", "m*", "r*"],
        description="allowed instance-type patterns (AllowedInstanceTypes), e.g. ['c7i.*', 'm*']",
    )
    burstable: bool = Field(default=False, description="allow burstable (t*) types")
    accelerators: Accelerators | None = Field(default=None, description="optional accelerator requirements")
    ephemeral: bool | None = Field(
        default=None, description="one job per instance, never reused (just-in-time runners); unset: the pool's")
    # -- pool controls: warm minimum and ceiling (docs/configuration.md "Pool controls")
    min_idle: int = Field(default=0, ge=0, le=1000,
                          description="warm minimum: refresh keeps at least this many idle runners of the class")
    min_idle_schedule: WarmSchedule | None = Field(
        default=None, description="when min_idle applies (days, hours, time zone); outside it the minimum is 0; "
                                  "unset: always")
    max_instances: int | None = Field(
        default=None, ge=1, le=100_000,
        description="ceiling: live instances of the class (idle, claimed, running, ...); a provision that "
                    "would pass it fails before any claim or launch")

    @model_validator(mode="after")
    def _warm_under_ceiling(self) -> ResourceClass:
        if self.max_instances is not None and self.min_idle > self.max_instances:
            raise ValueError(f"min_idle ({self.min_idle}) must be <= max_instances ({self.max_instances})")
        return self

    def min_idle_at(self, epoch_s: float) -> int:
        """The warm minimum in force at ``epoch_s`` (0 outside the schedule's window)."""
        if self.min_idle and self.min_idle_schedule is not None and not self.min_idle_schedule.is_open(epoch_s):
            return 0
        return self.min_idle

    # -- the stopped tier and the class's own image (issue 17 part B) --
    stopped_time_s: int | None = Field(
        default=None, ge=60, le=30 * 86400,
        description="stop an idle runner past idle_time_s instead of terminating it, and terminate it after "
                    "this long stopped (it costs only its volume meanwhile); unset: no stopped tier")
    ami: str | None = Field(default=None, pattern=AMI_RE,
                            description="this class's own AMI (its own launch template); unset: the pool's ami")
    architecture: Architecture = Field(
        default="x86_64", description="the AMI's architecture; arm64 admits only Graviton types (c7g, m7g, ...)")

    @model_validator(mode="before")
    @classmethod
    def _arm64_default_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("architecture") == "arm64" \
                and "instance_types" not in data and "instanceTypes" not in data:
            return {**data, "instance_types": list(ARM64_INSTANCE_TYPES)}
        return data

    @model_validator(mode="after")
    def _types_fit_architecture(self) -> ResourceClass:
        if self.architecture == "arm64":
            bad = [p for p in self.instance_types if not GRAVITON_FAMILY_RE.search(p.split(".", 1)[0])]
            if bad:
                raise ValueError(f"instance_types {bad} are not Graviton families, which an arm64 class needs "
                                 f"(e.g. {ARM64_INSTANCE_TYPES})")
        return self

    @field_validator("vcpu")
    @classmethod
    def _vcpu_positive(cls, v: Range) -> Range:
        if v.min < 1:
            raise ValueError(f"vcpu.min must be >= 1, got {v.min}")
        return v

    @field_validator("memory_mib")
    @classmethod
    def _memory_positive(cls, v: Range) -> Range:
        if v.min < 512:
            raise ValueError(f"memory_mib.min must be >= 512, got {v.min}")
        return v

    @field_validator("instance_types")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one pattern is required, e.g. ['c*', 'm*']")
        if len(v) > 400:
            raise ValueError("at most 400 patterns (EC2's AllowedInstanceTypes limit)")
        bad = [p for p in v if not INSTANCE_TYPE_PATTERN_RE.match(p)]
        if bad:
            raise ValueError(f"invalid pattern(s) {bad}: use lowercase letters, digits, '.', '-' and '*'")
        return v


class GitHubConfig(_Model):
    """Where runners register: one repository or one organization."""

    repository: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", description="owner/repo for repository runners",
    )
    organization: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]+$", description="organization for org runners",
    )
    url: str = Field(default="https://github.com", pattern=r"^https?://", description="web URL runners register against")
    api_url: str = Field(default="https://api.github.com", pattern=r"^https?://", description="REST API base URL")
    runner_version: str = Field(default="2.329.0", pattern=r"^\d+\.\d+\.\d+$", description="actions/runner release")
    runner_sha256_x64: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                          description="checksum of the x64 runner tarball (checked when set)")
    runner_sha256_arm64: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                            description="checksum of the arm64 runner tarball (checked when set)")
    app_id: int | None = Field(default=None, ge=1,
                               description="GitHub App id: authenticate as its installation instead of a PAT "
                                           "(private key in RUNNER_POOL_GITHUB_APP_PRIVATE_KEY[_FILE])")
    app_installation_id: int | None = Field(default=None, ge=1,
                                            description="the App's installation id on the repository or org")
    runner_group_id: int = Field(default=1, ge=1,
                                 description="runner group of just-in-time runners (1: Default; org pools: the "
                                             "pool's own group)")

    @model_validator(mode="after")
    def _one_scope(self) -> GitHubConfig:
        if (self.repository is None) == (self.organization is None):
            raise ValueError("set exactly one of github.repository (owner/repo) or github.organization")
        return self

    @model_validator(mode="after")
    def _app_pair(self) -> GitHubConfig:
        if (self.app_id is None) != (self.app_installation_id is None):
            raise ValueError("set both github.app_id and github.app_installation_id, or neither")
        return self

    @property
    def scope(self) -> str:
        return self.repository or self.organization or ""


class SpotBreaker(_Model):
    """After ``interruptions`` spot interruptions in a class within ``window_s``, that class creates
    on-demand for ``cooldown_s`` (a circuit breaker)."""

    interruptions: int = Field(default=3, ge=1, le=1000, description="interruptions that open the breaker")
    window_s: int = Field(default=3600, ge=60, le=7 * 86400, description="window they are counted in")
    cooldown_s: int = Field(default=1800, ge=60, le=7 * 86400,
                            description="how long new creations in the class go on-demand")


class PoolConfig(_Model):
    """A pool: its table, one queue per resource class, a launch template, a token."""

    name: str = Field(pattern=NAME_RE, description="pool name: lowercase letters, digits, '-' (max 30)")
    region: str = Field(default="us-east-1", pattern=REGION_RE, description="AWS region, e.g. us-east-1")
    github: GitHubConfig = Field(description="GitHub repository or organization")
    resource_classes: dict[str, ResourceClass] = Field(description="resource classes by name (one queue each)")
    subnets: list[str] = Field(description="subnet ids; CreateFleet gets one override per subnet")
    ami: str = Field(pattern=AMI_RE, description="AMI id like ami-0abc12345 (Amazon Linux 2023 or Ubuntu 22.04+)")
    security_groups: list[str] = Field(default_factory=list, description="security group ids")
    instance_profile: str = Field(pattern=r"^[\w+=,.@-]{1,128}$", description="IAM instance profile name")
    usage_class: UsageClass = Field(default="on-demand", description="default usage class of created instances")
    spot_fallback: bool = Field(default=True, description="on a spot shortfall, create the rest on-demand")
    ephemeral: bool = Field(default=False,
                            description="every runner takes one job from a just-in-time config and its instance "
                                        "is never reused (for untrusted code: public repositories, forks)")
    fresh_registration: bool = Field(
        default=False,
        description="every run registers its runners anew (config.sh with a new token, as before relabelling); "
                    "false: a warm hit keeps the pooled runner registered and only changes its labels")
    idle_time_s: int = Field(default=420, ge=30, le=7 * 86400, description="how long an idle runner waits in the pool")
    max_runtime_s: int = Field(default=1800, ge=60, le=7 * 86400, description="how long a run may hold its runners")
    max_reuse: int = Field(default=20, ge=0, le=10_000, description="runs an instance serves before it is terminated")
    max_lifetime_s: int = Field(default=86400, ge=600, le=30 * 86400, description="age at which an instance is retired")
    heartbeat_interval_s: int = Field(default=5, ge=1, le=60, description="agent heartbeat period")
    heartbeat_stale_s: int = Field(default=15, ge=2, le=600, description="a heartbeat older than this is unhealthy")
    validation_timeout_s: int = Field(default=180, ge=5, le=3600,
                                      description="all-or-nothing: every runner registered within this")
    claim_timeout_s: int = Field(default=300, ge=10, le=3600, description="deadline of the claimed and created states")
    deregistration_timeout_s: int = Field(default=120, ge=5, le=3600,
                                          description="wait for the agent to deregister on release")
    lost_contact_s: int = Field(default=300, ge=30, le=86400,
                                description="the agent shuts down after this long without reaching the table")
    token_refresh_margin_s: int = Field(default=1800, ge=60, le=3300,
                                        description="rotate runner tokens when less than this is left of their 1 h")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on instances and fleets")
    # -- pool controls: pool-wide ceiling, cost tags (docs/configuration.md "Pool controls")
    max_instances: int | None = Field(
        default=None, ge=1, le=100_000,
        description="ceiling: live instances of the whole pool, every class together")
    run_tag_keys: list[str] = Field(
        default_factory=lambda: ["repository", "workflow", "team"],
        description="cost tags: keys a provision may set (--tag KEY=VALUE) on its instances while they serve "
                    "its run; release removes them")
    pre_runner_script: str = Field(default="", description="bash run on each instance before the agent waits")
    runner_sudo: bool = Field(default=False, description="give the runner user (and so every job) passwordless "
                                                        "sudo, and with it the instance's identity")
    metrics_cloudwatch: bool = Field(default=False, description="publish provision/release metrics to CloudWatch")
    metrics_namespace: str = Field(default="RunnerPool", description="CloudWatch namespace")
    spot_breaker: SpotBreaker = Field(default_factory=SpotBreaker,
                                      description="spot interruptions circuit breaker, per class")

    @field_validator("resource_classes")
    @classmethod
    def _classes(cls, v: dict[str, ResourceClass]) -> dict[str, ResourceClass]:
        if not v:
            raise ValueError("at least one resource class is required, e.g. {small: {vcpu: {min: 2}, memoryMib: {min: 4096}}}")
        bad = [k for k in v if not re.match(CLASS_RE, k)]
        if bad:
            raise ValueError(f"invalid class name(s) {bad}: lowercase letters, digits and '-', max 30")
        return v

    @field_validator("subnets")
    @classmethod
    def _subnets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one subnet id is required, e.g. [subnet-0abc1234]")
        bad = [s for s in v if not re.match(r"^subnet-[0-9a-f]{8,17}$", s)]
        if bad:
            raise ValueError(f"invalid subnet id(s) {bad}: expected subnet-<8 to 17 hex digits>")
        if len(set(v)) != len(v):
            raise ValueError("subnet ids must be unique")
        return v

    @field_validator("security_groups")
    @classmethod
    def _sgs(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not re.match(r"^sg-[0-9a-f]{8,17}$", s)]
        if bad:
            raise ValueError(f"invalid security group id(s) {bad}: expected sg-<8 to 17 hex digits>")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if k.lower().startswith(("aws:", "runner-pool:"))]
        if bad:
            raise ValueError(f"tag keys {bad} are reserved (aws:, runner-pool:)")
        return v

    @field_validator("run_tag_keys")
    @classmethod
    def _run_tag_keys(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if not TAG_KEY_RE.match(k)]
        if bad:
            raise ValueError(f"invalid tag key(s) {bad}: 1-128 letters, digits, spaces and _ . : / = + - @")
        reserved = [k for k in v if k.lower().startswith(("aws:", "runner-pool:"))]
        if reserved:
            raise ValueError(f"tag keys {reserved} are reserved (aws:, runner-pool:)")
        if len(v) > 40:
            raise ValueError("at most 40 keys (EC2 allows 50 tags per resource; the pool's own use the rest)")
        if len(set(v)) != len(v):
            raise ValueError("tag keys must be unique")
        return v

    @model_validator(mode="after")
    def _controls(self) -> PoolConfig:
        for name, rc in self.resource_classes.items():
            if rc.min_idle and self.is_ephemeral(name):
                raise ValueError(f"resource_classes.{name}.min_idle: an ephemeral class is never reused, so "
                                 "it keeps no idle runners (set min_idle to 0 or ephemeral to false)")
        warm = sum(rc.min_idle for rc in self.resource_classes.values())
        if self.max_instances is not None and warm > self.max_instances:
            raise ValueError(f"max_instances ({self.max_instances}) is below the classes' min_idle together "
                             f"({warm})")
        return self

    @model_validator(mode="after")
    def _timings(self) -> PoolConfig:
        if self.heartbeat_stale_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_stale_s ({self.heartbeat_stale_s}) must be greater than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})")
        return self

    # Names derived from the pool name: one place, used by every module.
    @property
    def table_name(self) -> str:
        return f"runner-pool-{self.name}"

    def queue_name(self, resource_class: str) -> str:
        return f"runner-pool-{self.name}-{resource_class}"

    def dlq_name(self, resource_class: str) -> str:
        return f"runner-pool-{self.name}-{resource_class}-dlq"

    @property
    def launch_template_name(self) -> str:
        return f"runner-pool-{self.name}"

    def image_of(self, resource_class: str) -> str:
        """The AMI a class launches from: its own, else the pool's."""
        return self.resource_class(resource_class).ami or self.ami

    def launch_template_for(self, resource_class: str) -> str:
        """One launch template per distinct image: the pool's AMI keeps ``runner-pool-P``."""
        return self.launch_template_name_of(self.image_of(resource_class))

    def launch_template_name_of(self, image: str) -> str:
        return self.launch_template_name if image == self.ami else f"{self.launch_template_name}-{image}"

    def images(self) -> list[str]:
        """Every distinct image of the pool, the pool's own first."""
        own = [rc.ami for rc in self.resource_classes.values() if rc.ami and rc.ami != self.ami]
        return [self.ami, *sorted(set(own))]

    @property
    def token_parameter(self) -> str:
        return f"/runner-pool/{self.name}/runner-tokens"

    @property
    def pool_label(self) -> str:
        return f"runner-pool-{self.name}"

    def is_ephemeral(self, resource_class: str) -> bool:
        """Ephemeral for this class: the class's own setting, else the pool's."""
        rc = self.resource_classes.get(resource_class)
        own = rc.ephemeral if rc is not None else None
        return self.ephemeral if own is None else own

    def resource_class(self, name: str) -> ResourceClass:
        try:
            return self.resource_classes[name]
        except KeyError:
            raise ConfigError(
                f"resource class {name!r} is not in pool {self.name!r}",
                hint=f"use one of: {', '.join(sorted(self.resource_classes))}",
            ) from None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=False, exclude_none=True)


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem: ``field.path: got <value>: <what is allowed>``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
            continue
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: {_unknown_field(err['loc'])}")
            continue
        if err["type"] == "string_pattern_mismatch":
            allowed = _field_description(err["loc"])
            msg = f"not allowed; expected {allowed}" if allowed else msg
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) or not value else "{...}"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{loc}: got {shown}: {msg}")
    return lines


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """Why the key at ``loc`` is not a field: the other spelling of one given too, a near miss, or neither."""
    key, model = str(loc[-1]), _model_at(loc[:-1])
    fields = model.model_fields if model is not None else {}
    for name, f in fields.items():
        if key in (name, f.alias):          # pydantic took the other spelling and left this one over
            other = f.alias if key == name else name
            return f"given twice, also as {other} (keep one spelling)"
    spellings = [f.alias or name for name, f in fields.items()] if key != key.lower() else list(fields)
    near = difflib.get_close_matches(key, spellings, n=1, cutoff=0.6)
    if near:
        return f"unknown field (did you mean {near[0]}? see the configuration reference)"
    return "unknown field (check the spelling; see the configuration reference)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model whose fields are the keys at ``loc``; dict keys and list indexes on the way are skipped."""
    model: type[BaseModel] | None = PoolConfig
    skip = False
    for part in loc:
        if skip:
            skip = False
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None and model is not None:
            field = next((f for f in model.model_fields.values() if f.alias == str(part)), None)
        if field is None:
            return None
        ann = field.annotation
        skip = get_origin(ann) in (dict, list)
        inner = get_args(ann)[-1:] if skip else (ann, *get_args(ann))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return None if skip else model


def _field_description(loc: tuple[Any, ...]) -> str:
    """The description of the field at ``loc`` (aliases or names), walking nested models."""
    model: Any = PoolConfig
    desc = ""
    skip = False
    for part in loc:
        if skip:                  # a dict key or list index between a field and its model
            skip = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            model = None
            continue
        fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
        field = fields.get(str(part))
        if field is None:
            return desc
        desc = field.description or ""
        ann = field.annotation
        skip = get_origin(ann) in (dict, list)
        args = getattr(ann, "__args__", ()) or ()
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None and args:
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return desc


def parse_config(data: Any, source: str = "config") -> PoolConfig:
    if not isinstance(data, dict):
        raise ConfigErrors([f"{source}: expected a mapping of pool settings, got {type(data).__name__}"])
    try:
        return PoolConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigErrors(format_validation_error(exc), hint=f"fix {source}") from exc


def load_config(path: str | Path) -> PoolConfig:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory", hint="name the pool.yaml inside it")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found", hint="pass --config with a pool.yaml (see examples/pool.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})",
                          hint="save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror}",
                          hint="check that it is readable by this user") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigErrors([f"{p}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    return parse_config(data, str(p))


def with_env_overrides(cfg: PoolConfig) -> PoolConfig:
    """Point GitHub URLs at the local stand-in when ``runner-pool local env`` says so.

    ``RUNNER_POOL_GITHUB_URL`` / ``RUNNER_POOL_GITHUB_API_URL`` replace the
    config's ``github.url`` / ``github.api_url``; nothing else in a config
    changes between the embedded default and real GitHub.
    """
    import os

    url = os.environ.get("RUNNER_POOL_GITHUB_URL")
    api = os.environ.get("RUNNER_POOL_GITHUB_API_URL")
    if not url and not api:
        return cfg
    gh = cfg.github.model_copy(update={k: v for k, v in (("url", url), ("api_url", api)) if v})
    return cfg.model_copy(update={"github": gh})
