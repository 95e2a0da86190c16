"""Why validation refuses a member, from its two rows: plain records, no table."""
from __future__ import annotations

import pytest

from controlplane.provision.validation import Verdict, judge
from controlplane.records import AgentRecord, InstanceRecord, Signal, State

ARN = "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"
NOW = 1000.0
STALE_S = 30.0


def row(run: str | None = "run-1", state: State = State.CLAIMED) -> InstanceRecord:
    return InstanceRecord(ARN, state, NOW + 300, "small", "c7i.large", "spot", "subnet-1", NOW - 60, run_id=run)


def agent(signal: Signal | None = Signal.REGISTERED, run: str = "run-1", beat_age_s: float | None = 1.0,
          detail: str | None = None) -> AgentRecord:
    beat = None if beat_age_s is None else NOW - beat_age_s
    return AgentRecord(ARN, heartbeat_at=beat, signal=signal, signal_run=run, detail=detail)


def verdict(record: InstanceRecord | None, a: AgentRecord | None, seen: bool = False) -> Verdict:
    return judge(record, a, "run-1", NOW, STALE_S, seen)


def test_registered_for_the_run_with_a_fresh_heartbeat_is_ready() -> None:
    assert verdict(row(), agent()) == Verdict(healthy=True, ready=True)


def test_registered_for_another_run_is_healthy_but_not_ready() -> None:
    assert verdict(row(), agent(run="run-0")) == Verdict(healthy=True, ready=False)


def test_no_agent_row_yet_is_still_booting_not_a_failure() -> None:
    assert verdict(row(), None) == Verdict()


@pytest.mark.parametrize(("record", "a", "seen", "reason"), [
    (None, None, False, "its state row is gone"),
    (row(run="run-2", state=State.IDLE), None, False, "its row now belongs to run-2"),
    (row(run=None, state=State.IDLE), None, False, "its row now belongs to no run"),
    (row(), agent(Signal.REGISTRATION_FAILED, detail="token expired"), False, "token expired"),
    (row(), agent(Signal.PRERUNNER_FAILED, run="run-0"), False, "prerunner_failed"),
    (row(), agent(Signal.SHUTDOWN), False, "shutdown"),
    (row(), agent(beat_age_s=45.0), True, "heartbeat stopped (45 s old)"),
])
def test_each_failure_names_its_reason(record: InstanceRecord | None, a: AgentRecord | None, seen: bool,
                                       reason: str) -> None:
    found = verdict(record, a, seen)
    assert found.failed is not None and reason in found.failed, found
    assert not found.ready


def test_a_stale_heartbeat_fails_only_once_one_was_seen() -> None:
    assert verdict(row(), agent(beat_age_s=45.0), seen=False) == Verdict()     # slow boot: keep waiting
    assert verdict(row(), agent(Signal.BOOTING, beat_age_s=None), seen=True).failed == "no heartbeat"
