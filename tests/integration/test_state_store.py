"""The state machine over the emulator's DynamoDB: every edge, lost races, pagination."""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from controlplane import aws, store
from controlplane.config import parse_config
from controlplane.records import InstanceRecord, State
from controlplane.state import TERMINATED_RETENTION_S, TRANSITIONS, Move, transition, transition_together
from controlplane.store import Pool
from tests.conftest import pool_config_dict


@pytest.fixture
def pool(local: dict[str, Any]) -> Pool:
    cfg = parse_config(pool_config_dict(local))
    store.ensure_table(cfg)
    acct, part = aws.account_and_partition(cfg.region)
    p = Pool(cfg, acct, part)
    yield p
    store.delete_table(cfg)


def row(pool: Pool, state: State, run_id: str | None = None, threshold_in: float = 300, iid: str | None = None
        ) -> InstanceRecord:
    iid = iid or f"i-{uuid.uuid4().hex[:17]}"
    now = time.time()
    r = InstanceRecord(arn=pool.arn(iid), state=state, threshold=now + threshold_in, resource_class="small",
                       instance_type="c5a.large", usage_class="on-demand", subnet_id="subnet-1", launched_at=now,
                       run_id=run_id)
    store.put_record(pool, r)
    return r


def move(pool: Pool, r: InstanceRecord, to: State, run_id: Any, **kw: Any) -> Any:
    now = time.time()
    return transition(pool, r.instance_id, from_=r.state, to=to, expect_run=run_id, now=now, **kw)


@pytest.mark.parametrize("edge", sorted(TRANSITIONS, key=lambda e: (e[0].value, e[1].value)),
                         ids=lambda e: f"{e[0]}-{e[1]}")
def test_every_transition_in_the_table_wins_when_the_row_is_as_expected(pool: Pool, edge: tuple[State, State]) -> None:
    from_, to = edge
    run = None if from_ in (State.IDLE, State.DRAINING) else "run-1"
    r = row(pool, from_, run)
    new_run: Any = "run-2" if (from_, to) == (State.IDLE, State.CLAIMED) else (None if to in (
        State.DRAINING, State.TERMINATED) else run)
    t = move(pool, r, to, run, set_run=new_run)
    assert t.won, t.reason
    got = store.get_record(pool, r.instance_id)
    assert got is not None and got.state is to and got.version == 2
    assert got.run_id == new_run
    if to is State.TERMINATED:
        assert got.expires_at is not None and got.expires_at >= time.time() + TERMINATED_RETENTION_S - 5


def test_an_edge_not_in_the_table_is_refused_before_any_call(pool: Pool) -> None:
    r = row(pool, State.IDLE)
    with pytest.raises(ValueError, match="no transition idle -> running"):
        move(pool, r, State.RUNNING, None)


@pytest.mark.parametrize("case,reason", [
    ("wrong_state", "state is running, not idle"),
    ("wrong_run", "run is run-x, not none"),
    ("expired", "threshold passed"),
    ("missing", "no such row"),
])
def test_a_lost_race_is_a_value_that_says_why(pool: Pool, case: str, reason: str) -> None:
    if case == "wrong_state":
        r = row(pool, State.RUNNING)
    elif case == "wrong_run":
        r = row(pool, State.IDLE, run_id="run-x")
    elif case == "expired":
        r = row(pool, State.IDLE, threshold_in=-5)
    else:
        r = InstanceRecord(arn=pool.arn("i-0000000000000dead"), state=State.IDLE, threshold=0, resource_class="s",
                           instance_type="t", usage_class="on-demand", subnet_id="s", launched_at=0)
    t = transition(pool, r.instance_id, from_=State.IDLE, to=State.CLAIMED, expect_run=None, set_run="run-1",
                   now=time.time())
    assert not t.won and t.reason == reason
    if case != "missing":
        assert store.get_record(pool, r.instance_id) == t.record          # untouched, and reported as it is


def _race(pool: Pool, ids: list[str], threads: int) -> dict[str, list[str]]:
    barrier = threading.Barrier(threads)
    winners: dict[str, list[str]] = {i: [] for i in ids}
    lock = threading.Lock()

    def claimer(n: int) -> None:
        barrier.wait()
        for iid in ids[n % len(ids):] + ids[:n % len(ids)]:
            now = time.time()
            t = transition(pool, iid, from_=State.IDLE, to=State.CLAIMED, expect_run=None, set_run=f"run-{n}",
                           now=now)
            if t.won:
                with lock:
                    winners[iid].append(f"run-{n}")
                return

    ts = [threading.Thread(target=claimer, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return winners


def test_two_threads_claiming_one_idle_row_exactly_one_wins_200_times(pool: Pool) -> None:
    doubles = 0
    for _ in range(200):
        r = row(pool, State.IDLE)
        won = _race(pool, [r.instance_id], 2)[r.instance_id]
        assert len(won) >= 1
        doubles += len(won) > 1
        got = store.get_record(pool, r.instance_id)
        assert got is not None and got.state is State.CLAIMED and got.run_id == won[0]
    assert doubles == 0


def test_32_threads_racing_on_16_idle_rows_give_16_distinct_winners(pool: Pool) -> None:
    ids = [row(pool, State.IDLE).instance_id for _ in range(16)]
    winners = _race(pool, ids, 32)
    assert all(len(w) == 1 for w in winners.values()), winners
    runs = [w[0] for w in winners.values()]
    assert len(set(runs)) == 16                                  # no thread holds two rows
    rows = store.read_set(pool, ids)
    assert {rows[i][0].run_id for i in ids} == set(runs)         # the table agrees with the winners


def test_queries_page_through_more_than_a_megabyte_of_rows(pool: Pool) -> None:
    ddb = aws.client("dynamodb", pool.region)
    pad = "x" * 1200
    n = 1000
    reqs = []
    for k in range(n):
        r = InstanceRecord(arn=pool.arn(f"i-{k:017x}"), state=State.IDLE, threshold=time.time() - 1,
                           resource_class="small", instance_type="c5a.large", usage_class="on-demand",
                           subnet_id="subnet-1", launched_at=time.time(), run_id="big-run" if k % 2 else None)
        item = r.to_item()
        item["pad"] = {"S": pad}
        reqs.append({"PutRequest": {"Item": item}})
    store._batch_write(pool, reqs)
    pages = list(ddb.get_paginator("scan").paginate(TableName=pool.table))
    assert len(pages) > 1                                         # the emulator pages at 1 MB like DynamoDB
    assert len(store.all_records(pool)) == n
    assert len(store.records_in_state(pool, State.IDLE, threshold_before=time.time())) == n
    assert len(store.run_records(pool, "big-run")) == n // 2


def test_a_resent_write_that_had_already_landed_counts_as_won_not_as_a_lost_race(pool: Pool) -> None:
    # botocore resends a request whose connection dropped; if the first attempt landed, the resend's
    # condition fails on our own result. Same call (same ``now``): won. Anyone else's call: lost.
    r = row(pool, State.IDLE)
    now = time.time()
    claim = dict(from_=State.IDLE, to=State.CLAIMED, expect_run=None, set_run="run-a")
    first = transition(pool, r.instance_id, now=now, **claim)
    resent = transition(pool, r.instance_id, now=now, **claim)
    assert first.won and resent.won
    assert resent.record is not None and resent.record.run_id == "run-a" and resent.record.version == 2
    rival = transition(pool, r.instance_id, now=now, **{**claim, "set_run": "run-b"})
    later = transition(pool, r.instance_id, now=now + 1, **claim)
    assert rival.lost and later.lost
    got = store.get_record(pool, r.instance_id)
    assert got is not None and got.run_id == "run-a" and got.version == 2


def transactions(emu: Any) -> int:
    return int(emu.requests()["counts"].get("dynamodb.TransactWriteItems", 0))


def test_rows_moved_together_land_in_one_transaction_per_hundred(pool: Pool, emu: Any) -> None:
    rows = [row(pool, State.CLAIMED, "run-t") for _ in range(120)]
    before = transactions(emu)
    now = time.time()
    lost = transition_together(pool, [Move(r.instance_id, State.CLAIMED, count_reuse=True) for r in rows],
                               to=State.RUNNING, expect_run="run-t", now=now)
    assert lost == {}
    assert transactions(emu) - before == 2                       # 100 + 20: AWS's limit per transaction
    got = store.read_set(pool, [r.instance_id for r in rows])
    for r in rows:
        rec = got[r.instance_id][0]
        assert rec is not None and rec.state is State.RUNNING and rec.run_id == "run-t" and rec.version == 2
        assert rec.reuse_count == 1 and rec.threshold == pytest.approx(now + pool.config.max_runtime_s, abs=0.01)


def test_a_row_that_moved_on_cancels_the_transaction_and_only_that_row_loses(pool: Pool, emu: Any) -> None:
    rows = [row(pool, State.IDLE) for _ in range(4)]
    rival = move(pool, rows[2], State.CLAIMED, None, set_run="run-rival")         # a stale message's row
    assert rival.won
    before = transactions(emu)
    lost = transition_together(pool, [Move(r.instance_id, State.IDLE) for r in rows], to=State.CLAIMED,
                               expect_run=None, set_run="run-mine", now=time.time())
    assert transactions(emu) - before == 1                       # cancelled whole, then row by row
    assert list(lost) == [rows[2].instance_id] and lost[rows[2].instance_id].reason == "state is claimed, not idle"
    got = store.read_set(pool, [r.instance_id for r in rows])
    assert {i: (r.state, r.run_id) for i, (r, _) in got.items() if r} == {
        **{r.instance_id: (State.CLAIMED, "run-mine") for r in rows if r is not rows[2]},
        rows[2].instance_id: (State.CLAIMED, "run-rival")}


def test_a_resent_transaction_that_had_already_landed_loses_nothing(pool: Pool) -> None:
    # botocore resends after a lost answer (on AWS its ClientRequestToken makes that a no-op; moto has
    # no idempotency): the resend is cancelled by our own writes, and row by row they count as won.
    rows = [row(pool, State.CLAIMED, "run-t") for _ in range(3)]
    moves = [Move(r.instance_id, State.CLAIMED) for r in rows]
    now = time.time()
    assert transition_together(pool, moves, to=State.RUNNING, expect_run="run-t", now=now) == {}
    assert transition_together(pool, moves, to=State.RUNNING, expect_run="run-t", now=now) == {}
    later = transition_together(pool, moves, to=State.RUNNING, expect_run="run-t", now=now + 1)
    assert sorted(later) == sorted(r.instance_id for r in rows)   # anyone else's write: lost
    assert all(r.version == 2 for r, _ in store.read_set(pool, [r.instance_id for r in rows]).values() if r)


def test_moving_rows_together_refuses_a_bad_edge_and_terminated_before_any_call(pool: Pool, emu: Any) -> None:
    rows = [row(pool, State.IDLE) for _ in range(2)]
    before = transactions(emu)
    with pytest.raises(ValueError, match="no transition idle -> running"):
        transition_together(pool, [Move(rows[0].instance_id, State.IDLE), Move(rows[1].instance_id, State.RUNNING)],
                            to=State.RUNNING, expect_run=None, now=time.time())
    with pytest.raises(ValueError, match="ceilings"):
        transition_together(pool, [Move(r.instance_id, State.IDLE) for r in rows], to=State.TERMINATED,
                            expect_run=None, now=time.time())
    assert transactions(emu) == before
    assert {r.state for r, _ in store.read_set(pool, [r.instance_id for r in rows]).values() if r} == {State.IDLE}
