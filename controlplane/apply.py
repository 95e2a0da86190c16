"""Apply and destroy a pool without Pulumi.

``apply_pool`` converges everything a pool needs: the state table, one queue
per resource class, the launch template, the runner tokens in SSM, and the
stored copy of the config (so later commands can say ``--pool NAME``). Each
step is idempotent, and these are the same functions the Pulumi resources
call. ``destroy_pool`` terminates the pool's instances and removes it all.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane import aws, launch_template, pool, store, termination, token
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.config import PoolConfig
from controlplane.errors import ConfigErrors
from controlplane.github import GitHubClient, github_client_for
from controlplane.logs import QUIET, Progress, event
from controlplane.store import Pool


@dataclass(frozen=True)
class ApplyResult:
    pool: str
    region: str
    table: str
    table_created: bool
    queues: dict[str, str]
    launch_template_id: str
    launch_template_version: int
    launch_template_changed: bool
    tokens_rotated: bool
    tokens_expire_at: float
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_pool(cfg: PoolConfig, github: GitHubClient | None = None, progress: Progress = QUIET) -> ApplyResult:
    started = time.monotonic()
    github = github or github_client_for(cfg.github)  # fails before any AWS change
    launch_template.render(cfg)                                                     # user data size check, too
    check_network(cfg)                                                              # reads only
    launch_template.check_architectures(cfg)                                        # reads only
    account, partition = aws.account_and_partition(cfg.region)
    p = Pool(cfg, account, partition)
    progress.phase(f"pool {cfg.name}: table {cfg.table_name}")
    created = store.ensure_table(cfg)
    progress.phase(f"pool {cfg.name}: {len(cfg.resource_classes)} queue(s)")
    queues = pool.ensure_queues(cfg)
    progress.phase(f"pool {cfg.name}: launch template {cfg.launch_template_name}")
    lt = launch_template.ensure(cfg)
    progress.phase(f"pool {cfg.name}: runner tokens in SSM {cfg.token_parameter}")
    tokens, rotated = token.ensure_tokens(cfg, github)
    store.save_pool(p, extra={"queues": queues, "launch_template": {"id": lt.template_id,
                                                                    "version": lt.default_version}})
    result = ApplyResult(cfg.name, cfg.region, cfg.table_name, created, queues, lt.template_id, lt.default_version,
                         lt.changed, rotated, tokens.expires_at, round(time.monotonic() - started, 3))
    event("pool.apply", pool=cfg.name, table_created=created, queues=sorted(queues), lt_version=lt.default_version,
          lt_changed=lt.changed, tokens_rotated=rotated, duration_s=result.duration_s)
    return result


def check_network(cfg: PoolConfig) -> None:
    """The subnets and security groups the config names exist in its region (ConfigErrors if not).

    A typo'd id passes the config's pattern and the launch template (which holds
    no subnet), and would otherwise surface only at the first CreateFleet.
    Describe calls with filters answer with what exists instead of failing on
    the first unknown id, so every missing one is named at once.
    """
    ec2 = aws.client("ec2", cfg.region)
    problems = []
    with aws.mapped("ec2:DescribeSubnets/DescribeSecurityGroups"):
        found = {s["SubnetId"] for s in ec2.describe_subnets(
            Filters=[{"Name": "subnet-id", "Values": list(cfg.subnets)}])["Subnets"]}
        missing = [s for s in cfg.subnets if s not in found]
        if missing:
            problems.append(f"subnets: {missing} not found in {cfg.region} (check the ids and the region)")
        if cfg.security_groups:
            found = {g["GroupId"] for g in ec2.describe_security_groups(
                Filters=[{"Name": "group-id", "Values": list(cfg.security_groups)}])["SecurityGroups"]}
            missing = [g for g in cfg.security_groups if g not in found]
            if missing:
                problems.append(f"security_groups: {missing} not found in {cfg.region} (check the ids and the region)")
    if problems:
        raise ConfigErrors(problems)


@dataclass
class DestroyResult:
    pool: str
    terminated: list[str] = field(default_factory=list)
    queues_deleted: list[str] = field(default_factory=list)
    runners_deleted: int = 0
    table_deleted: bool = False
    launch_template_deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pool_instance_ids(cfg: PoolConfig, states: tuple[str, ...] = ("pending", "running", "stopping", "stopped")
                      ) -> list[str]:
    ec2 = aws.client("ec2", cfg.region)
    ids: list[str] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag:runner-pool:pool", "Values": [cfg.name]},
            {"Name": "instance-state-name", "Values": list(states)}]):
        for r in page["Reservations"]:
            ids.extend(i["InstanceId"] for i in r["Instances"])
    return ids


def terminate_instances(region: str, instance_ids: list[str], clock: Clock = SYSTEM_CLOCK) -> list[str]:
    """The ids EC2 terminated (see :func:`controlplane.termination.terminate_ec2`; unknown ids are logged)."""
    return termination.terminate_ec2(region, instance_ids, clock).terminated


def destroy_pool(cfg: PoolConfig, github: GitHubClient | None = None, progress: Progress = QUIET) -> DestroyResult:
    res = DestroyResult(cfg.name)
    ids = pool_instance_ids(cfg)
    progress.phase(f"pool {cfg.name}: terminating {len(ids)} instance(s)")
    res.terminated = terminate_instances(cfg.region, ids)
    for cls, url in pool.pool_queues(cfg).items():
        pool.delete_queue(cfg.region, url)
        dlq = pool.dlq_url(cfg, cls)
        if dlq:
            pool.delete_queue(cfg.region, dlq)
        res.queues_deleted.append(cls)
    res.launch_template_deleted = launch_template.delete(cfg)
    token.delete_tokens(cfg)
    if github is not None:
        mine = set(ids)
        for runner in github.list_runners():
            # A pooled runner waits with no label at all: it is this pool's when named after its instance.
            pooled = not runner.labels and runner.name.rsplit("-", 1)[0] in mine
            if (cfg.pool_label in runner.labels or pooled) and github.delete_runner(runner.id):
                res.runners_deleted += 1
    res.table_deleted = store.delete_table(cfg)
    event("pool.destroy", pool=cfg.name, terminated=res.terminated, queues=res.queues_deleted,
          runners_deleted=res.runners_deleted)
    return res
