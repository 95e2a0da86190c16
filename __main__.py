"""The runner-pool Pulumi program: a pool stack or a run stack, chosen by config.

``runner-pool:kind`` picks one:

* **pool** (``runner-pool:pool`` holds the pool config, as in ``pool.yaml``):
  a ``StateTable``, one ``ResourceClassPool`` per resource class, a
  ``LaunchTemplate`` and a ``RegistrationToken``; with
  ``runner-pool:createInstanceRole`` also the instance role, its
  least-privilege inline policy (:func:`controlplane.iam.instance_policy`)
  and the instance profile the launch template names. Everything depends on
  the table, so ``destroy`` removes the table last (its delete terminates
  whatever instances the pool still has).
* **run** (``runner-pool:poolStack``, or ``poolName`` + ``region``;
  ``runId``, ``resourceClass``, ``count``, optional ``usageClass``): one
  ``RunnerFleet``. ``up`` provisions, ``destroy`` releases.

Bad config stops the program before any resource is registered, with one
line per problem naming the key and the fix. The resources themselves live
in :mod:`dynamic_providers` (importable, so their providers are pickled by
reference); this file only wires config to them.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pulumi

from controlplane import inputs
from controlplane.config import CLASS_RE, NAME_RE, USAGE_CLASSES, PoolConfig, parse_config
from controlplane.errors import ConfigErrors
from dynamic_providers import (
    LaunchTemplate,
    LaunchTemplateArgs,
    RegistrationToken,
    RegistrationTokenArgs,
    ResourceClassPool,
    ResourceClassPoolArgs,
    RunnerFleet,
    RunnerFleetArgs,
    StateTable,
    StateTableArgs,
)

KINDS = ("pool", "run")


class Problems:
    """Config problems, collected so that one run reports all of them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, problem: str, fix: str) -> None:
        self.lines.append(f"{pulumi.get_project()}:{key}: {problem}; {fix}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise pulumi.RunError("invalid stack configuration:\n  " + "\n  ".join(self.lines))


def _text(cfg: pulumi.Config, key: str) -> str | None:
    """A string key; unset and the schema's empty default are both None."""
    value = cfg.get(key)
    return (value.strip() or None) if value is not None else None


def _object(cfg: pulumi.Config, key: str, problems: Problems, fix: str) -> Any:
    try:
        value = cfg.get_object(key)
    except pulumi.ConfigTypeError:
        problems.add(key, "is not a valid JSON object", fix)
        return None
    if value is None:
        problems.add(key, "is not set", fix)
    return value


# ---------------------------------------------------------------- pool stack

POOL_FIX = ("set it in Pulumi.<stack>.yaml under `runner-pool:pool:` with the fields of pool.yaml "
            "(see examples/Pulumi.pool.yaml)")


def owner(name: str) -> str:
    """Who manages a pool resource: ``<org>/<project>/<stack>/<name>``, recorded as its
    ``runner-pool:owner`` tag. A create refuses a resource another stack -- or another name in this
    one -- owns, so two stacks naming one pool, or a rename without ``aliases``, fail instead of
    adopting the pool and then deleting it under the old URN. (The stack name is an input because
    ``pulumi.get_stack()`` is ``"stack"`` inside the provider host.) Renaming a resource here needs
    ``pulumi.ResourceOptions(aliases=[pulumi.Alias(name="<old name>")])``."""
    return f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}/{name}"


def pool_stack(cfg: pulumi.Config) -> None:
    problems = Problems()
    raw = _object(cfg, "pool", problems, POOL_FIX)
    pool_cfg: PoolConfig | None = None
    if raw is not None and not isinstance(raw, dict):
        problems.add("pool", f"is a {type(raw).__name__}, not an object", POOL_FIX)
    elif raw is not None:
        try:
            pool_cfg = parse_config(raw, f"{pulumi.get_project()}:pool")
        except ConfigErrors as exc:
            for line in exc.problems:
                where, _, what = line.partition(": ")
                problems.add("pool" if where == "(top level)" else f"pool.{where}", what,
                             "fix it in runner-pool:pool (docs/configuration.md lists every field)")
    try:
        create_role = bool(cfg.get_bool("createInstanceRole"))
    except pulumi.ConfigTypeError:
        problems.add("createInstanceRole", "is not a boolean", "set it to true or false")
        create_role = False
    try:
        protect = cfg.get_bool("protect")
    except pulumi.ConfigTypeError:
        problems.add("protect", "is not a boolean", "set it to true or false")
        protect = True
    problems.raise_if_any()
    assert pool_cfg is not None

    # Protected: deleting the table ends the pool (every instance terminated), so neither a
    # `destroy` nor a URN change may do it by accident. `protect: false` + `up` first, then destroy.
    table = StateTable("table", StateTableArgs(pool=raw, owner=owner("table")),
                       pulumi.ResourceOptions(protect=protect is not False))
    after_table = pulumi.ResourceOptions(depends_on=[table])
    queues = {cls: ResourceClassPool(f"queue-{cls}", ResourceClassPoolArgs(pool=raw, resource_class=cls,
                                                                          owner=owner(f"queue-{cls}")), after_table)
              for cls in sorted(pool_cfg.resource_classes)}
    template_deps: list[pulumi.Resource] = [table]
    if create_role:
        role, profile = instance_role(pool_cfg, table)
        template_deps.append(profile)
        pulumi.export("instanceRoleArn", role.arn)
        pulumi.export("instanceProfileName", profile.name)
    template = LaunchTemplate("launch-template", LaunchTemplateArgs(pool=raw, owner=owner("launch-template")),
                              pulumi.ResourceOptions(depends_on=template_deps))
    tokens = RegistrationToken("runner-tokens", RegistrationTokenArgs(pool=raw), after_table)

    pulumi.export("poolName", table.poolName)
    pulumi.export("region", table.region)
    pulumi.export("tableName", table.tableName)
    pulumi.export("queueUrls", pulumi.Output.all(**{cls: q.queueUrl for cls, q in queues.items()}))
    pulumi.export("launchTemplateId", template.launchTemplateId)
    pulumi.export("launchTemplateVersion", template.version.apply(_whole))
    pulumi.export("tokenParameter", tokens.parameterName)


def instance_role(pool_cfg: PoolConfig, table: StateTable) -> tuple[Any, Any]:
    """Instance role, inline policy and profile (pulumi-aws; imported only when asked for)."""
    import pulumi_aws as aws

    from controlplane.iam import assume_role_policy, instance_policy

    provider = aws.Provider("aws", region=pool_cfg.region)
    opts = pulumi.ResourceOptions(provider=provider)
    tags = {"runner-pool:pool": pool_cfg.name}
    role = aws.iam.Role("instance-role", name=f"runner-pool-{pool_cfg.name}-instance",
                        assume_role_policy=json.dumps(assume_role_policy()),
                        description=f"runner-pool {pool_cfg.name}: instances read their own rows and the token",
                        tags=tags, opts=opts)
    policy = pulumi.Output.all(table.account, table.partition).apply(
        lambda ap: json.dumps(instance_policy(pool_cfg, ap[0], ap[1])))
    aws.iam.RolePolicy("instance-policy", role=role.id, name="runner-pool-instance", policy=policy, opts=opts)
    profile = aws.iam.InstanceProfile("instance-profile", name=pool_cfg.instance_profile, role=role.name,
                                      tags=tags, opts=opts)
    return role, profile


# ---------------------------------------------------------------- run stack


def run_stack(cfg: pulumi.Config) -> None:
    problems = Problems()
    pool_stack_name, pool_name, region = _text(cfg, "poolStack"), _text(cfg, "poolName"), _text(cfg, "region")
    if pool_stack_name and (pool_name or region):
        problems.add("poolStack", "is set together with poolName/region",
                     "set either runner-pool:poolStack or runner-pool:poolName and runner-pool:region")
    elif not pool_stack_name:
        if not pool_name:
            problems.add("poolName", "is not set",
                         "set runner-pool:poolStack to the pool stack, or runner-pool:poolName and runner-pool:region")
        elif not re.match(NAME_RE, pool_name):
            problems.add("poolName", f"{pool_name!r} is not a pool name", "lowercase letters, digits, '-' (max 30)")
        if not region:
            problems.add("region", "is not set", "set runner-pool:region to the pool's region, e.g. us-east-1")
        elif not inputs.region_ok(region):
            problems.add("region", f"{region!r} is not an AWS region", "use a region such as us-east-1")

    run_id = _text(cfg, "runId")
    if not run_id:
        problems.add("runId", "is not set",
                     "set it per run, e.g. `pulumi config set runId ${{ github.run_id }}-${{ github.run_attempt }}`")
    elif not inputs.run_id_ok(run_id):
        problems.add("runId", f"{run_id!r} is not valid", inputs.RUN_ID_RULE)
    resource_class = _text(cfg, "resourceClass")
    if not resource_class:
        problems.add("resourceClass", "is not set", "set it to a resource class of the pool, e.g. small")
    elif not re.match(CLASS_RE, resource_class):
        problems.add("resourceClass", f"{resource_class!r} is not a class name", "lowercase letters, digits, '-'")
    try:
        count = cfg.get_int("count")
    except pulumi.ConfigTypeError:
        problems.add("count", f"{cfg.get('count')!r} is not a whole number", f"set it to {inputs.MIN_COUNT}..{inputs.MAX_COUNT}")
        count = None
    else:
        if count is None:
            count = 1
        if not inputs.count_ok(count):
            problems.add("count", f"{count} is out of range", f"set it to {inputs.MIN_COUNT}..{inputs.MAX_COUNT}")
    usage_class = _text(cfg, "usageClass")
    if not inputs.usage_class_ok(usage_class):
        problems.add("usageClass", f"{usage_class!r} is not a usage class",
                     f"use one of {', '.join(USAGE_CLASSES)}, or leave it unset")
    problems.raise_if_any()

    pool_name_in: pulumi.Input[str]
    region_in: pulumi.Input[str]
    if pool_stack_name:
        ref = pulumi.StackReference(pool_stack_name)
        pool_name_in, region_in = ref.require_output("poolName"), ref.require_output("region")
    else:
        assert pool_name is not None and region is not None
        pool_name_in, region_in = pool_name, region
    assert run_id is not None and resource_class is not None and count is not None
    fleet = RunnerFleet("fleet", RunnerFleetArgs(pool_name=pool_name_in, region=region_in, run_id=run_id,
                                                 resource_class=resource_class, count=count,
                                                 usage_class=usage_class))
    pulumi.export("label", fleet.label)
    pulumi.export("instanceIds", fleet.instanceIds)
    pulumi.export("count", fleet.count.apply(_whole))
    pulumi.export("resourceClass", fleet.resourceClass)
    pulumi.export("runId", fleet.runId)
    pulumi.export("poolName", fleet.poolName)


# ---------------------------------------------------------------- entry


def _whole(value: Any) -> Any:
    """Numbers come back from the engine as floats; stack outputs show them as ints."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def main() -> None:
    cfg = pulumi.Config()                # the project's namespace, whatever Pulumi.yaml names it
    kind = _text(cfg, "kind")
    if kind == "pool":
        pool_stack(cfg)
    elif kind == "run":
        run_stack(cfg)
    else:
        problems = Problems()
        problems.add("kind", "is not set" if kind is None else f"{kind!r} is not a stack kind",
                     "`pulumi config set kind pool` for a pool stack or `pulumi config set kind run` for a run stack")
        problems.raise_if_any()


if __name__ == "__main__":
    main()
