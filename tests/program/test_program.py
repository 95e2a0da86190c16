"""The Pulumi program under mocks: what each stack kind registers and exports.

``pulumi.runtime.set_mocks`` replaces the engine: resources are recorded with
their type token and inputs, the mocks answer with outputs, and no provider
code runs (a fixture makes any provider method fail the test if called).
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import dill
import pulumi
import pytest
import yaml
from pulumi.runtime import rpc
from pulumi.runtime.settings import get_root_resource, set_root_resource

import dynamic_providers
from controlplane.config import parse_config
from controlplane.iam import instance_policy

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "123456789012"
T = "pulumi-python:dynamic/runnerpool:"


def load_program() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runner_pool_program", ROOT / "__main__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROGRAM = load_program()


def pool_dict(**overrides: Any) -> dict[str, Any]:
    """A pool config as a user writes it under `runner-pool:pool` (camelCase)."""
    base: dict[str, Any] = {
        "name": "ci", "region": "eu-west-1", "github": {"repository": "octo/repo"},
        "resourceClasses": {"small": {"vcpu": {"min": 2, "max": 2}, "memoryMib": {"min": 4096}},
                            "large": {"vcpu": {"min": 8}, "memoryMib": {"min": 16384}}},
        "subnets": ["subnet-0123456789abcdef0"], "ami": "ami-0123456789abcdef0", "instanceProfile": "ci-runner",
    }
    base.update(overrides)
    return base


class RecordingMocks(pulumi.runtime.Mocks):
    """Records registrations; answers with outputs shaped like the real providers'."""

    def __init__(self, pool_stack_outputs: dict[str, Any] | None = None) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.pool_stack_outputs = pool_stack_outputs or {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        ins = dict(args.inputs)
        pool = ins.get("pool") or {}
        name, region = pool.get("name"), pool.get("region", "us-east-1")
        t = args.typ
        if t == T + "StateTable":
            return f"runner-pool-{name}", {**ins, "tableName": f"runner-pool-{name}", "region": region,
                                           "poolName": name, "account": ACCOUNT, "partition": "aws",
                                           "tableArn": f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/runner-pool-{name}"}
        if t == T + "ResourceClassPool":
            url = f"https://sqs.{region}.amazonaws.com/{ACCOUNT}/runner-pool-{name}-{ins['resourceClass']}"
            return url, {**ins, "queueUrl": url, "dlqUrl": url + "-dlq"}
        if t == T + "LaunchTemplate":
            return "lt-0abc", {**ins, "launchTemplateId": "lt-0abc", "version": 3.0, "latestVersion": 3.0}
        if t == T + "RegistrationToken":
            return "p", {**ins, "parameterName": f"/runner-pool/{name}/runner-tokens", "expiresAt": 1.9e9}
        if t == T + "RunnerFleet":
            n = int(ins["count"])
            return ins["runId"], {**ins, "label": ins["runId"], "count": float(n),
                                  "instanceIds": [f"i-{k:017x}" for k in range(n)]}
        if t == "pulumi:pulumi:StackReference":
            return ins["name"], {**ins, "outputs": self.pool_stack_outputs}
        if t == "aws:iam/role:Role":
            return ins["name"], {**ins, "arn": f"arn:aws:iam::{ACCOUNT}:role/{ins['name']}"}
        return f"{args.name}-id", ins

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        return {}, []

    def of_type(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> pulumi.runtime.MockResourceArgs:
        found = self.of_type(typ)
        assert len(found) == 1, f"{typ}: {[r.name for r in found]}"
        return found[0]


@pytest.fixture(autouse=True)
def providers_never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("provider code ran under mocks")

    for cls in (dynamic_providers.StateTableProvider, dynamic_providers.ResourceClassPoolProvider,
                dynamic_providers.LaunchTemplateProvider, dynamic_providers.RegistrationTokenProvider,
                dynamic_providers.RunnerFleetProvider):
        for method in ("check", "diff", "create", "update", "delete", "read"):
            monkeypatch.setattr(cls, method, refuse)


@pytest.fixture
def mocks() -> Iterator[RecordingMocks]:
    m = RecordingMocks({"poolName": "ci", "region": "eu-west-1"})
    loop = asyncio.new_event_loop()                  # the runtime wants a current loop on this thread
    asyncio.set_event_loop(loop)
    set_root_resource(None)                          # type: ignore[arg-type]  # a fresh stack per test
    pulumi.runtime.set_mocks(m, project="runner-pool", stack="ci", preview=False)
    yield m
    pulumi.runtime.set_all_config({})
    asyncio.set_event_loop(None)
    loop.close()


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Run the program with `runner-pool:<key>` config; returns the resolved stack outputs."""
    pulumi.runtime.set_all_config({f"runner-pool:{k}": v if isinstance(v, str) else json.dumps(v)
                                   for k, v in config.items()})
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> Any:
        PROGRAM.main()
        outputs = get_root_resource().outputs      # type: ignore[union-attr]
        return pulumi.Output.all(**outputs).apply(resolved.update)

    program()
    return resolved


def config_error(config: dict[str, Any]) -> str:
    with pytest.raises(pulumi.RunError) as err:
        run(config)
    return str(err.value)


def provider_of(args: pulumi.runtime.MockResourceArgs) -> Any:
    blob = rpc.unwrap_rpc_secret(args.inputs["__provider"])
    return dill.loads(base64.b64decode(blob)), blob


# ---------------------------------------------------------------- pool stack


def test_pool_stack_registers_table_a_queue_per_class_the_template_and_the_token(mocks: RecordingMocks) -> None:
    run({"kind": "pool", "pool": pool_dict()})
    table = mocks.one(T + "StateTable")
    queues = mocks.of_type(T + "ResourceClassPool")
    template = mocks.one(T + "LaunchTemplate")
    token = mocks.one(T + "RegistrationToken")
    assert sorted(q.inputs["resourceClass"] for q in queues) == ["large", "small"]
    for r in (table, template, token, *queues):
        assert r.inputs["pool"] == pool_dict()          # the dict as configured, camelCase keys and all
    assert {r.typ for r in mocks.resources} == {T + n for n in (
        "StateTable", "ResourceClassPool", "LaunchTemplate", "RegistrationToken")}
    assert not mocks.of_type("aws:iam/role:Role")


def test_pool_stack_exports_what_run_stacks_and_workflows_read(mocks: RecordingMocks) -> None:
    out = run({"kind": "pool", "pool": pool_dict()})
    assert out == {
        "poolName": "ci", "region": "eu-west-1", "tableName": "runner-pool-ci",
        "queueUrls": {c: f"https://sqs.eu-west-1.amazonaws.com/{ACCOUNT}/runner-pool-ci-{c}"
                      for c in ("large", "small")},
        "launchTemplateId": "lt-0abc", "launchTemplateVersion": 3, "tokenParameter": "/runner-pool/ci/runner-tokens",
    }
    assert isinstance(out["launchTemplateVersion"], int)


def test_every_provider_is_pickled_by_reference_to_the_importable_package(mocks: RecordingMocks) -> None:
    run({"kind": "pool", "pool": pool_dict()})
    for r in mocks.resources:
        provider, blob = provider_of(r)
        assert type(provider).__module__.startswith("dynamic_providers.")
        assert len(blob) < 400, "a by-value pickle carries bytecode and is far larger"
        assert vars(provider) == {}                    # no client, lock or session to pickle


def test_snake_case_pool_keys_work_as_well(mocks: RecordingMocks) -> None:
    snake = pool_dict()
    snake["resource_classes"] = snake.pop("resourceClasses")
    snake["instance_profile"] = snake.pop("instanceProfile")
    run({"kind": "pool", "pool": snake})
    assert len(mocks.of_type(T + "ResourceClassPool")) == 2


def test_create_instance_role_adds_role_least_privilege_policy_and_the_configured_profile(
        mocks: RecordingMocks) -> None:
    out = run({"kind": "pool", "pool": pool_dict(), "createInstanceRole": "true"})
    role = mocks.one("aws:iam/role:Role")
    profile = mocks.one("aws:iam/instanceProfile:InstanceProfile")
    policy = mocks.one("aws:iam/rolePolicy:RolePolicy")
    assert role.inputs["name"] == "runner-pool-ci-instance"
    assert json.loads(role.inputs["assumeRolePolicy"])["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert profile.inputs["name"] == "ci-runner" and profile.inputs["role"] == "runner-pool-ci-instance"
    assert json.loads(policy.inputs["policy"]) == instance_policy(parse_config(pool_dict()), ACCOUNT, "aws")
    assert out["instanceProfileName"] == "ci-runner"
    assert out["instanceRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/runner-pool-ci-instance"
    assert mocks.one("pulumi:providers:aws").inputs["region"] == "eu-west-1"


# ---------------------------------------------------------------- run stack


def test_run_stack_registers_one_fleet_with_its_inputs_and_exports_the_label(mocks: RecordingMocks) -> None:
    out = run({"kind": "run", "poolName": "ci", "region": "eu-west-1", "runId": "123-1", "resourceClass": "small",
               "count": 3, "usageClass": "spot"})
    fleet = mocks.one(T + "RunnerFleet")
    assert {k: v for k, v in fleet.inputs.items() if k != "__provider"} == {
        "poolName": "ci", "region": "eu-west-1", "runId": "123-1", "resourceClass": "small", "count": 3,
        "usageClass": "spot"}
    assert [r.typ for r in mocks.resources] == [T + "RunnerFleet"]
    assert out["label"] == "123-1" and out["count"] == 3 and isinstance(out["count"], int)
    assert out["resourceClass"] == "small" and len(out["instanceIds"]) == 3


def test_run_stack_without_usage_class_leaves_it_to_the_pool(mocks: RecordingMocks) -> None:
    run({"kind": "run", "poolName": "ci", "region": "eu-west-1", "runId": "r1", "resourceClass": "small",
         "count": 1, "usageClass": ""})
    assert "usageClass" not in mocks.one(T + "RunnerFleet").inputs


def test_run_stack_reads_pool_name_and_region_from_the_pool_stack(mocks: RecordingMocks) -> None:
    run({"kind": "run", "poolStack": "org/runner-pool/ci-pool", "runId": "r2", "resourceClass": "large", "count": 2})
    ref = mocks.one("pulumi:pulumi:StackReference")
    assert ref.inputs["name"] == "org/runner-pool/ci-pool"
    fleet = mocks.one(T + "RunnerFleet")
    assert (fleet.inputs["poolName"], fleet.inputs["region"]) == ("ci", "eu-west-1")


# ---------------------------------------------------------------- config errors


def test_missing_kind_names_the_key_and_both_choices(mocks: RecordingMocks) -> None:
    msg = config_error({})
    assert "runner-pool:kind: is not set" in msg and "kind pool" in msg and "kind run" in msg
    assert not mocks.resources


def test_unknown_kind_is_refused(mocks: RecordingMocks) -> None:
    assert "'fleet' is not a stack kind" in config_error({"kind": "fleet"})


def test_pool_stack_without_pool_config_says_where_to_put_it(mocks: RecordingMocks) -> None:
    msg = config_error({"kind": "pool"})
    assert "runner-pool:pool: is not set" in msg and "examples/Pulumi.pool.yaml" in msg


def test_every_bad_pool_field_is_one_line_naming_its_path(mocks: RecordingMocks) -> None:
    msg = config_error({"kind": "pool", "pool": pool_dict(subnets=["subnet-nothex"], ami="ubuntu", idleTimeS=1)})
    lines = msg.splitlines()[1:]
    assert len(lines) == 3
    assert any(line.strip().startswith("runner-pool:pool.subnets:") for line in lines)
    assert any(line.strip().startswith("runner-pool:pool.ami:") for line in lines)
    assert any(line.strip().startswith("runner-pool:pool.idleTimeS:") for line in lines)
    assert not mocks.resources


def test_pool_that_is_not_an_object_is_refused(mocks: RecordingMocks) -> None:
    assert "runner-pool:pool: is a list, not an object" in config_error({"kind": "pool", "pool": [1, 2]})


def test_run_stack_reports_every_missing_key_at_once(mocks: RecordingMocks) -> None:
    msg = config_error({"kind": "run"})
    for key in ("poolName", "region", "runId", "resourceClass"):
        assert f"runner-pool:{key}: is not set" in msg
    assert "runner-pool:poolStack" in msg                # the alternative is named in the fix
    assert not mocks.resources


@pytest.mark.parametrize(("extra", "expected"), [
    ({"count": 0}, "runner-pool:count: 0 is out of range"),
    ({"count": 501}, "runner-pool:count: 501 is out of range"),
    ({"count": "three"}, "runner-pool:count: 'three' is not a whole number"),
    ({"usageClass": "reserved"}, "runner-pool:usageClass: 'reserved' is not a usage class"),
    ({"runId": "-bad id"}, "runner-pool:runId: '-bad id' is not valid"),
    ({"resourceClass": "Small"}, "runner-pool:resourceClass: 'Small' is not a class name"),
    ({"region": "mars"}, "runner-pool:region: 'mars' is not an AWS region"),
    ({"poolStack": "org/p/s"}, "runner-pool:poolStack: is set together with poolName/region"),
])
def test_bad_run_config_names_the_key_and_the_fix(mocks: RecordingMocks, extra: dict[str, Any], expected: str) -> None:
    config = {"kind": "run", "poolName": "ci", "region": "eu-west-1", "runId": "r1", "resourceClass": "small",
              "count": 1, **extra}
    assert expected in config_error(config)
    assert not mocks.resources


# ---------------------------------------------------------------- examples


def stack_file_config(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    return {k.removeprefix("runner-pool:"): v for k, v in doc["config"].items()}


def test_example_pool_stack_file_is_a_valid_pool_stack(mocks: RecordingMocks) -> None:
    out = run(stack_file_config("Pulumi.pool.yaml"))
    assert out["poolName"] == "demo" and sorted(out["queueUrls"]) == ["large", "small"]


def test_example_run_stack_file_is_a_valid_run_stack(mocks: RecordingMocks) -> None:
    out = run(stack_file_config("Pulumi.run.yaml"))
    assert out["label"] == "1234567890-1" and out["count"] == 3
    assert mocks.one("pulumi:pulumi:StackReference").inputs["name"] == "organization/runner-pool/ci-pool"


def test_example_workflow_provisions_runs_on_the_label_and_always_releases() -> None:
    wf = yaml.safe_load((ROOT / "examples" / "workflow.yml").read_text())
    jobs = wf["jobs"]
    provision = "\n".join(s.get("run", "") for s in jobs["provision"]["steps"])
    for command in ("pulumi stack select --create", "pulumi config set runId", "exec pulumi up --yes",
                    'echo "label=$(pulumi stack output label)" >> "$GITHUB_OUTPUT"'):
        assert command in provision
    assert jobs["provision"]["outputs"]["label"] == "${{ steps.label.outputs.label }}"
    work = [j for n, j in jobs.items() if n not in ("provision", "release")]
    assert work and all(j["runs-on"] == "${{ needs.provision.outputs.label }}" for j in work)
    release = jobs["release"]
    assert release["if"] == "always()" and set(release["needs"]) >= {"provision", *(n for n in jobs if n not in (
        "provision", "release"))}
    script = "\n".join(s.get("run", "") for s in release["steps"])
    for command in ("pulumi cancel --yes", "--clear-pending-creates", "pulumi destroy --yes", "--remove",
                    'runner-pool release --pool "$pool" --region "$region" --run-id "$RUN_ID"'):
        assert command in script


def test_only_the_provision_and_release_jobs_get_secrets_and_an_oidc_token() -> None:
    text = (ROOT / "examples" / "workflow.yml").read_text()
    wf = yaml.safe_load(text)
    assert wf["permissions"] == {}
    assert "secrets." not in yaml.safe_dump(wf["env"])          # nothing secret workflow-wide
    for name, job in wf["jobs"].items():
        body = yaml.safe_dump(job)
        if name in ("provision", "release"):
            assert job["permissions"] == {"contents": "read", "id-token": "write"}
            assert "secrets.PULUMI_CONFIG_PASSPHRASE" in body and "secrets.RUNNER_POOL_GITHUB_TOKEN" in body
        else:
            assert job["permissions"] == {}, name
            assert "secrets." not in body and "env" not in job, name


def test_artifact_names_carry_the_run_id_and_attempt() -> None:
    wf = yaml.safe_load((ROOT / "examples" / "workflow.yml").read_text())
    action = yaml.safe_load((ROOT / "examples" / "action" / "action.yml").read_text())
    artifacts = [s for j in wf["jobs"].values() for s in j["steps"] if "-artifact@" in s.get("uses", "")]
    artifacts += [s for s in action["runs"]["steps"] if "-artifact@" in s.get("uses", "")]
    assert len(artifacts) == 4
    for step in artifacts[:2]:
        assert step["with"]["name"].endswith("${{ github.run_id }}-${{ github.run_attempt }}"), step
    for step in artifacts[2:]:
        assert "${{ inputs.run-id }}" in step["with"]["name"], step      # run-id defaults to run id and attempt
    assert action["inputs"]["run-id"]["default"] == "${{ github.run_id }}-${{ github.run_attempt }}"


def test_example_refresh_runs_every_15_minutes_and_the_action_is_composite() -> None:
    refresh = yaml.safe_load((ROOT / "examples" / "refresh.yml").read_text())
    assert refresh[True]["schedule"] == [{"cron": "*/15 * * * *"}]      # YAML reads the key `on` as True
    steps = refresh["jobs"]["refresh"]["steps"]
    assert any('runner-pool refresh --pool "$POOL"' in s.get("run", "") for s in steps)
    action = yaml.safe_load((ROOT / "examples" / "action" / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    assert set(action["outputs"]) == {"label", "instance-ids"}
    assert all("shell" in s for s in action["runs"]["steps"] if "run" in s)
