"""Cost tags: while an instance serves a run, it carries that run's tags.

So that Cost Explorer (with the keys activated as cost allocation tags) can
attribute instance hours to runs, repositories, workflows and teams:

* ``runner-pool:run-id`` = the run id, always;
* any of the pool's ``run_tag_keys`` (default ``repository``, ``workflow``,
  ``team``) the provision passes (CLI ``--tag KEY=VALUE``, RunnerFleet
  ``tags``).

When they are put on:

* an instance **created** for the run gets them in CreateFleet's
  ``TagSpecifications`` (no extra call);
* instances **claimed** from the pool get them with one CreateTags call for
  the whole batch, right after the commit (a rollback never tagged them);

and taken off on **release**: one DeleteTags call (keys only, so whatever the
values were) for the instances that go back to the pool; those terminated keep
them, which is what their last hours were for. An instance never carries
another run's tags into the pool, and a claim overwrites whatever a failed
untag left behind.

A failed CreateTags/DeleteTags (after the AWS client's retries) does not fail
the provision or the release: it is logged (``costtags.tag_failed``) and
costs only attribution. The control plane's policy allows CreateTags and
DeleteTags on the pool's instances for exactly these keys (docs/security.md).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from controlplane import aws
from controlplane.config import PoolConfig
from controlplane.errors import AwsError, ConfigError
from controlplane.logs import event

RUN_ID_TAG = "runner-pool:run-id"
TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9 _.:/=+\-@]{0,256}$")     # EC2's allowed characters, 256 at most
TAG_CALL_IDS = 1000                                               # instance ids per CreateTags/DeleteTags


def run_tags(run_id: str, tags: Mapping[str, str]) -> dict[str, str]:
    """The tags an instance carries while it serves ``run_id``."""
    return {RUN_ID_TAG: run_id, **tags}


def tag_keys(cfg: PoolConfig) -> list[str]:
    """Every key a run may put on an instance (what release removes and the policy allows)."""
    return [RUN_ID_TAG, *cfg.run_tag_keys]


def check(cfg: PoolConfig, tags: Mapping[str, str]) -> dict[str, str]:
    """The provision's tags, validated before any AWS change (ConfigError: exit 2)."""
    for key, value in tags.items():
        if key not in cfg.run_tag_keys:
            allowed = ", ".join(cfg.run_tag_keys) or "none"
            raise ConfigError(f"tag {key!r} is not a run tag key of pool {cfg.name}",
                              hint=f"use one of the pool's run_tag_keys: {allowed}")
        if not TAG_VALUE_RE.match(value):
            raise ConfigError(f"tag {key!r}: value {value!r} is not a valid EC2 tag value",
                              hint="at most 256 letters, digits, spaces and _ . : / = + - @")
    return dict(tags)


def parse_cli(items: list[str]) -> dict[str, str]:
    """``--tag KEY=VALUE`` options as a dict; a malformed one is bad input."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag {item!r} is not KEY=VALUE", hint="pass e.g. --tag team=platform")
        if key in out:
            raise ConfigError(f"--tag {key} is given twice", hint="pass each key once")
        out[key] = value
    return out


def tag_claimed(cfg: PoolConfig, run_id: str, instance_ids: list[str], tags: Mapping[str, str]) -> bool:
    """Put the run's tags on instances it claimed from the pool (one CreateTags per 1000)."""
    if not instance_ids:
        return True
    ec2 = aws.client("ec2", cfg.region)
    want = [{"Key": k, "Value": v} for k, v in run_tags(run_id, tags).items()]
    try:
        with aws.mapped("ec2:CreateTags"):
            for chunk in aws.chunks(sorted(instance_ids), TAG_CALL_IDS):
                ec2.create_tags(Resources=chunk, Tags=want)
    except AwsError as exc:                        # attribution only: the run keeps its runners
        event("costtags.tag_failed", run_id=run_id, instance_ids=instance_ids, error=str(exc))
        return False
    event("costtags.tagged", run_id=run_id, instance_ids=sorted(instance_ids), keys=sorted(run_tags(run_id, tags)))
    return True


def untag(cfg: PoolConfig, run_id: str, instance_ids: list[str]) -> bool:
    """Remove every run tag key from instances going back to the pool (one DeleteTags per 1000)."""
    if not instance_ids:
        return True
    ec2 = aws.client("ec2", cfg.region)
    keys = [{"Key": k} for k in tag_keys(cfg)]
    try:
        with aws.mapped("ec2:DeleteTags"):
            for chunk in aws.chunks(sorted(instance_ids), TAG_CALL_IDS):
                ec2.delete_tags(Resources=chunk, Tags=keys)
    except AwsError as exc:                        # attribution only: the runners go back all the same
        event("costtags.untag_failed", run_id=run_id, instance_ids=instance_ids, error=str(exc))
        return False
    event("costtags.untagged", run_id=run_id, instance_ids=sorted(instance_ids))
    return True
