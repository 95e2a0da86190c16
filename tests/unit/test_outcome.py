"""The outcome decision and how a failure is rendered: pure functions over the phases' records."""
from __future__ import annotations

from controlplane.errors import CapacityError, RollbackIncomplete, ValidationFailed, ValidationTimeout
from controlplane.provision import ProvisionResult
from controlplane.provision.creation import CreationResult
from controlplane.provision.finalize import Commit, Rollback, decide
from controlplane.provision.selection import SelectionResult
from controlplane.provision.validation import ValidationResult
from controlplane.records import Member
from controlplane.termination import Cleanup
from dynamic_providers.runner_fleet import failure_error


def member(iid: str, source: str) -> Member:
    return Member(iid, f"arn:aws:ec2:us-east-1:123456789012:instance/{iid}", source, "m7i.large", "subnet-1",
                  "on-demand", "small")


POOLED = [member("i-p1", "pool"), member("i-p2", "pool")]
SICK = [member("i-sick", "pool")]
NEW = [member("i-c1", "created")]
ALL_IDS = ["i-p1", "i-p2", "i-c1"]


def test_a_capacity_shortfall_rolls_back_before_validation_keeping_the_pooled_runners() -> None:
    cr = CreationResult(NEW, {"InsufficientInstanceCapacity": 2}, fleet_calls=2, shortfall=2, fell_back=True,
                        requested=3)
    out = decide(SelectionResult(POOLED, SICK), cr, None)
    assert isinstance(out, Rollback) and isinstance(out.failure, CapacityError)
    assert out.keep == POOLED and out.doomed == NEW + SICK
    assert out.failure.message == ("EC2 could not supply 2 of 3 instance(s) (InsufficientInstanceCapacity x2); "
                                   "on-demand fallback was tried")


def test_a_whole_ready_set_commits_and_the_unhealthy_claims_are_retired() -> None:
    val = ValidationResult(ready=ALL_IDS, healthy=set(ALL_IDS), ids=ALL_IDS, timeout_s=60)
    out = decide(SelectionResult(POOLED, SICK), CreationResult(NEW, requested=1), val)
    assert out == Commit(POOLED + NEW, SICK)


def test_one_failed_member_sends_the_healthy_pooled_back_and_terminates_the_rest() -> None:
    val = ValidationResult(ready=["i-p1"], failed={"i-p2": "heartbeat stopped (40 s old)"}, healthy={"i-p1"},
                           ids=ALL_IDS, timeout_s=60)
    out = decide(SelectionResult(POOLED, SICK), CreationResult(NEW, requested=1), val)
    assert isinstance(out, Rollback) and isinstance(out.failure, ValidationFailed)
    assert out.keep == POOLED[:1] and out.doomed == NEW + SICK + POOLED[1:]
    assert out.failure.failed == {"i-p2": "heartbeat stopped (40 s old)"}
    assert out.failure.message == "1 of 3 runner(s) failed validation: i-p2: heartbeat stopped (40 s old)"


def test_a_timeout_names_the_ready_and_the_missing() -> None:
    val = ValidationResult(ready=["i-p1", "i-p2"], timed_out=True, healthy={"i-p1", "i-p2"}, ids=ALL_IDS,
                           timeout_s=90)
    out = decide(SelectionResult(POOLED), CreationResult(NEW, requested=1), val)
    assert isinstance(out, Rollback) and isinstance(out.failure, ValidationTimeout)
    assert (out.failure.ready, out.failure.missing) == (["i-p1", "i-p2"], ["i-c1"])
    assert out.failure.message == "only 2 of 3 runner(s) registered within 90 s (1 missing)"
    assert out.keep == POOLED and out.doomed == NEW


def result(cleanup: Cleanup) -> ProvisionResult:
    return ProvisionResult(False, "run-1", "run-1", "small", "on-demand", cleanup=cleanup,
                           failure=ValidationTimeout(["i-p1"], ["i-c1"], 90))


def test_the_provider_error_is_one_line_from_the_failure_and_the_cleanup() -> None:
    err = failure_error(result(Cleanup(terminated=["i-c1"], returned_to_pool=["i-p1"])))
    assert not isinstance(err, RollbackIncomplete)
    assert str(err) == ("only 1 of 2 runner(s) registered within 90 s (1 missing); "
                        "rolled back: 1 terminated, 1 returned to the pool")


def test_a_rollback_that_left_instances_is_rollback_incomplete_naming_them() -> None:
    err = failure_error(result(Cleanup(returned_to_pool=["i-p1"], failed=["i-c1"])))
    assert isinstance(err, RollbackIncomplete) and err.leftover_ids == ["i-c1"]
    assert "\n" not in str(err) and "1 left for reconcile (i-c1)" in str(err) and "runner-pool reconcile" in str(err)


def test_the_cli_summary_renders_the_same_failure() -> None:
    text = result(Cleanup(terminated=["i-c1"], returned_to_pool=["i-p1"])).summary()
    assert text.splitlines()[0] == ("provision of run run-1 failed: "
                                    "only 1 of 2 runner(s) registered within 90 s (1 missing)")
