"""Bad input: a clear one-line error naming the field and the fix, exit 2, and no AWS change.

Each row of :data:`CASES` is one mistake a user makes, run through the real
CLI as they run it (``python -m controlplane ...``): a malformed or
impossible pool config (wrong types, negative and zero counts and timeouts,
unknown keys, no subnets, no classes, a launch template over EC2's 16 KB user
data limit, YAML that does not parse, a file that is not there), bad
arguments (counts, usage class, run ids, regions, pool names), a pool that
does not exist, and a GitHub token that is missing or rejected.

Every row must give exit code 2, no traceback, an empty stdout and one
``error: `` line on stderr (``config check`` prints one line per problem,
naming exactly the fields that are wrong) containing the substrings that name
the field and the fix. The emulator's request counter proves that nothing in
AWS changed: each row runs the CLI with an AWS access key of its own (moto
serves every key from the same account, so the CLI sees the same pools), and
the requests signed with that key hold no ``mutations`` for every row, and
none at all for the rows whose input is wrong before any AWS resource is
looked at (a config file, an argument, a token). Agents still heartbeating
from earlier tests sign with their own key and cannot blur the count.

A run id that still holds a live fleet, and the Pulumi side's input checks
(``RunnerFleet``'s and the pool resources'), have their own tests below.
"""
from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic.alias_generators import to_camel

from controlplane import store
from controlplane.apply import apply_pool, destroy_pool
from controlplane.config import USER_DATA_LIMIT_BYTES, parse_config, with_env_overrides
from controlplane.github import github_client_from_env
from controlplane.provision import ProvisionRequest, provision
from controlplane.records import State
from controlplane.userdata import user_data_size
from tests.conftest import RELIABLE, Emu, pool_config_dict, run_cli_with_own_key
from tests.reliability.invariants import check

# User data is gzipped, so a repetitive script would fit: 400 lines of distinct digests (~28 KB, about
# 14 KB once gzipped) take the user data past 16 KB whatever the compression.
BIG_SCRIPT = "".join(f"echo {hashlib.sha256(str(i).encode()).hexdigest()}\n" for i in range(400))
NO_TOKEN = {"RUNNER_POOL_GITHUB_TOKEN": "", "GITHUB_TOKEN": ""}
WRONG_TOKEN = {"RUNNER_POOL_GITHUB_TOKEN": "ghp_expired0000000000000000000000000000", "GITHUB_TOKEN": ""}


@dataclass(frozen=True)
class Case:
    """One bad input: the command line, what the error line must say, what AWS may see.

    ``argv`` may name ``{pool}`` (an applied pool, shared by the module) and
    ``{config}`` (a file written from ``config``: a function that edits a good
    pool config dict in place, or raw text).
    """

    argv: tuple[str, ...]
    says: tuple[str, ...]
    config: Callable[[dict[str, Any]], None] | str | None = None
    env: dict[str, str] = field(default_factory=dict)
    reads: bool = False                 # may it read AWS (never write) before it knows the input is bad?
    fields: tuple[str, ...] = ()        # config check: the fields it must name, one error line each


def setting(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(values)


def small_class(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["resource_classes"]["small"].update(values)


def dropping(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


APPLY = ("pool", "apply", "--config", "{config}")
CHECK = ("config", "check", "{config}")
PROVISION = ("provision", "--pool", "{pool}", "--run-id", "bad-input-1", "--resource-class", "small")

CASES: dict[str, Case] = {
    # -- the pool config: wrong types
    "apply-string-where-a-number-is": Case(APPLY, ("idle_time_s: got \"ten\"", "valid integer"),
                                           setting(idle_time_s="ten")),
    "apply-true-where-a-count-is": Case(APPLY, ("max_reuse: got true", "whole number"), setting(max_reuse=True)),
    "apply-fraction-where-a-number-is": Case(APPLY, ("heartbeat_interval_s: got 1.5", "valid integer"),
                                             setting(heartbeat_interval_s=1.5)),
    "apply-list-where-a-mapping-is": Case(APPLY, ("resource_classes: got [\"small\", \"large\"]", "dictionary"),
                                          setting(resource_classes=["small", "large"])),
    "apply-string-where-a-list-is": Case(APPLY, ("subnets: got \"subnet-", "valid list"),
                                         lambda d: d.update(subnets=d["subnets"][0])),
    "apply-number-where-a-range-is": Case(APPLY, ("resource_classes.small.vcpu: got 2", "dictionary"),
                                          small_class(vcpu=2)),
    "apply-unknown-usage-class": Case(APPLY, ("usage_class: got \"cheap\"", "'spot' or 'on-demand'"),
                                      setting(usage_class="cheap")),
    # -- negative and zero counts and timeouts
    "apply-negative-reuse-count": Case(APPLY, ("max_reuse: got -1", "greater than or equal to 0"),
                                       setting(max_reuse=-1)),
    "apply-negative-timeout": Case(APPLY, ("validation_timeout_s: got -30", "greater than or equal to 5"),
                                   setting(validation_timeout_s=-30)),
    "apply-zero-idle-time": Case(APPLY, ("idle_time_s: got 0", "greater than or equal to 30"),
                                 setting(idle_time_s=0)),
    "apply-zero-vcpus": Case(APPLY, ("resource_classes.small.vcpu", "vcpu.min must be >= 1, got 0"),
                             small_class(vcpu={"min": 0})),
    "apply-staleness-not-above-the-heartbeat": Case(APPLY, ("heartbeat_stale_s", "greater than heartbeat_interval_s"),
                                                    setting(heartbeat_interval_s=5, heartbeat_stale_s=5)),
    # -- unknown keys
    "apply-unknown-key-with-a-near-miss": Case(APPLY, ("idle_time: unknown field", "did you mean idle_time_s"),
                                               setting(idle_time=60)),
    "apply-unknown-nested-key": Case(APPLY, ("resource_classes.small.cpus: unknown field",
                                             "see the configuration reference"), small_class(cpus=4)),
    "apply-one-key-in-both-spellings": Case(APPLY, ("idleTimeS", "idle_time_s", "keep one"),
                                            setting(idleTimeS=300)),
    # -- what a pool needs at least
    "apply-empty-subnets": Case(APPLY, ("subnets: got []", "at least one subnet id is required"),
                                setting(subnets=[])),
    "apply-no-resource-classes": Case(APPLY, ("resource_classes: got {}", "at least one resource class is required"),
                                      setting(resource_classes={})),
    "apply-resource-classes-missing": Case(APPLY, ("resourceClasses: required field is missing",),
                                           dropping("resource_classes")),
    # -- ids of the right shape that name nothing in AWS (looked up, never written)
    "apply-subnet-that-does-not-exist": Case(APPLY, ("subnets: ['subnet-0123456789abcdef0'] not found in us-east-1",
                                                     "check the ids and the region"),
                                             lambda d: d["subnets"].append("subnet-0123456789abcdef0"), reads=True),
    "apply-security-group-that-does-not-exist": Case(APPLY, ("security_groups: ['sg-0123456789abcdef0'] not found",
                                                             "check the ids"),
                                                     setting(security_groups=["sg-0123456789abcdef0"]), reads=True),
    # -- a launch template over EC2's 16 KB of user data, refused before any AWS call
    "check-template-over-16-kb": Case(CHECK, ("pre_runner_script:", f"{USER_DATA_LIMIT_BYTES} byte limit",
                                              "move it into the AMI"), setting(pre_runner_script=BIG_SCRIPT)),
    "apply-template-over-16-kb": Case(APPLY, ("pre_runner_script:", f"{USER_DATA_LIMIT_BYTES} byte limit",
                                              "move it into the AMI"), setting(pre_runner_script=BIG_SCRIPT)),
    # -- files that are not a pool config
    "check-invalid-yaml": Case(CHECK, ("pool.yaml: line 2: not valid YAML", "mapping values are not allowed"),
                               "name: demo\nsubnets: subnet-1: x\n"),
    "apply-invalid-yaml": Case(APPLY, ("pool.yaml: line 2: not valid YAML", "mapping values are not allowed"),
                               "name: demo\nsubnets: subnet-1: x\n"),
    "apply-yaml-list-not-a-mapping": Case(APPLY, ("expected a mapping of pool settings, got list",),
                                          "- name: demo\n"),
    "apply-file-not-utf8": Case(APPLY, ("not UTF-8 text", "save it as UTF-8"), "name: d\xe9mo\n"),
    "apply-missing-config-file": Case(("pool", "apply", "--config", "no/such/pool.yaml"),
                                      ("config file 'no/such/pool.yaml' not found", "examples/pool.yaml")),
    "check-missing-config-file": Case(("config", "check", "no/such/pool.yaml"),
                                      ("config file 'no/such/pool.yaml' not found", "examples/pool.yaml")),
    "check-every-problem-one-line-each": Case(
        CHECK, ("subnets: got []", "max_reuse: got -1", "idle_time_s: got \"ten\""),
        setting(subnets=[], max_reuse=-1, idle_time_s="ten"), fields=("subnets", "max_reuse", "idle_time_s")),
    # -- provision arguments
    "provision-zero-count": Case((*PROVISION, "--count", "0"), ("--count 0 is not valid", "at least 1 runner")),
    "provision-negative-count": Case((*PROVISION, "--count", "-2"), ("--count -2 is not valid", "at least 1")),
    "provision-count-not-a-number": Case((*PROVISION, "--count", "two"), ("--count", "'two'", "whole number")),
    "provision-count-a-fraction": Case((*PROVISION, "--count", "1.5"), ("--count", "'1.5'", "whole number")),
    "provision-count-too-large": Case((*PROVISION, "--count", "501"), ("--count 501 is too large", "at most 500")),
    "provision-bad-usage-class": Case((*PROVISION, "--usage-class", "cheap"),
                                      ("--usage-class", "'cheap'", "spot", "on-demand")),
    "provision-unknown-resource-class": Case(
        ("provision", "--pool", "{pool}", "--run-id", "bad-input-1", "--resource-class", "huge"),
        ("resource class 'huge' is not in pool", "use one of: large, small"), reads=True),
    "provision-malformed-run-id": Case(
        ("provision", "--pool", "{pool}", "--run-id", "run 1!", "--resource-class", "small"),
        ("--run-id 'run 1!' is not valid", "letters, digits")),
    "provision-run-id-over-100-characters": Case(
        ("provision", "--pool", "{pool}", "--run-id", "r" * 101, "--resource-class", "small"),
        ("--run-id 'rrrr", "1-100 characters")),
    "provision-run-id-missing": Case(("provision", "--pool", "{pool}", "--resource-class", "small"),
                                     ("--run-id", "required", "runner-pool provision --help")),
    "status-pool-and-config-together": Case(("status", "--pool", "{pool}", "--config", "pool.yaml"),
                                            ("--config", "not allowed with --pool")),
    "status-unknown-option": Case(("status", "--pool", "{pool}", "--verbose"),
                                  ("unrecognized arguments: --verbose", "--help")),
    "status-malformed-pool-name": Case(("status", "--pool", "Bad_Pool"), ("--pool 'Bad_Pool' is not a pool name",
                                                                         "lowercase letters")),
    "status-malformed-region": Case(("status", "--pool", "{pool}", "--region", "Mars 1"),
                                    ("--region 'Mars 1'", "us-east-1")),
    "release-malformed-run-id": Case(("release", "--pool", "{pool}", "--run-id", "_underscore-first"),
                                     ("--run-id '_underscore-first' is not valid", "starting with a letter or digit")),
    # -- a pool that does not exist
    "provision-unknown-pool": Case(("provision", "--pool", "nosuchpool", "--run-id", "r1", "--resource-class", "small"),
                                   ("pool 'nosuchpool' not found", "pool apply"), reads=True),
    "release-unknown-pool": Case(("release", "--pool", "nosuchpool", "--run-id", "r1"),
                                 ("pool 'nosuchpool' not found", "pool apply"), reads=True),
    "status-unknown-pool": Case(("status", "--pool", "nosuchpool"), ("pool 'nosuchpool' not found", "pool apply"),
                                reads=True),
    "refresh-unknown-pool": Case(("refresh", "--pool", "nosuchpool"), ("pool 'nosuchpool' not found", "pool apply"),
                                 reads=True),
    "reconcile-unknown-pool": Case(("reconcile", "--pool", "nosuchpool"),
                                   ("pool 'nosuchpool' not found", "pool apply"), reads=True),
    "destroy-unknown-pool": Case(("pool", "destroy", "--pool", "nosuchpool"),
                                 ("pool 'nosuchpool' not found", "pool apply"), reads=True),
    "status-config-of-a-pool-never-applied": Case(("status", "--config", "{config}"), ("not found", "pool apply"),
                                                  setting(), reads=True),
    "status-pool-in-another-region": Case(("status", "--pool", "{pool}", "--region", "eu-west-1"),
                                          ("not found in eu-west-1", "check --region"), reads=True),
    "refresh-config-of-a-pool-never-applied": Case(("refresh", "--config", "{config}"),
                                                   ("not found", "pool apply"), setting(), reads=True),
    # -- the GitHub token
    "apply-github-token-unset": Case(APPLY, ("GitHub token not set", "export RUNNER_POOL_GITHUB_TOKEN"), setting(),
                                     env=NO_TOKEN),
    "apply-github-token-rejected": Case(APPLY, ("RUNNER_POOL_GITHUB_TOKEN: GitHub rejected the token",
                                                "invalid, expired or revoked"), setting(), env=WRONG_TOKEN),
    "refresh-github-token-unset": Case(("refresh", "--pool", "{pool}"), ("GitHub token not set",
                                                                         "export RUNNER_POOL_GITHUB_TOKEN"),
                                       env=NO_TOKEN, reads=True),
    "refresh-github-token-rejected": Case(("refresh", "--pool", "{pool}"),
                                          ("RUNNER_POOL_GITHUB_TOKEN: GitHub rejected the token", "expired"),
                                          env=WRONG_TOKEN, reads=True),
    "reconcile-github-token-rejected": Case(("reconcile", "--pool", "{pool}"),
                                            ("RUNNER_POOL_GITHUB_TOKEN: GitHub rejected the token", "expired"),
                                            env=WRONG_TOKEN, reads=True),
}


@pytest.fixture(scope="module")
def applied(local: dict[str, Any]) -> Iterator[Any]:
    """One applied pool (no instances) for the rows that need a pool to exist."""
    cfg = parse_config(pool_config_dict(local, **RELIABLE))
    apply_pool(cfg)
    yield store.load_pool(cfg.name, cfg.region)
    destroy_pool(cfg, github_client_from_env(cfg.github.api_url, cfg.github.scope))


def write_config(case: Case, local: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The case's config file (a fresh, never-applied pool name); returns the dict it holds."""
    if isinstance(case.config, str):
        path.write_bytes(case.config.encode("latin-1"))     # latin-1 keeps "\xe9" one byte, not UTF-8
        return None
    data = copy.deepcopy(pool_config_dict(local, name=f"bad{uuid.uuid4().hex[:8]}"))
    assert case.config is not None
    case.config(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def error_field(line: str) -> str:
    """The field an error line names: ``error: subnets: got []`` -> ``subnets``."""
    return line.removeprefix("error: ").split(": ", 1)[0]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing_in_aws(case: Case, local: dict[str, Any], emu: Emu,
                                                                  applied: Any, tmp_path: Path) -> None:
    config = tmp_path / "pool.yaml"
    data = write_config(case, local, config) if case.config is not None else None
    says = list(case.says)
    if data is not None and "pre_runner_script" in data:
        size = user_data_size(with_env_overrides(parse_config(data)))      # what the CLI renders
        assert size > USER_DATA_LIMIT_BYTES
        says.append(f"user data {size} bytes")
    argv = [a.replace("{pool}", applied.name).replace("{config}", str(config)) for a in case.argv]

    p, key = run_cli_with_own_key(*argv, env=case.env, timeout=120)
    seen = emu.requests(access_key=key)

    assert p.returncode == 2, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.stdout == "", p.stdout
    lines = p.stderr.splitlines()
    assert len(lines) == max(1, len(case.fields)) and all(line.startswith("error: ") for line in lines), p.stderr
    for part in says:
        assert any(part in line for line in lines), f"{part!r} not in {p.stderr!r}"
    if case.fields:                                        # each problem on its own line, naming its field
        assert sorted(error_field(line) for line in lines) == sorted(case.fields), lines
    assert seen["mutations"] == 0, f"AWS was changed: {seen['counts']}"
    if not case.reads:
        assert seen["total"] == 0, f"AWS was called before the input was checked: {seen['counts']}"


def test_a_cli_signing_with_its_own_key_sees_the_same_pools_and_is_counted_apart(applied: Any, emu: Emu) -> None:
    """What the rows above rely on: another key is the same AWS account, and its requests are its own."""
    p, key = run_cli_with_own_key("status", "--pool", applied.name, "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["pool"] == applied.name
    seen = emu.requests(access_key=key)
    assert seen["total"] > 0 and seen["mutations"] == 0, seen
    assert emu.requests(access_key="AKIDNEVERUSED")["total"] == 0


def test_a_run_id_that_still_holds_a_live_fleet_is_refused_and_the_fleet_is_untouched(
        make_pool: Any, emu: Emu) -> None:
    pool = make_pool(**RELIABLE)
    res = provision(pool, ProvisionRequest("reused-run", "small", 1))
    assert res.ok, res.reason
    p, key = run_cli_with_own_key("provision", "--pool", pool.name, "--run-id", "reused-run", "--resource-class",
                                  "large", "--count", "2", timeout=120)
    seen = emu.requests(access_key=key)                   # the fleet's agent heartbeats with its own key

    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "run id 'reused-run' already holds 1 instance(s) (running)" in lines[0]
    assert f"runner-pool release --pool {pool.name} --run-id reused-run" in lines[0]
    assert seen["total"] > 0 and seen["mutations"] == 0, seen["counts"]     # it looked, and changed nothing
    rows = store.run_records(pool, "reused-run")
    assert [(r.instance_id, r.state) for r in rows] == [(res.instance_ids[0], State.RUNNING)]
    check(pool, emu)


# ---------------------------------------------------------------- the Pulumi side's input checks

GOOD_FLEET = {"poolName": "ci", "region": "us-east-1", "runId": "run-1", "resourceClass": "small", "count": 2}

FLEET_CASES: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "count-a-string": ({"count": "2"}, "count", ("whole number", "'2'")),
    "count-a-fraction": ({"count": 2.5}, "count", ("whole number", "2.5")),
    "count-true": ({"count": True}, "count", ("whole number", "True")),
    "count-zero": ({"count": 0}, "count", ("from 1 to 500", "got 0")),
    "count-negative": ({"count": -3}, "count", ("from 1 to 500", "got -3")),
    "count-over-500": ({"count": 501}, "count", ("from 1 to 500", "got 501")),
    "count-missing": ({"count": None}, "count", ("required", "from 1 to 500")),
    "run-id-malformed": ({"runId": "run 1!"}, "runId", ("'run 1!' is not valid", "1-100 characters")),
    "run-id-missing": ({"runId": None}, "runId", ("required", "github.run_id")),
    "usage-class-unknown": ({"usageClass": "cheap"}, "usageClass", ("'cheap'", "spot, on-demand")),
    "pool-name-malformed": ({"poolName": "Bad_Pool"}, "poolName", ("'Bad_Pool'", "lowercase letters")),
    "region-malformed": ({"region": "mars"}, "region", ("'mars'", "us-east-1")),
    "resource-class-malformed": ({"resourceClass": "Small!"}, "resourceClass", ("'Small!'", "lowercase letters")),
}


@pytest.mark.parametrize("change,key,says", list(FLEET_CASES.values()), ids=list(FLEET_CASES))
def test_runner_fleet_inputs_are_checked_one_line_per_field(change: dict[str, Any], key: str,
                                                            says: tuple[str, ...]) -> None:
    from dynamic_providers.runner_fleet import RunnerFleetProvider

    news = {k: v for k, v in {**GOOD_FLEET, **change}.items() if v is not None}
    failures = RunnerFleetProvider().check({}, news).failures
    assert [f.property for f in failures] == [key]
    reason = failures[0].reason
    assert "\n" not in reason and key in reason, reason
    for part in says:
        assert part in reason, reason


def test_runner_fleet_takes_a_whole_float_count_as_the_engine_sends_it() -> None:
    from dynamic_providers.runner_fleet import RunnerFleetProvider, request_of

    checked = RunnerFleetProvider().check({}, {**GOOD_FLEET, "count": 2.0})
    assert checked.failures == []
    assert request_of(checked.inputs) == ProvisionRequest("run-1", "small", 2)
    assert type(checked.inputs["count"]) is int


@pytest.mark.parametrize("change,says", [
    ({"preRunnerScript": BIG_SCRIPT}, ("pre_runner_script:", f"{USER_DATA_LIMIT_BYTES} byte limit")),
    ({"maxReuse": -1}, ("pool.maxReuse: got -1", "greater than or equal to 0")),
    ({"subnets": []}, ("pool.subnets: got []", "at least one subnet id")),
], ids=["template-over-16-kb", "negative-reuse-count", "empty-subnets"])
def test_the_pool_input_of_the_launch_template_resource_is_checked_before_anything_runs(
        local: dict[str, Any], change: dict[str, Any], says: tuple[str, ...]) -> None:
    from dynamic_providers.launch_template import LaunchTemplateProvider

    pool = {k: v for k, v in pool_config_dict(local).items() if to_camel(k) not in change}
    failures = LaunchTemplateProvider().check({}, {"pool": {**pool, **change}}).failures
    assert len(failures) == 1 and failures[0].property == "pool", failures
    assert "\n" not in failures[0].reason
    for part in says:
        assert part in failures[0].reason, failures[0].reason
