"""``LaunchTemplate``: the pool's EC2 launch template, versioned, never replaced.

Inputs: ``pool`` (the pool config dict). Outputs: ``launchTemplateId``,
``launchTemplateName``, ``version`` (the default version), ``latestVersion``,
``renderHash`` (hash of the rendered template data).

* create / update -> :func:`controlplane.launch_template.ensure`: the first
  call creates the template; later calls compare the rendered data with the
  default version *in EC2* and, when it differs, add one version, make it the
  default and prune old ones. The template keeps its id, so running
  instances and fleets in flight are untouched.
* diff -> an update when the rendered data changes: a config change that
  affects the template, or new agent code embedded in the user data
  (``renderHash``); a change of pool name or region replaces it.
* check -> :func:`controlplane.launch_template.render` (user data over 16 KB
  fails here, before anything changes).
* delete -> :func:`controlplane.launch_template.delete` ("not found" is
  success); read -> :func:`controlplane.launch_template.current`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi.dynamic
from pulumi.dynamic import CheckFailure, CreateResult, ReadResult, UpdateResult

from controlplane import launch_template as lt
from controlplane import ownership
from controlplane.config import PoolConfig
from controlplane.errors import RunnerPoolError
from dynamic_providers import _base


def render_hash(cfg: PoolConfig) -> str:
    return lt.data_hash(lt.render(cfg))


class LaunchTemplateProvider(_base.PoolResourceProvider):
    def check_more(self, cfg: PoolConfig, news: Mapping[str, Any]) -> list[CheckFailure]:
        try:
            lt.render(cfg)
        except RunnerPoolError as exc:
            return [CheckFailure("pool", str(exc))]
        return []

    def needs_update(self, olds: Mapping[str, Any], news: Mapping[str, Any]) -> bool:
        try:
            return bool(olds.get("renderHash") != render_hash(_base.pool_config(news["pool"])))
        except RunnerPoolError:
            return True                              # let update report the problem

    def create(self, props: dict[str, Any]) -> CreateResult:
        with _base.mapped_errors("launch template"):
            cfg = _base.pool_config(props["pool"])
            owner = _base.owner_of(props)
            if owner:
                ownership.refuse_if_owned_elsewhere(f"launch template {cfg.launch_template_name}",
                                                    ownership.template_owner(cfg), owner)
            state = lt.ensure(cfg)
            if owner:
                ownership.set_template_owner(cfg, owner)
        return CreateResult(state.template_id, self._outs(props, cfg, state))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        with _base.mapped_errors("launch template"):
            cfg = _base.pool_config(news["pool"])
            state = lt.ensure(cfg)
            owner = _base.owner_of(news)
            if owner:
                ownership.set_template_owner(cfg, owner)
        return UpdateResult(self._outs(news, cfg, state))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with _base.mapped_errors(f"launch template {id_}"):
            state = lt.current(_base.pool_config(props["pool"]))
        if state is None or state.template_id != id_:
            return ReadResult("", {})
        return ReadResult(id_, _base.outputs(props, version=state.default_version,
                                             latestVersion=state.latest_version))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with _base.mapped_errors(f"delete launch template {id_}"):
            cfg = _base.pool_config(props["pool"])
            # Look first: the emulator (moto) answers DeleteLaunchTemplate of a missing
            # name with MissingParameter instead of a not-found code.
            if lt.current(cfg) is not None:
                lt.delete(cfg)

    @staticmethod
    def _outs(props: dict[str, Any], cfg: PoolConfig, state: lt.TemplateState) -> dict[str, Any]:
        return _base.outputs(props, launchTemplateId=state.template_id, launchTemplateName=state.name,
                             version=state.default_version, latestVersion=state.latest_version,
                             renderHash=render_hash(cfg))


class LaunchTemplateArgs:
    """Inputs of :class:`LaunchTemplate`."""

    def __init__(self, pool: pulumi.Input[dict[str, Any]], owner: pulumi.Input[str] | None = None) -> None:
        self.pool = pool
        self.owner = owner


class LaunchTemplate(pulumi.dynamic.Resource, module="runnerpool", name="LaunchTemplate"):
    launchTemplateId: pulumi.Output[str]
    launchTemplateName: pulumi.Output[str]
    version: pulumi.Output[int]
    latestVersion: pulumi.Output[int]
    renderHash: pulumi.Output[str]

    def __init__(self, name: str, args: LaunchTemplateArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(LaunchTemplateProvider(), name, {
            "pool": args.pool, "owner": args.owner,
            "launchTemplateId": None, "launchTemplateName": None, "version": None, "latestVersion": None,
            "renderHash": None,
        }, opts)
