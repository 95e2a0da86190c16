"""Pool controls in the config: warm minimum and its schedule, ceilings, run tag keys; cost tag input."""
from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from controlplane import costtags
from controlplane.config import WarmSchedule, parse_config
from controlplane.errors import ConfigError, ConfigErrors
from controlplane.records import State
from controlplane.state import TRANSITIONS
from controlplane.status import CLASS_STATES

SMALL = {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}}


def good(small: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "ci", "github": {"repository": "octo/repo"},
        "resource_classes": {"small": {**SMALL, **(small or {})}},
        "subnets": ["subnet-0123456789abcdef0"], "ami": "ami-0123456789abcdef0", "instance_profile": "runner",
    }
    base.update(overrides)
    return base


def problems(small: dict[str, Any] | None = None, **overrides: Any) -> list[str]:
    with pytest.raises(ConfigErrors) as err:
        parse_config(good(small, **overrides))
    return err.value.problems


def at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_no_controls_by_default() -> None:
    cfg = parse_config(good())
    rc = cfg.resource_classes["small"]
    assert (rc.min_idle, rc.min_idle_schedule, rc.max_instances, cfg.max_instances) == (0, None, None, None)
    assert cfg.run_tag_keys == ["repository", "workflow", "team"]


def test_a_minimum_without_a_schedule_applies_at_all_times() -> None:
    rc = parse_config(good({"min_idle": 3})).resource_classes["small"]
    assert rc.min_idle_at(at("2026-12-05T03:00")) == 3                  # a Saturday night


@pytest.mark.parametrize(("when", "zone", "expected"), [
    ("2026-12-02T08:59", "Europe/Berlin", 0),          # Wednesday, before the window
    ("2026-12-02T09:00", "Europe/Berlin", 2),
    ("2026-12-02T16:59", "Europe/Berlin", 2),
    ("2026-12-02T17:00", "Europe/Berlin", 0),          # end is exclusive
    ("2026-12-05T12:00", "Europe/Berlin", 0),          # Saturday
    ("2026-12-02T07:30", "UTC", 0),                    # 08:30 in Berlin (CET): not yet
    ("2026-12-02T08:30", "UTC", 2),                    # 09:30 in Berlin
])
def test_a_schedule_opens_the_minimum_on_its_days_and_hours_in_its_zone(when: str, zone: str, expected: int) -> None:
    schedule = {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00",
                "end": "17:00"}
    rc = parse_config(good({"min_idle": 2, "min_idle_schedule": schedule})).resource_classes["small"]
    assert rc.min_idle_at(at(when, zone)) == expected


def test_an_overnight_window_belongs_to_the_day_it_opens() -> None:
    s = WarmSchedule(timezone="UTC", days=["fri"], start="22:00", end="06:00")
    assert s.is_open(at("2026-12-04T23:00"))            # Friday night
    assert s.is_open(at("2026-12-05T05:59"))            # Saturday morning, still Friday's window
    assert not s.is_open(at("2026-12-05T22:30"))        # Saturday night: not a listed day
    assert not s.is_open(at("2026-12-04T05:00"))        # Friday morning: Thursday's window, not listed


@pytest.mark.parametrize(("small", "pool", "line"), [
    ({"min_idle": -1}, {}, "resource_classes.small.min_idle: got -1: Input should be greater than or equal to 0"),
    ({"min_idle": 3, "max_instances": 2}, {}, "min_idle (3) must be <= max_instances (2)"),
    ({"max_instances": 0}, {}, "resource_classes.small.max_instances: got 0"),
    ({"max_instances": True}, {}, "resource_classes.small.max_instances: got true: expected a whole number"),
    ({"min_idle": 2, "min_idle_schedule": {"timezone": "Mars/Olympus"}}, {},
     "resource_classes.small.min_idle_schedule.timezone: got \"Mars/Olympus\": unknown time zone"),
    ({"min_idle": 2, "min_idle_schedule": {"start": "25:00"}}, {},
     "resource_classes.small.min_idle_schedule.start: got \"25:00\": not allowed; expected local time the window "
     "opens, HH:MM"),
    ({"min_idle": 2, "min_idle_schedule": {"days": []}}, {}, "at least one day is required"),
    ({"min_idle": 2, "min_idle_schedule": {"start": "09:00", "end": "09:00"}}, {}, "the window would be empty"),
    ({"min_idle": 2}, {"ephemeral": True}, "resource_classes.small.min_idle: an ephemeral class is never reused"),
    ({"min_idle": 4}, {"max_instances": 3}, "max_instances (3) is below the classes' min_idle together (4)"),
    ({}, {"run_tag_keys": ["runner-pool:team"]}, "tag keys ['runner-pool:team'] are reserved"),
    ({}, {"run_tag_keys": ["team!"]}, "invalid tag key(s) ['team!']"),
    ({}, {"run_tag_keys": ["team", "team"]}, "tag keys must be unique"),
])
def test_a_bad_control_is_one_line_naming_the_field(small: dict[str, Any], pool: dict[str, Any], line: str) -> None:
    got = problems(small, **pool)
    assert len(got) == 1 and line in got[0], got


def test_cost_tags_of_a_provision_are_checked_against_the_pools_keys() -> None:
    cfg = parse_config(good())
    assert costtags.check(cfg, {"team": "platform", "repository": "octo/repo"}) == {
        "team": "platform", "repository": "octo/repo"}
    with pytest.raises(ConfigError, match="tag 'owner' is not a run tag key of pool ci"):
        costtags.check(cfg, {"owner": "me"})
    with pytest.raises(ConfigError, match="not a valid EC2 tag value"):
        costtags.check(cfg, {"team": "a;b"})
    with pytest.raises(ConfigError, match="not a valid EC2 tag value"):
        costtags.check(cfg, {"team": "x" * 257})
    assert costtags.parse_cli(["team=platform", "workflow=ci=1"]) == {"team": "platform", "workflow": "ci=1"}
    for bad in (["team"], ["=x"]):
        with pytest.raises(ConfigError, match="is not KEY=VALUE"):
            costtags.parse_cli(bad)
    with pytest.raises(ConfigError, match="given twice"):
        costtags.parse_cli(["team=a", "team=b"])
    assert costtags.run_tags("run-1", {"team": "x"}) == {"runner-pool:run-id": "run-1", "team": "x"}


def test_a_warm_instance_joins_the_pool_by_its_own_edge_and_status_shows_every_live_state() -> None:
    assert (State.CREATED, State.IDLE) in TRANSITIONS
    assert set(CLASS_STATES) == set(State) - {State.TERMINATED}
