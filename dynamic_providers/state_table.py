"""``StateTable``: the pool's DynamoDB table, and the pool's anchor.

Inputs: ``pool`` (the pool config dict). Outputs: ``tableName``,
``tableArn``, ``account``, ``partition``, ``region``, ``poolName``.

* create / update -> :func:`controlplane.store.ensure_table` (GSIs, TTL on
  ``expires_at``, point-in-time recovery), then
  :func:`controlplane.store.save_pool`: the stored config is what run stacks
  and ``runner-pool --pool NAME`` load, so a config change is an update that
  stores the new config.
* delete -> the pool's end. The table outlives the pool's other resources
  (the program makes them depend on it), so when it goes the queues,
  template and token are gone already; what is left are the pool's
  instances: every instance tagged with the pool is terminated
  (:func:`controlplane.apply.terminate_instances`), the pool's runners are
  removed from GitHub (when a GitHub token is in the environment), then
  :func:`controlplane.store.delete_table`. "Not found" is success throughout.
* read -> the table exists, or the resource is gone (empty id).
* A new pool name or region replaces the table.
"""
from __future__ import annotations

from typing import Any

import pulumi
import pulumi.dynamic
from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from controlplane import aws, ownership, store
from controlplane.apply import pool_instance_ids, terminate_instances
from controlplane.config import PoolConfig
from controlplane.errors import ConfigError
from controlplane.github import GitHubClient, github_client_from_env
from controlplane.iam import table_arn
from dynamic_providers import _base


def ensure_pool_table(cfg: PoolConfig) -> store.Pool:
    """The table, converged, holding ``cfg`` as the pool's stored config."""
    store.ensure_table(cfg)
    account, partition = aws.account_and_partition(cfg.region)
    pool = store.Pool(cfg, account, partition)
    store.save_pool(pool)
    return pool


def end_pool(cfg: PoolConfig) -> None:
    """Terminate the pool's instances, remove its runners from GitHub, delete the table."""
    terminate_instances(cfg.region, pool_instance_ids(cfg))
    github = _github_if_configured(cfg)
    if github is not None:
        for runner in github.list_runners():
            if cfg.pool_label in runner.labels:
                github.delete_runner(runner.id)
    store.delete_table(cfg)


def _github_if_configured(cfg: PoolConfig) -> GitHubClient | None:
    try:
        return github_client_from_env(cfg.github.api_url, cfg.github.scope)
    except ConfigError:
        return None                      # the instances still end; their runners then show offline


class StateTableProvider(_base.PoolResourceProvider):
    def create(self, props: dict[str, Any]) -> CreateResult:
        with _base.mapped_errors("state table"):
            cfg = _base.pool_config(props["pool"])
            owner = _base.owner_of(props)
            if owner:
                ownership.refuse_if_owned_elsewhere(f"table {cfg.table_name}", ownership.table_owner(cfg), owner)
            pool = ensure_pool_table(cfg)
            if owner:
                ownership.set_table_owner(cfg, owner)
        return CreateResult(cfg.table_name, self._outs(props, pool))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        with _base.mapped_errors("state table"):
            pool = ensure_pool_table(_base.pool_config(news["pool"]))
            owner = _base.owner_of(news)
            if owner:
                ownership.set_table_owner(pool.config, owner)
        return UpdateResult(self._outs(news, pool))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with _base.mapped_errors(f"state table {id_}"):
            cfg = _base.pool_config(props["pool"])
            if not store.table_exists(cfg):
                return ReadResult("", {})
        return ReadResult(id_, _base.outputs(props))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with _base.mapped_errors(f"delete state table {id_}"):
            end_pool(_base.pool_config(props["pool"]))

    @staticmethod
    def _outs(props: dict[str, Any], pool: store.Pool) -> dict[str, Any]:
        cfg = pool.config
        return _base.outputs(props, tableName=cfg.table_name, tableArn=table_arn(cfg, pool.account, pool.partition),
                             account=pool.account, partition=pool.partition, region=cfg.region, poolName=cfg.name)


class StateTableArgs:
    """Inputs of :class:`StateTable`."""

    def __init__(self, pool: pulumi.Input[dict[str, Any]], owner: pulumi.Input[str] | None = None) -> None:
        self.pool = pool
        self.owner = owner                   # <org>/<project>/<stack>/<name>: a create refuses another's table


class StateTable(pulumi.dynamic.Resource, module="runnerpool", name="StateTable"):
    tableName: pulumi.Output[str]
    tableArn: pulumi.Output[str]
    account: pulumi.Output[str]
    partition: pulumi.Output[str]
    region: pulumi.Output[str]
    poolName: pulumi.Output[str]

    def __init__(self, name: str, args: StateTableArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(StateTableProvider(), name, {
            "pool": args.pool, "owner": args.owner,
            "tableName": None, "tableArn": None, "account": None, "partition": None, "region": None,
            "poolName": None,
        }, opts)
