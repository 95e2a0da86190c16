"""Scale: refresh and reconcile over pages of rows miss nothing and touch nothing healthy.

The pool is planted by ``scale_fixture`` (the same mix ``bench/scale.py`` times at 10,000
rows) on an emulator and GitHub stand-in of the test's own, in this process, with no
simulator: thousands of instances must not mean thousands of agents. ``ROWS`` is the
smallest round size whose reads cross a page: reconcile's table Scan crosses DynamoDB's
1 MB page (a state row is about 340 bytes, an agent row about 200: about 1,900 rows of
table a page) and its DescribeInstances crosses EC2's (moto returns 100 reservations a
page, ``BATCH`` instances a reservation). The test asserts that both did, so it cannot pass
by reading one page of a small table. Refresh's ``by_state`` queries go through the same
pager (``store._paginate``); an idle query crosses its page only above about 2,900 idle
rows, which the 10,000-row benchmark reaches and this test, to stay short, does not.

No timings here (``bench/scale.py`` measures); only outcomes: which rows, instances and
runners were acted on, item by item, and the reliability suite's invariants at the end.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from controlplane import aws, launch_template, store
from controlplane.apply import apply_pool, pool_instance_ids
from controlplane.local.emulator import REQUESTS
from controlplane.reconcile import ORPHAN_GRACE_S, Action, ReconcileResult, reconcile
from controlplane.refresh import RefreshResult, refresh
from tests.reliability import invariants
from tests.reliability.scale_fixture import (
    KINDS,
    Planted,
    World,
    ahead_clock,
    check_end_state,
    check_reconcile,
    check_refresh,
    counts_for,
    expected_actions,
    expected_expired,
    local_world,
    plant,
    pool_config,
)

ROWS = 3000           # about 1.6 MB of state and agent rows: two Scan pages
BATCH = 10            # 3,060 instances in 306 reservations: four DescribeInstances pages


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with local_world() as w:
        yield w


def counted(fn: Any) -> tuple[Any, dict[str, int]]:
    with aws.counted() as counter:
        return fn(), counter.snapshot()


@pytest.mark.timeout(900)    # pages of rows through moto on a busy 2-core machine: 300 s was seen exceeded
def test_refresh_and_reconcile_over_pages_of_rows_act_on_every_planted_item_and_nothing_else(
        world: World) -> None:
    gh, clock = world.client, ahead_clock()
    cfg = pool_config(world, "scaletest")
    apply_pool(cfg, github=gh)
    pool = store.load_pool(cfg.name, cfg.region)
    planted = plant(pool, world, ROWS, batch=BATCH, clock=clock)
    assert planted.rows_total == ROWS

    refreshed = refresh(cfg, github=gh, clock=clock, run_reconcile=False)
    reconciled, reconcile_calls = counted(lambda: reconcile(pool, github=gh, clock=clock))

    assert check_refresh(planted, refreshed) == []
    assert check_reconcile(planted, reconciled) == []
    # The reads crossed pages, or this test would prove nothing about pagination.
    assert reconcile_calls["dynamodb.Scan"] >= 2, f"reconcile read one Scan page: {reconcile_calls}"
    assert reconcile_calls["ec2.DescribeInstances"] >= 2, f"reconcile read one EC2 page: {reconcile_calls}"

    again = refresh(cfg, github=gh, clock=clock)                       # the scheduled run: both, quietly
    assert check_refresh(planted, again, acting=False) == []
    assert again.reconcile is not None and check_reconcile(planted, again.reconcile, acting=False) == []

    problems, counts = check_end_state(planted, world)
    assert problems == []
    healthy = sum(planted.counts[k] for k in ("idle", "running", "draining", "claimed", "created"))
    assert counts["live_rows"] == counts["live_instances"] == healthy
    invariants.check(pool, world, settle_s=0)        # no agents: nothing left to settle


def _fake_planted() -> Planted:
    counts = counts_for(300)
    ids = {k.name: [f"i-{k.name}-{j}" for j in range(counts[k.name])] for k in KINDS}
    runners = {k.name: {iid: 1000 * n + j for j, iid in enumerate(ids[k.name])}
               for n, k in enumerate(KINDS) if k.runner}
    return Planted(pool=None, now=0.0, counts=counts, ids=ids, runners=runners)  # type: ignore[arg-type]


def test_the_checks_report_one_missed_and_one_extra_item() -> None:
    p = _fake_planted()
    expired = {k: sorted(v) for k, v in expected_expired(p).items()}
    expired["idle"] = expired["idle"][1:]                              # one expired idle row left alive
    expired.setdefault("running", []).append(p.ids["running"][0])      # one healthy running row expired
    problems = check_refresh(p, RefreshResult("p", expired=expired))
    assert any("expired[idle]: 1 missed" in x for x in problems)
    assert any("expired[running]: 1 unexpected" in x for x in problems)

    actions = [Action(kind, target, "planted") for kind, target in sorted(expected_actions(p))]
    res = ReconcileResult(dry_run=False, actions=actions[1:], applied=actions[1:])
    assert any("found: 1 missed" in x for x in check_reconcile(p, res))
    assert check_reconcile(p, ReconcileResult(False, actions=actions, applied=actions)) == []
    assert check_reconcile(p, ReconcileResult(False), acting=False) == []


class _ProgressClock:
    """Time that moves ``per_request_s`` per request the emulator serves: a slow snapshot, no sleeping."""

    def __init__(self, start: float, per_request_s: float) -> None:
        self.start, self.per_request_s = start, per_request_s
        self.base = REQUESTS.snapshot()["total"]

    def now(self) -> float:
        return self.start + self.per_request_s * (REQUESTS.snapshot()["total"] - self.base)

    def monotonic(self) -> float:
        return self.now()

    def sleep(self, s: float) -> None:
        pass


def test_an_instance_young_when_reconcile_reads_the_table_is_not_an_orphan_however_long_the_reads_take(
        world: World) -> None:
    """At scale the snapshot takes long (pages of rows, of instances, of runners). An instance launched
    shortly before it began may get its row only after the table was read; its age must be judged at
    that moment, not after the last page, or a provision's fresh instance is terminated as an orphan."""
    cfg = pool_config(world, "slowsnap")
    apply_pool(cfg, github=world.client)
    pool = store.load_pool(cfg.name, cfg.region)
    ec2 = aws.client("ec2", pool.region)
    tags = [{"Key": k, "Value": v} for k, v in launch_template.instance_tags(cfg).items()]
    inst = ec2.run_instances(ImageId=cfg.ami, InstanceType="c5a.large", MinCount=1, MaxCount=1,
                             SubnetId=world.subnets[0],
                             TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"][0]
    launched = inst["LaunchTime"].timestamp()
    # Young by 5 s when reconcile starts; every request of the snapshot then takes 10 s.
    clock = _ProgressClock(launched + ORPHAN_GRACE_S - 5, per_request_s=10)
    res = reconcile(pool, github=world.client, clock=clock)
    assert res.actions == []
    assert inst["InstanceId"] in pool_instance_ids(cfg)
