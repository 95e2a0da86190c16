"""Creation: one CreateFleet ``instant`` call for what the pool could not give.

Input: how many runners are still missing, the resource class, the usage
class. Output: the launched instances (each already recorded as ``created``
in the table), CreateFleet's per-override errors by code, and how many fleet
calls were made.

The request uses the launch template's default version, one override per
subnet, each carrying the class's attribute-based ``InstanceRequirements``
(vCPU and memory ranges, allowed type patterns, burstable excluded unless
allowed, accelerators if any). Spot uses ``price-capacity-optimized``. With
``Type=instant`` EC2 answers at once: instances it could launch, and
``Errors`` for overrides it could not fill. A spot shortfall is retried once
as on-demand when the pool allows fallback (the reference had none).

Rows are written right after each CreateFleet response, before anything
else: an instance is untracked only for the milliseconds of that write, and
``reconcile`` terminates tagged instances with no row after a grace period.
The ClientToken is derived from the run id, the attempt and a nonce drawn
once per ``create`` call: botocore's retries of one call resend the same
token, so a retried call cannot launch a second fleet on real EC2, while a
later provision of the same run id (after its release) gets a fleet of its
own. Without the nonce EC2 answered that provision with the first fleet's
instances, long gone, and it waited out its validation timeout.
"""
from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, store
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.config import ResourceClass
from controlplane.logs import event
from controlplane.provision.attempt import Touched
from controlplane.records import LaunchedInstance, Member
from controlplane.store import Pool


@dataclass(frozen=True)
class CreationResult:
    members: list[Member] = field(default_factory=list)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    fleet_calls: int = 0
    shortfall: int = 0
    fell_back: bool = False
    requested: int = 0                  # how many this phase was asked for


def instance_requirements(rc: ResourceClass) -> dict[str, Any]:
    req: dict[str, Any] = {
        "VCpuCount": {"Min": rc.vcpu.min, **({"Max": rc.vcpu.max} if rc.vcpu.max is not None else {})},
        "MemoryMiB": {"Min": rc.memory_mib.min, **({"Max": rc.memory_mib.max} if rc.memory_mib.max is not None else {})},
        "AllowedInstanceTypes": list(rc.instance_types),
        "BurstablePerformance": "included" if rc.burstable else "excluded",
    }
    if rc.accelerators is not None:
        acc = rc.accelerators
        req["AcceleratorCount"] = {"Min": acc.count.min,
                                   **({"Max": acc.count.max} if acc.count.max is not None else {})}
        req["AcceleratorTypes"] = list(acc.types)
        if acc.manufacturers:
            req["AcceleratorManufacturers"] = list(acc.manufacturers)
    return req


def fleet_request(pool: Pool, run_id: str, resource_class: str, count: int, usage_class: str,
                  attempt: int, nonce: str = "") -> dict[str, Any]:
    cfg = pool.config
    req = instance_requirements(cfg.resource_class(resource_class))
    tcs: dict[str, Any] = {"TotalTargetCapacity": count, "DefaultTargetCapacityType": usage_class}
    tcs["SpotTargetCapacity" if usage_class == "spot" else "OnDemandTargetCapacity"] = count
    tags = [{"Key": "runner-pool:pool", "Value": cfg.name}, {"Key": "runner-pool:run-id", "Value": run_id},
            {"Key": "runner-pool:class", "Value": resource_class}]
    token = hashlib.sha256(f"{cfg.name}:{run_id}:{attempt}:{usage_class}:{nonce}".encode()).hexdigest()[:32]
    request: dict[str, Any] = {
        "Type": "instant",
        "ClientToken": token,
        "LaunchTemplateConfigs": [{
            "LaunchTemplateSpecification": {"LaunchTemplateName": cfg.launch_template_name, "Version": "$Default"},
            "Overrides": [{"SubnetId": s, "InstanceRequirements": req} for s in cfg.subnets],
        }],
        "TargetCapacitySpecification": tcs,
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                              {"ResourceType": "fleet", "Tags": tags}],
    }
    if usage_class == "spot":
        request["SpotOptions"] = {"AllocationStrategy": "price-capacity-optimized"}
    else:
        request["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
    return request


def _launch(pool: Pool, request: dict[str, Any], usage_class: str) -> tuple[list[LaunchedInstance], Counter[str]]:
    ec2 = aws.fleet_client(pool.region)
    with aws.mapped("ec2:CreateFleet", hint="check the launch template, subnets and EC2 quotas"):
        resp = ec2.create_fleet(**request)
    launched = []
    for entry in resp.get("Instances", []):       # EC2 groups ids per type/override; moto lists one per id
        override = (entry.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
        for iid in entry.get("InstanceIds", []):
            launched.append(LaunchedInstance(iid, entry.get("InstanceType", "unknown"), override.get("SubnetId", ""),
                                             entry.get("Lifecycle", usage_class), override.get("AvailabilityZone", "")))
    errors: Counter[str] = Counter(e.get("ErrorCode", "Unknown") for e in resp.get("Errors", []))
    return launched, errors


def create(pool: Pool, run_id: str, resource_class: str, count: int, usage_class: str,
           clock: Clock = SYSTEM_CLOCK, touched: Touched | None = None,
           registration: dict[str, str] | None = None) -> CreationResult:
    """Launch ``count`` instances; ``touched`` learns their ids as soon as EC2 returns them.

    ``registration`` goes into every ``created`` row with the row itself (no extra write): what
    each agent registers with (see :data:`controlplane.records.REGISTRATION_ATTRIBUTES`).
    """
    if count <= 0:
        return CreationResult()
    members: list[Member] = []
    fleet_calls = 0
    fell_back = False
    cfg = pool.config
    attempts = [usage_class]
    if usage_class == "spot" and cfg.spot_fallback:
        attempts.append("on-demand")
    errors: Counter[str] = Counter()
    missing = count
    nonce = uuid.uuid4().hex
    for attempt, lifecycle in enumerate(attempts):
        if missing <= 0:
            break
        request = fleet_request(pool, run_id, resource_class, missing, lifecycle, attempt, nonce)
        launched, errs = _launch(pool, request, lifecycle)
        fleet_calls += 1
        errors.update(errs)
        if touched is not None:
            touched.add(li.instance_id for li in launched)
        if launched:
            now = clock.now()
            # A failed write raises: the caller's emergency path terminates what ``touched`` holds.
            records = store.put_created(pool, launched, run_id, resource_class,
                                        threshold=now + cfg.claim_timeout_s, now=now, registration=registration)
            members.extend(Member(r.instance_id, r.arn, "created", r.instance_type, r.subnet_id,
                                      r.usage_class, resource_class) for r in records)
        missing -= len(launched)
        fell_back = fell_back or attempt > 0
        event("creation.fleet", run_id=run_id, usage_class=lifecycle, requested=missing + len(launched),
              launched=[li.instance_id for li in launched], errors=dict(errs))
    return CreationResult(members, dict(errors), fleet_calls, max(0, missing), fell_back, count)
