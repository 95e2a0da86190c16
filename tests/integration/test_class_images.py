"""Per-class images end to end: a class naming its own AMI (here moto's arm64 one) gets its own
launch template, launches from it only Graviton types, its runners register; refresh keeps one
template per distinct image and deletes one no class uses any more; an AMI whose architecture is
not the class's is bad input, refused before any change.
"""
from __future__ import annotations

from typing import Any

import pytest

from controlplane import aws, store
from controlplane.apply import apply_pool
from controlplane.config import GRAVITON_FAMILY_RE, parse_config
from controlplane.errors import ConfigError
from controlplane.refresh import refresh
from controlplane.release import release
from tests.conftest import Emu, pool_config_dict
from tests.integration.test_provision import online_runners, prov
from tests.reliability import invariants

ARM64_AMI = "ami-0e9271c829888680e"       # one of moto's built-in images, Architecture arm64
SMALL = {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "instance_types": ["c*", "m*"]}


def templates(cfg: Any) -> dict[str, str]:
    """The pool's launch templates in EC2: name -> ImageId of the default version."""
    ec2 = aws.client("ec2", cfg.region)
    lts = ec2.describe_launch_templates(Filters=[{"Name": "tag:runner-pool:pool", "Values": [cfg.name]}])
    out = {}
    for lt in lts["LaunchTemplates"]:
        v = ec2.describe_launch_template_versions(LaunchTemplateId=lt["LaunchTemplateId"], Versions=["$Default"])
        out[lt["LaunchTemplateName"]] = v["LaunchTemplateVersions"][0]["LaunchTemplateData"]["ImageId"]
    return out


def test_a_class_with_its_own_arm64_image_launches_graviton_types_from_its_own_template(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(resource_classes={
        "small": SMALL,
        "arm": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "ami": ARM64_AMI, "architecture": "arm64"}})
    cfg = pool.config
    arm_template = f"{cfg.launch_template_name}-{ARM64_AMI}"
    assert templates(cfg) == {cfg.launch_template_name: cfg.ami, arm_template: ARM64_AMI}

    res = prov(pool, 2, cls="arm")
    assert res.ok, res.reason
    ec2 = aws.client("ec2", cfg.region)
    instances = [i for r in ec2.describe_instances(InstanceIds=res.instance_ids)["Reservations"]
                 for i in r["Instances"]]
    assert {i["ImageId"] for i in instances} == {ARM64_AMI}
    kinds = {i["InstanceType"] for i in instances}
    assert all(GRAVITON_FAMILY_RE.search(t.split(".")[0]) for t in kinds), kinds
    fleets = [f for f in ec2.describe_fleets()["Fleets"]
              if {"Key": "runner-pool:run-id", "Value": res.run_id} in f.get("Tags", [])]
    assert [f["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["LaunchTemplateName"] for f in fleets] \
        == [arm_template]
    assert len(online_runners(emu, res.run_id)) == 2

    x86 = prov(pool, 1, cls="small")
    assert x86.ok, x86.reason
    x86_type = ec2.describe_instances(InstanceIds=x86.instance_ids)["Reservations"][0]["Instances"][0]
    assert x86_type["ImageId"] == cfg.ami and not GRAVITON_FAMILY_RE.search(x86_type["InstanceType"].split(".")[0])

    release(pool, res.run_id)
    release(pool, x86.run_id)
    without_arm = cfg.model_copy(update={"resource_classes": {"small": cfg.resource_classes["small"]}})
    refresh(without_arm, run_reconcile=False)
    assert templates(cfg) == {cfg.launch_template_name: cfg.ami}, "the image no class uses lost its template"
    invariants.check(pool, emu)


def test_an_image_of_another_architecture_than_its_class_is_refused_naming_the_field(local: Any) -> None:
    cfg = parse_config(pool_config_dict(local, resource_classes={
        "arm": {**SMALL, "instance_types": ["c*"], "ami": ARM64_AMI}}))     # architecture defaults to x86_64
    with pytest.raises(ConfigError, match=r"^resource_classes\.arm\.architecture: x86_64, but its ami "):
        apply_pool(cfg)
    assert templates(cfg) == {} and not store.table_exists(cfg), "refused before any change"
