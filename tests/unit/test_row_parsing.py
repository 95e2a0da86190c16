"""Reading rows: anything that is not a row this version wrote is UnreadableRow, never a crash."""
from __future__ import annotations

from typing import Any

import pytest

from controlplane.records import AgentRecord, InstanceRecord, State, UnreadableRow

ARN = "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0"


def state_row(**attrs: Any) -> dict[str, Any]:
    base = InstanceRecord(arn=ARN, state=State.IDLE, threshold=10.0, resource_class="small", instance_type="c7i.large",
                          usage_class="spot", subnet_id="subnet-1", launched_at=1.0).to_item()
    base.update(attrs)
    return base


def agent_row(**attrs: Any) -> dict[str, Any]:
    return {"pk": {"S": f"agent#{ARN}"}, "sk": {"S": "agent"}, "heartbeat_at": {"N": "5"}, **attrs}


def test_a_good_state_row_and_agent_row_read_back() -> None:
    assert InstanceRecord.from_item(state_row()).state is State.IDLE
    assert AgentRecord.from_item(agent_row()).heartbeat_at == 5.0


@pytest.mark.parametrize("junk", [
    {"launched_at": {"S": "x"}}, {"threshold": {"S": "soon"}}, {"state": {"S": "owned"}}, {"reuse_count": {"S": "1e9"}},
    {"run_id": {"N": "7"}}, {"pk": {"S": "pool"}}, {"sk": {"S": "agent"}}, {"launched_at": {"N": "NaN-ish"}},
])
def test_a_state_row_with_junk_is_unreadable(junk: dict[str, Any]) -> None:
    with pytest.raises(UnreadableRow):
        InstanceRecord.from_item(state_row(**junk))


def test_a_state_row_missing_its_state_is_unreadable() -> None:
    item = state_row()
    del item["state"]
    with pytest.raises(UnreadableRow, match="state"):
        InstanceRecord.from_item(item)


@pytest.mark.parametrize("junk", [
    {"heartbeat_at": {"S": "x"}}, {"signal_at": {"BOOL": True}}, {"runner_name": {"N": "1"}}, {"sk": {"S": "state"}},
    {"pk": {"S": ARN}},
])
def test_an_agent_row_with_junk_is_unreadable(junk: dict[str, Any]) -> None:
    with pytest.raises(UnreadableRow):
        AgentRecord.from_item(agent_row(**junk))


def test_an_unknown_signal_reads_as_none() -> None:
    assert AgentRecord.from_item(agent_row(signal={"S": "from-the-future"})).signal is None
