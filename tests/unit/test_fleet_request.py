"""The CreateFleet request a provision sends, built from plain config: no emulator, no AWS."""
from __future__ import annotations

from typing import Any

import pytest

from controlplane.config import parse_config
from controlplane.provision.creation import fleet_request, instance_requirements
from controlplane.store import Pool

SUBNETS = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2", "subnet-0ccccccccccccccc3"]


def pool(**classes: dict[str, Any]) -> Pool:
    cfg = parse_config({
        "name": "unit", "github": {"repository": "octo/repo"}, "subnets": SUBNETS,
        "ami": "ami-0123456789abcdef0", "instance_profile": "runner",
        "resource_classes": classes or {"small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096},
                                                  "instance_types": ["c*", "m*"]}},
    })
    return Pool(cfg, "123456789012", "aws")


def test_every_subnet_is_one_override_carrying_the_classes_requirements() -> None:
    p = pool()
    req = fleet_request(p, "run-1", "small", 3, "spot", attempt=0)
    (config,) = req["LaunchTemplateConfigs"]
    assert [o["SubnetId"] for o in config["Overrides"]] == SUBNETS
    expected = instance_requirements(p.config.resource_class("small"))
    assert all(o["InstanceRequirements"] == expected for o in config["Overrides"])
    assert config["LaunchTemplateSpecification"] == {"LaunchTemplateName": p.config.launch_template_name,
                                                     "Version": "$Default"}
    assert req["Type"] == "instant"


@pytest.mark.parametrize(("usage", "capacity_key", "options_key", "strategy"), [
    ("spot", "SpotTargetCapacity", "SpotOptions", "price-capacity-optimized"),
    ("on-demand", "OnDemandTargetCapacity", "OnDemandOptions", "lowest-price"),
])
def test_the_usage_class_picks_the_capacity_field_and_allocation_strategy(
        usage: str, capacity_key: str, options_key: str, strategy: str) -> None:
    req = fleet_request(pool(), "run-1", "small", 4, usage, attempt=0)
    assert req["TargetCapacitySpecification"] == {"TotalTargetCapacity": 4, "DefaultTargetCapacityType": usage,
                                                  capacity_key: 4}
    assert req[options_key] == {"AllocationStrategy": strategy}
    other = "OnDemandOptions" if options_key == "SpotOptions" else "SpotOptions"
    assert other not in req


def test_instances_and_the_fleet_are_tagged_with_pool_run_and_class() -> None:
    req = fleet_request(pool(), "run-7", "small", 1, "spot", attempt=0)
    tags = {"runner-pool:pool": "unit", "runner-pool:run-id": "run-7", "runner-pool:class": "small"}
    for spec in req["TagSpecifications"]:
        assert {t["Key"]: t["Value"] for t in spec["Tags"]} == tags
    assert sorted(s["ResourceType"] for s in req["TagSpecifications"]) == ["fleet", "instance"]


def test_the_client_token_repeats_for_a_retry_and_differs_per_attempt_usage_and_run() -> None:
    p = pool()
    token = fleet_request(p, "run-1", "small", 2, "spot", attempt=0)["ClientToken"]
    assert fleet_request(p, "run-1", "small", 2, "spot", attempt=0)["ClientToken"] == token   # idempotent retry
    others = {fleet_request(p, "run-1", "small", 2, "spot", attempt=1)["ClientToken"],
              fleet_request(p, "run-1", "small", 2, "on-demand", attempt=0)["ClientToken"],
              fleet_request(p, "run-2", "small", 2, "spot", attempt=0)["ClientToken"],
              fleet_request(p, "run-1", "small", 2, "spot", attempt=0, nonce="x")["ClientToken"]}
    assert token not in others and len(others) == 4
    assert len(token) <= 64                        # EC2's limit for ClientToken


def test_requirements_map_ranges_types_and_burstable_from_the_resource_class() -> None:
    p = pool(build={"vcpu": {"min": 4, "max": 8}, "memory_mib": {"min": 8192}, "instance_types": ["c7i.*"],
                    "burstable": True})
    assert instance_requirements(p.config.resource_class("build")) == {
        "VCpuCount": {"Min": 4, "Max": 8},
        "MemoryMiB": {"Min": 8192},                # no max: EC2 takes any size above the min
        "AllowedInstanceTypes": ["c7i.*"],
        "BurstablePerformance": "included",
    }


def test_accelerators_become_count_types_and_manufacturers() -> None:
    p = pool(gpu={"vcpu": {"min": 4}, "memory_mib": {"min": 16384},
                  "accelerators": {"count": {"min": 1, "max": 1}, "types": ["gpu"], "manufacturers": ["nvidia"]}})
    req = instance_requirements(p.config.resource_class("gpu"))
    assert req["AcceleratorCount"] == {"Min": 1, "Max": 1}
    assert req["AcceleratorTypes"] == ["gpu"] and req["AcceleratorManufacturers"] == ["nvidia"]
    assert req["BurstablePerformance"] == "excluded" and req["VCpuCount"] == {"Min": 4}
