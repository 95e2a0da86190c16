"""Plain-data checks of the stopped tier, the spot breaker and per-class images (no AWS)."""
from __future__ import annotations

from typing import Any

import pytest

from controlplane.config import ARM64_INSTANCE_TYPES, parse_config
from controlplane.errors import ConfigErrors
from controlplane.interruptions import breaker_state
from controlplane.records import InstanceRecord, State
from controlplane.state import TRANSITIONS
from controlplane.stopped_tier import why_not_stoppable

BASE: dict[str, Any] = {
    "name": "ci", "github": {"repository": "octo/repo"}, "subnets": ["subnet-0123456789abcdef0"],
    "ami": "ami-0123456789abcdef0", "instance_profile": "runner",
    "resource_classes": {"small": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}}},
}


def config(**small: Any) -> Any:
    return parse_config({**BASE, "resource_classes": {"small": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096},
                                                                **small}}})


def one_error(**small: Any) -> str:
    with pytest.raises(ConfigErrors) as exc:
        config(**small)
    assert len(exc.value.problems) == 1, exc.value.problems
    return str(exc.value.problems[0])


def test_the_stopped_state_is_entered_only_from_idle_and_left_only_to_a_claim_or_termination() -> None:
    into = {a for a, b in TRANSITIONS if b is State.STOPPED}
    out = {b for a, b in TRANSITIONS if a is State.STOPPED}
    assert into == {State.IDLE} and out == {State.CLAIMED, State.TERMINATED}


@pytest.mark.parametrize("times, now, opened", [
    ([], 1000.0, False),
    ([100.0, 200.0], 1000.0, False),                   # two of three
    ([100.0, 200.0, 300.0], 1000.0, True),             # three within the window, cool-down until 2100
    ([100.0, 200.0, 300.0], 2200.0, False),            # cool-down over
    ([100.0, 5000.0, 9000.0], 9100.0, False),          # three, but never within one window
])
def test_the_breaker_opens_on_enough_interruptions_within_the_window_and_closes_after_the_cooldown(
        times: list[float], now: float, opened: bool) -> None:
    b = breaker_state(times, now, threshold=3, window_s=3600, cooldown_s=1800)
    assert b.open is opened
    if opened:
        assert b.until == 300.0 + 1800


def record(usage: str) -> InstanceRecord:
    return InstanceRecord("arn:aws:ec2:r:1:instance/i-1", State.IDLE, 0, "small", "c5.large", usage, "s", 0)


def test_ec2_would_refuse_to_stop_spot_and_instance_store_instances_and_those_are_terminated_instead() -> None:
    assert why_not_stoppable(record("on-demand"), "ebs") is None
    assert "spot" in str(why_not_stoppable(record("spot"), "ebs"))
    assert "instance-store" in str(why_not_stoppable(record("on-demand"), "instance-store"))


def test_stopped_time_is_typed_and_bounded_with_a_one_line_error_naming_the_field() -> None:
    assert config(stopped_time_s=3600).resource_classes["small"].stopped_time_s == 3600
    assert config().resource_classes["small"].stopped_time_s is None
    assert one_error(stopped_time_s=5).startswith("resource_classes.small.stopped_time_s: got 5:")
    assert one_error(stopped_time_s=True).startswith("resource_classes.small.stopped_time_s: got true:")


def test_an_arm64_class_defaults_to_graviton_patterns_and_refuses_others_naming_the_field() -> None:
    rc = config(architecture="arm64", ami="ami-0e9271c829888680e").resource_classes["small"]
    assert rc.instance_types == ARM64_INSTANCE_TYPES
    assert config(architecture="arm64", instanceTypes=["c7g.*", "t4g.*"]).resource_classes["small"].instance_types
    err = one_error(architecture="arm64", instance_types=["c7g.*", "c7i.*"])
    assert err.startswith("resource_classes.small: ") and "['c7i.*'] are not Graviton families" in err
    assert one_error(architecture="sparc").startswith("resource_classes.small.architecture: got \"sparc\":")
    assert one_error(ami="ami-XYZ").startswith("resource_classes.small.ami: got \"ami-XYZ\":")


def test_one_launch_template_per_distinct_image_and_the_pools_own_keeps_its_name() -> None:
    cfg = parse_config({**BASE, "resource_classes": {
        "a": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}},
        "b": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}, "ami": "ami-0e9271c829888680e", "architecture": "arm64"},
        "c": {"vcpu": {"min": 4}, "memory_mib": {"min": 8192}, "ami": "ami-0e9271c829888680e", "architecture": "arm64"},
        "d": {"vcpu": {"min": 2}, "memory_mib": {"min": 4096}, "ami": "ami-0123456789abcdef0"}}})
    assert cfg.images() == ["ami-0123456789abcdef0", "ami-0e9271c829888680e"]
    assert [cfg.launch_template_for(c) for c in "abcd"] == [
        "runner-pool-ci", "runner-pool-ci-ami-0e9271c829888680e", "runner-pool-ci-ami-0e9271c829888680e",
        "runner-pool-ci"]


def test_the_spot_breaker_settings_are_typed_with_one_line_errors() -> None:
    cfg = parse_config({**BASE, "spotBreaker": {"interruptions": 2, "windowS": 600, "cooldownS": 900}})
    assert (cfg.spot_breaker.interruptions, cfg.spot_breaker.window_s, cfg.spot_breaker.cooldown_s) == (2, 600, 900)
    with pytest.raises(ConfigErrors) as exc:
        parse_config({**BASE, "spot_breaker": {"interruptions": 0}})
    assert [str(e) for e in exc.value.problems] == [
        "spot_breaker.interruptions: got 0: Input should be greater than or equal to 1"]
