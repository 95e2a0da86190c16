"""Apply and destroy a pool without Pulumi.

``apply_pool`` converges everything a pool needs: the state table, one queue
per resource class, the launch template, the runner tokens in SSM, and the
stored copy of the config (so later commands can say ``--pool NAME``). Each
step is idempotent, and these are the same functions the Pulumi resources
call. ``destroy_pool`` terminates the pool's instances and removes it all.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane import aws, launch_template, pool, store, token
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline
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
    from botocore.exceptions import ClientError

    ec2 = aws.client("ec2", cfg.region)
    problems = []
    try:
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
    except ClientError as exc:
        raise aws.wrap(exc, "ec2:DescribeSubnets/DescribeSecurityGroups") from exc
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
    ids = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag:runner-pool:pool", "Values": [cfg.name]},
            {"Name": "instance-state-name", "Values": list(states)}]):
        for r in page["Reservations"]:
            ids.extend(i["InstanceId"] for i in r["Instances"])
    return ids


# Right after CreateFleet, EC2's other APIs may not know an instance yet (eventual consistency:
# https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html), and TerminateInstances
# answers InvalidInstanceID.NotFound for it. An instance that was terminated stays known for about
# an hour, so a NotFound that persists means the id never existed here. Such ids are retried with
# backoff for NOT_FOUND_RETRY_S, then reported as not found (never silently dropped).
NOT_FOUND_RETRY_S = 30.0
NOT_FOUND_BACKOFF_S = (0.5, 8.0)      # first delay, longest delay


@dataclass(frozen=True)
class Termination:
    terminated: list[str]
    not_found: list[str]              # still InvalidInstanceID.NotFound after the retries


def terminate(region: str, instance_ids: list[str], clock: Clock = SYSTEM_CLOCK,
              not_found_retry_s: float = NOT_FOUND_RETRY_S) -> Termination:
    """TerminateInstances in batches; an id EC2 does not know (yet) is retried, then reported."""
    from botocore.exceptions import ClientError

    ec2 = aws.client("ec2", region)
    done: list[str] = []
    unknown: list[str] = []
    for chunk in aws.chunks(sorted(set(instance_ids)), 500):
        try:
            ec2.terminate_instances(InstanceIds=chunk)
            done.extend(chunk)
            continue
        except ClientError as exc:
            if aws.error_code(exc) != "InvalidInstanceID.NotFound":
                raise aws.wrap(exc, "ec2:TerminateInstances") from exc
        unknown.extend(_terminate_one_by_one(ec2, chunk, done))   # one unknown id fails the whole call
    deadline = Deadline(not_found_retry_s, clock)
    delay = NOT_FOUND_BACKOFF_S[0]
    attempts = 1
    while unknown and not deadline.expired:
        clock.sleep(min(delay, deadline.remaining_s))
        delay = min(delay * 2, NOT_FOUND_BACKOFF_S[1])
        attempts += 1
        unknown = _terminate_one_by_one(ec2, unknown, done)
    if unknown:
        event("terminate.not_found", logging.WARNING, instance_ids=unknown, attempts=attempts,
              retried_s=round(deadline.elapsed_s, 1))
    return Termination(done, unknown)


def _terminate_one_by_one(ec2: Any, instance_ids: list[str], done: list[str]) -> list[str]:
    """Terminate each id on its own, appending the terminated to ``done``; returns the ids EC2 does not know."""
    from botocore.exceptions import ClientError

    not_found: list[str] = []
    for iid in instance_ids:
        try:
            ec2.terminate_instances(InstanceIds=[iid])
            done.append(iid)
        except ClientError as exc:
            if aws.error_code(exc) != "InvalidInstanceID.NotFound":
                raise aws.wrap(exc, "ec2:TerminateInstances") from exc
            not_found.append(iid)
    return not_found


def terminate_instances(region: str, instance_ids: list[str], clock: Clock = SYSTEM_CLOCK) -> list[str]:
    """The ids :func:`terminate` terminated; those EC2 never knew are logged (``terminate.not_found``)."""
    return terminate(region, instance_ids, clock).terminated


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
