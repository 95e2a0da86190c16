"""The pool's launch template: render it, converge it, prune old versions.

The template carries everything an instance needs except its instance type
(chosen by CreateFleet from the resource class's InstanceRequirements) and
subnet (one fleet override per subnet). It enforces IMDSv2 (``HttpTokens:
required``, hop limit 1), turns on instance tags in IMDS, and sets instance-
initiated shutdown to terminate: that is how the agent retires its instance
without any EC2 permission.

Convergence compares the rendered data with the template's current default
version *in EC2* (not a stored copy, so drift made by hand is found): a
change creates one new version and makes it the default; the template itself
is never replaced, so running instances and in-flight fleets are untouched.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from controlplane import aws
from controlplane.config import USER_DATA_LIMIT_BYTES, PoolConfig
from controlplane.errors import ConfigError

KEEP_VERSIONS = 3           # the default plus a few older ones, for instances launched from them


@dataclass(frozen=True)
class TemplateState:
    template_id: str
    name: str
    default_version: int
    latest_version: int
    data_hash: str
    changed: bool
    pruned: tuple[int, ...] = ()


def instance_tags(cfg: PoolConfig) -> dict[str, str]:
    return {**cfg.tags, "Name": f"runner-pool-{cfg.name}", "runner-pool:pool": cfg.name,
            "runner-pool:managed": "true"}


def render(cfg: PoolConfig) -> dict[str, Any]:
    """LaunchTemplateData for the pool (ConfigError if the user data is over 16 KB)."""
    from controlplane.userdata import pre_runner_room, user_data_bytes

    user_data = user_data_bytes(cfg)
    size = len(user_data)
    if size > USER_DATA_LIMIT_BYTES:
        room = pre_runner_room(cfg, USER_DATA_LIMIT_BYTES)
        raise ConfigError(
            f"pre_runner_script: {len(cfg.pre_runner_script.encode())} bytes make the user data {size} bytes "
            "gzipped, "
            f"over EC2's {USER_DATA_LIMIT_BYTES} byte limit",
            hint=(f"shorten it to at most {room} bytes" if room >= 0 else "shorten the pool's settings")
            + " or move it into the AMI")
    tags = [{"Key": k, "Value": v} for k, v in sorted(instance_tags(cfg).items())]
    data: dict[str, Any] = {
        "ImageId": cfg.ami,
        "IamInstanceProfile": {"Name": cfg.instance_profile},
        "UserData": base64.b64encode(user_data).decode(),
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled",
                            "InstanceMetadataTags": "enabled"},
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                              {"ResourceType": "volume", "Tags": tags}],
    }
    if cfg.security_groups:
        data["SecurityGroupIds"] = list(cfg.security_groups)
    return data


def data_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    keys = ("ImageId", "IamInstanceProfile", "UserData", "MetadataOptions", "InstanceInitiatedShutdownBehavior",
            "SecurityGroupIds", "TagSpecifications")
    out = {k: data.get(k) for k in keys}
    prof = out.get("IamInstanceProfile") or {}
    out["IamInstanceProfile"] = {"Name": prof.get("Name")} if prof else None
    md = out.get("MetadataOptions") or {}
    out["MetadataOptions"] = {k: md.get(k) for k in ("HttpTokens", "HttpPutResponseHopLimit", "HttpEndpoint",
                                                      "InstanceMetadataTags")}
    # The template's own tags are not launch data; moto folds them into version 1's TagSpecifications.
    specs = out.get("TagSpecifications") or []
    out["TagSpecifications"] = [t for t in specs if t.get("ResourceType") != "launch-template"] or None
    return out


def _describe(cfg: PoolConfig) -> dict[str, Any] | None:
    ec2 = aws.client("ec2", cfg.region)
    try:
        with aws.mapped("ec2:DescribeLaunchTemplates"):
            lts = ec2.describe_launch_templates(LaunchTemplateNames=[cfg.launch_template_name])["LaunchTemplates"]
    except aws.NotFound:
        return None
    return lts[0] if lts else None


def ensure(cfg: PoolConfig) -> TemplateState:
    """Create the template, or add a version when the rendered data changed."""
    data = render(cfg)
    ec2 = aws.client("ec2", cfg.region)
    digest = data_hash(_comparable(data))
    lt = _describe(cfg)
    if lt is None:
        with aws.mapped("ec2:CreateLaunchTemplate"):
            resp = ec2.create_launch_template(
                LaunchTemplateName=cfg.launch_template_name, LaunchTemplateData=data,
                VersionDescription=f"runner-pool {digest}",
                TagSpecifications=[{"ResourceType": "launch-template",
                                    "Tags": [{"Key": "runner-pool:pool", "Value": cfg.name}]}])
        t = resp["LaunchTemplate"]
        return TemplateState(t["LaunchTemplateId"], cfg.launch_template_name, 1, 1, digest, True)
    current = ec2.describe_launch_template_versions(
        LaunchTemplateId=lt["LaunchTemplateId"], Versions=["$Default"])["LaunchTemplateVersions"][0]
    if data_hash(_comparable(current["LaunchTemplateData"])) == digest:
        return TemplateState(lt["LaunchTemplateId"], cfg.launch_template_name, int(lt["DefaultVersionNumber"]),
                             int(lt["LatestVersionNumber"]), digest, False)
    with aws.mapped("ec2:CreateLaunchTemplateVersion"):
        # Always the full data: CreateLaunchTemplateVersion without SourceVersion inherits nothing.
        v = ec2.create_launch_template_version(
            LaunchTemplateId=lt["LaunchTemplateId"], LaunchTemplateData=data,
            VersionDescription=f"runner-pool {digest}")["LaunchTemplateVersion"]["VersionNumber"]
        ec2.modify_launch_template(LaunchTemplateId=lt["LaunchTemplateId"], DefaultVersion=str(v))
    pruned = prune(cfg, lt["LaunchTemplateId"], int(v))
    return TemplateState(lt["LaunchTemplateId"], cfg.launch_template_name, int(v), int(v), digest, True, pruned)


def prune(cfg: PoolConfig, template_id: str, default_version: int) -> tuple[int, ...]:
    """Delete versions older than the newest ``KEEP_VERSIONS`` (never the default)."""
    ec2 = aws.client("ec2", cfg.region)
    versions: list[int] = []
    for page in ec2.get_paginator("describe_launch_template_versions").paginate(LaunchTemplateId=template_id):
        versions.extend(int(v["VersionNumber"]) for v in page["LaunchTemplateVersions"])
    keep = set(sorted(versions)[-KEEP_VERSIONS:]) | {default_version}
    doomed = sorted(v for v in versions if v not in keep)
    if doomed:
        ec2.delete_launch_template_versions(LaunchTemplateId=template_id, Versions=[str(v) for v in doomed])
    return tuple(doomed)


def current(cfg: PoolConfig) -> TemplateState | None:
    lt = _describe(cfg)
    if lt is None:
        return None
    return TemplateState(lt["LaunchTemplateId"], cfg.launch_template_name, int(lt["DefaultVersionNumber"]),
                         int(lt["LatestVersionNumber"]), "", False)


def delete(cfg: PoolConfig) -> bool:
    if _describe(cfg) is None:              # moto answers a missing name with MissingParameter, not NotFound
        return False
    ec2 = aws.client("ec2", cfg.region)
    return aws.found("ec2:DeleteLaunchTemplate",
                     lambda: ec2.delete_launch_template(LaunchTemplateName=cfg.launch_template_name))
