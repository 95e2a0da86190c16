"""How selection splits one received batch of pool messages: keep, drop, give back. Plain data only."""
from __future__ import annotations

from controlplane.pool import PoolMessage
from controlplane.provision.selection import partition


def msg(iid: str, cls: str = "small", usage: str = "spot") -> PoolMessage:
    return PoolMessage(iid, cls, "c7i.large", usage, 0.0, receipt=f"r-{iid}")


def ids(msgs: list[PoolMessage]) -> list[str]:
    return [m.instance_id for m in msgs]


def test_a_batch_of_the_right_class_is_kept_up_to_the_count_and_the_rest_given_back() -> None:
    split = partition([msg("i-1"), msg("i-2"), msg("i-3")], "small", None, want=2)
    assert (ids(split.keep), ids(split.drop), ids(split.back)) == (["i-1", "i-2"], [], ["i-3"])


def test_a_duplicate_delivery_and_a_message_of_another_class_are_dropped() -> None:
    split = partition([msg("i-1"), msg("i-1"), msg("i-9", cls="large")], "small", None, want=5)
    assert (ids(split.keep), ids(split.drop), ids(split.back)) == (["i-1"], ["i-1", "i-9"], [])


def test_another_usage_class_goes_back_for_another_run_when_one_is_asked_for() -> None:
    batch = [msg("i-1", usage="on-demand"), msg("i-2", usage="spot")]
    split = partition(batch, "small", "spot", want=2)
    assert (ids(split.keep), ids(split.drop), ids(split.back)) == (["i-2"], [], ["i-1"])
    assert ids(partition(batch, "small", None, want=2).keep) == ["i-1", "i-2"]   # no usage class: any


def test_a_batch_all_for_someone_else_keeps_nothing() -> None:
    split = partition([msg("i-1", usage="on-demand")], "small", "spot", want=1)
    assert split.keep == [] and ids(split.back) == ["i-1"]
