"""Reconcile's plan is pure: drift in, actions out, no I/O."""
from __future__ import annotations

from controlplane.github import GitHubRunner
from controlplane.reconcile import ORPHAN_GRACE_S, Ec2Instance, Snapshot, plan
from controlplane.records import InstanceRecord, State

NOW = 1_000_000.0


def rec(iid: str, state: State, run: str | None = None) -> InstanceRecord:
    return InstanceRecord(arn=f"arn:aws:ec2:us-east-1:123:instance/{iid}", state=state, threshold=NOW + 60,
                          resource_class="small", instance_type="c5a.large", usage_class="on-demand",
                          subnet_id="subnet-1", launched_at=NOW - 600, run_id=run)


def inst(iid: str, age_s: float = 600, state: str = "running") -> Ec2Instance:
    return Ec2Instance(iid, state, NOW - age_s)


def runner(rid: int, name: str, labels: tuple[str, ...] = ("runner-pool-p",)) -> GitHubRunner:
    return GitHubRunner(rid, name, "offline", False, labels)


def kinds(actions: list) -> list[tuple[str, str]]:
    return sorted((a.kind, a.target) for a in actions)


def test_no_drift_means_no_action() -> None:
    snap = Snapshot([rec("i-a", State.IDLE)], [inst("i-a")], [runner(1, "i-a-1")], NOW, "runner-pool-p")
    assert plan(snap) == []


def test_an_instance_with_no_row_is_terminated_after_the_grace_period_only() -> None:
    snap = Snapshot([], [inst("i-old"), inst("i-new", age_s=ORPHAN_GRACE_S / 2)], None, NOW)
    assert kinds(plan(snap)) == [("terminate_instance", "i-old")]


def test_an_instance_whose_row_says_terminated_is_terminated() -> None:
    snap = Snapshot([rec("i-a", State.TERMINATED)], [inst("i-a")], None, NOW)
    assert kinds(plan(snap)) == [("terminate_instance", "i-a")]


def test_a_live_row_whose_instance_is_gone_is_closed() -> None:
    snap = Snapshot([rec("i-a", State.RUNNING, "r1"), rec("i-b", State.IDLE)],
                    [inst("i-a", state="terminated")], None, NOW)
    acts = plan(snap)
    assert kinds(acts) == [("close_row", "i-a"), ("close_row", "i-b")]
    assert acts[0].state == "running" and acts[0].run_id == "r1"


def test_a_runner_with_no_live_instance_is_removed_but_other_pools_runners_are_left_alone() -> None:
    snap = Snapshot([rec("i-a", State.IDLE)], [inst("i-a")],
                    [runner(1, "i-a-1"), runner(2, "i-gone-1"), runner(3, "i-x-1", labels=("other",)),
                     runner(4, "laptop")], NOW, "runner-pool-p")
    assert kinds(plan(snap)) == [("delete_runner", "2"), ("delete_runner", "4")]


def test_without_github_access_runners_are_not_judged() -> None:
    snap = Snapshot([rec("i-a", State.IDLE)], [inst("i-a")], None, NOW, "runner-pool-p")
    assert plan(snap) == []


def test_the_runner_of_an_instance_being_terminated_goes_in_the_same_pass() -> None:
    snap = Snapshot([], [inst("i-orphan")], [runner(7, "i-orphan-1")], NOW, "runner-pool-p")
    assert kinds(plan(snap)) == [("delete_runner", "7"), ("terminate_instance", "i-orphan")]


def young(iid: str, state: State, age_s: float) -> InstanceRecord:
    r = rec(iid, state, "r1")
    return InstanceRecord(**{**r.__dict__, "launched_at": NOW - age_s})


def test_a_young_row_whose_instance_ec2_does_not_list_yet_is_left_alone() -> None:
    from controlplane.reconcile import VISIBILITY_GRACE_S

    snap = Snapshot([young("i-new", State.CREATED, VISIBILITY_GRACE_S / 4),
                     young("i-old", State.CREATED, VISIBILITY_GRACE_S + 1)], [], None, NOW)
    assert kinds(plan(snap)) == [("close_row", "i-old")]


def test_a_young_row_whose_instance_ec2_lists_as_shutting_down_is_closed() -> None:
    snap = Snapshot([young("i-new", State.RUNNING, 5)], [inst("i-new", age_s=5, state="shutting-down")], None, NOW)
    assert kinds(plan(snap)) == [("close_row", "i-new")]


def test_a_pooled_runner_with_no_label_counts_as_this_pools_only_when_named_after_its_instance() -> None:
    # Idle pooled runners wait without any label: attribute them by name to an instance this pool knows.
    snap = Snapshot([rec("i-a", State.IDLE), rec("i-dead", State.TERMINATED)], [inst("i-a")],
                    [runner(1, "i-a-1", labels=()), runner(2, "i-dead-1", labels=()),
                     runner(3, "i-stranger-1", labels=())], NOW, "runner-pool-p")
    assert kinds(plan(snap)) == [("delete_runner", "2")]           # i-stranger may be another pool's
