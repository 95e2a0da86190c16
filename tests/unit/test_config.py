"""Pool configuration: defaults, and one clear line per bad field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.config import PoolConfig, load_config, parse_config
from controlplane.errors import ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[2]


def good(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "ci", "github": {"repository": "octo/repo"},
        "resource_classes": {"small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}}},
        "subnets": ["subnet-0123456789abcdef0"], "ami": "ami-0123456789abcdef0", "instance_profile": "runner",
    }
    base.update(overrides)
    return base


def problems(**overrides: Any) -> list[str]:
    with pytest.raises(ConfigErrors) as err:
        parse_config(good(**overrides))
    return err.value.problems


def test_defaults_follow_the_reference_implementation() -> None:
    cfg = parse_config(good())
    assert (cfg.idle_time_s, cfg.validation_timeout_s, cfg.heartbeat_interval_s) == (420, 180, 5)
    assert cfg.max_runtime_s == 1800 and cfg.claim_timeout_s == 300 and cfg.deregistration_timeout_s == 120
    assert cfg.usage_class == "on-demand" and cfg.spot_fallback is True
    assert cfg.resource_classes["small"].instance_types == ["c*", "m*", "r*"]


def test_camel_case_keys_as_in_pulumi_config_are_accepted() -> None:
    cfg = parse_config(good(resource_classes={"x": {"vcpu": {"min": 4}, "memoryMib": {"min": 8192}}}, idleTimeS=60))
    assert cfg.idle_time_s == 60 and cfg.resource_classes["x"].memory_mib.min == 8192


def test_derived_names_are_one_place() -> None:
    cfg = parse_config(good())
    assert cfg.table_name == "runner-pool-ci"
    assert cfg.queue_name("small") == "runner-pool-ci-small" and cfg.dlq_name("small") == "runner-pool-ci-small-dlq"
    assert cfg.launch_template_name == "runner-pool-ci" and cfg.token_parameter == "/runner-pool/ci/runner-tokens"


@pytest.mark.parametrize("field,value,expected", [
    ("name", "Bad_Name", "name: got \"Bad_Name\": not allowed; expected pool name"),
    ("region", "mars-1", "region: got \"mars-1\": not allowed; expected AWS region"),
    ("subnets", [], "subnets: got []: at least one subnet id is required"),
    ("subnets", ["subnet-zz"], "invalid subnet id(s) ['subnet-zz']"),
    ("subnets", ["subnet-0123456789abcdef0"] * 2, "subnet ids must be unique"),
    ("ami", "ami-xyz", "ami: got \"ami-xyz\": not allowed; expected AMI id"),
    ("security_groups", ["sg-1"], "invalid security group id(s) ['sg-1']"),
    ("usage_class", "cheap", "usage_class: got \"cheap\": Input should be 'spot' or 'on-demand'"),
    ("idle_time_s", -5, "idle_time_s: got -5: Input should be greater than or equal to 30"),
    ("max_reuse", "many", "max_reuse: got \"many\""),
    ("resource_classes", {}, "at least one resource class is required"),
    ("resource_classes", {"Big": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}}}, "invalid class name(s) ['Big']"),
    ("resource_classes", {"s": {"vcpu": {"min": 0}, "memory_mib": {"min": 4096}}}, "vcpu.min must be >= 1, got 0"),
    ("resource_classes", {"s": {"vcpu": {"min": 4, "max": 2}, "memory_mib": {"min": 4096}}},
     "max (2) must be >= min (4)"),
    ("resource_classes", {"s": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}, "instance_types": ["C*!"]}},
     "invalid pattern(s) ['C*!']"),
    ("github", {"repository": "o/r", "organization": "o"}, "set exactly one of github.repository"),
    ("github", {"repository": "nope"}, "github.repository: got \"nope\": not allowed; expected owner/repo"),
    ("tags", {"aws:x": "1"}, "tag keys ['aws:x'] are reserved"),
    ("bogus", 1, "bogus: unknown field"),
])
def test_each_bad_field_gets_one_line_naming_field_value_and_what_is_allowed(field: str, value: Any,
                                                                             expected: str) -> None:
    lines = problems(**{field: value})
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_heartbeat_staleness_must_exceed_the_interval() -> None:
    lines = problems(heartbeat_interval_s=5, heartbeat_stale_s=5)
    assert lines == ["(top level): got {...}: heartbeat_stale_s (5) must be greater than heartbeat_interval_s (5)"]


def test_a_broken_file_reports_every_problem_at_once(tmp_path: Path) -> None:
    f = tmp_path / "pool.yaml"
    f.write_text("name: X\nsubnets: []\nami: nope\nbogus: 1\n")
    with pytest.raises(ConfigErrors) as err:
        load_config(f)
    text = "\n".join(err.value.problems)
    for part in ("name:", "subnets:", "ami:", "bogus: unknown field", "github: required field is missing",
                 "resourceClasses: required field is missing", "instanceProfile: required field is missing"):
        assert part in text


def test_missing_file_and_bad_yaml_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigErrors) as err:
        load_config(bad)
    assert "not valid YAML" in err.value.problems[0]


def test_the_example_pool_is_valid() -> None:
    cfg = load_config(ROOT / "examples" / "pool.yaml")
    assert isinstance(cfg, PoolConfig) and set(cfg.resource_classes) == {"small", "large"}


def test_unknown_resource_class_names_the_ones_that_exist() -> None:
    cfg = parse_config(good())
    with pytest.raises(ConfigError) as err:
        cfg.resource_class("huge")
    assert "use one of: small" in str(err.value)


def test_ephemeral_is_set_per_pool_and_a_class_may_say_otherwise() -> None:
    classes = {"trusted": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}, "ephemeral": False},
               "forks": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}, "ephemeral": True},
               "plain": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}}}
    reused = parse_config(good(resource_classes=classes))
    assert [reused.is_ephemeral(c) for c in ("trusted", "forks", "plain")] == [False, True, False]
    strict = parse_config(good(resource_classes=classes, ephemeral=True))
    assert [strict.is_ephemeral(c) for c in ("trusted", "forks", "plain")] == [False, True, True]


def test_a_github_app_needs_both_its_id_and_its_installation() -> None:
    app = parse_config(good(github={"repository": "octo/repo", "app_id": 12, "app_installation_id": 34}))
    assert (app.github.app_id, app.github.app_installation_id) == (12, 34)
    assert any("app_installation_id" in p for p in problems(github={"repository": "octo/repo", "app_id": 12}))
