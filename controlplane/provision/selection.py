"""Selection: claim idle runners from the class's pool queue.

Input: the pool, the run, how many runners are wanted. Output: the instances
this run now holds in ``claimed`` (healthy at claim time), the unhealthy ones
it claimed and must terminate, and counts of what it saw.

How: receive up to 10 messages (SQS's maximum per call; the first receive
long-polls briefly, later ones don't wait); when that finds the pool warm
and more are wanted, receive the rest at once in parallel calls (SQS often
returns fewer messages than asked, so waiting for a full batch would be five
rounds for a run of 50), so a warm run of 50 costs two round trips and a cold
pool one receive; claim every candidate with its conditional idle->claimed
write, all of a batch's writes in one DynamoDB transaction
(:func:`controlplane.state.transition_together`; a stale message cancels it,
and then the writes go row by row, so only that claim loses); delete each
message once its claim is decided (won, or lost because the row moved on: a stale message); give back
at once the valid messages this run did not need. Claimed instances are
checked in one batch read: a stale heartbeat (or a failure signal) means the
instance is terminated and another candidate is taken, without waiting on the
others. The loop ends when enough are claimed, the queue is empty, or the
deadline passes; whatever is missing is left to creation.

With ``fresh_registration`` the claim itself hands the agent what it
registers with: the winning idle->claimed write also puts the pool's
registration token into that row (``registration``), so a claimed runner
costs no extra write; the commit or rollback takes it out again. Otherwise
the claim carries no credential: the listening runner is relabelled
(``relabel.py``), and the agent rows read for the health check (kept in
``agents``) say which runner that is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from controlplane import aws, interruptions, stopped_tier, store
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock, Deadline
from controlplane.logs import event
from controlplane.pool import PoolMessage
from controlplane.provision.attempt import Touched
from controlplane.records import AgentRecord, Member, Signal, State
from controlplane.state import Move, transition_together
from controlplane.store import Pool

SELECTION_TIMEOUT_S = 20


@dataclass(frozen=True)
class SelectionResult:
    claimed: list[Member] = field(default_factory=list)       # healthy, ``claimed`` for the run
    unhealthy: list[Member] = field(default_factory=list)     # claimed, but must be terminated
    received: int = 0
    stale_dropped: int = 0
    lost_races: int = 0
    given_back: int = 0
    agents: dict[str, AgentRecord | None] = field(default_factory=dict)   # the health read, by instance id


@dataclass
class _Tally:
    received: int = 0
    stale_dropped: int = 0
    lost_races: int = 0
    given_back: int = 0


@dataclass(frozen=True)
class Partition:
    """What selection does with one batch of pool messages."""

    keep: list[PoolMessage]                 # try to claim these, at most ``want``
    drop: list[PoolMessage]                 # duplicate delivery, or a message in the wrong queue: delete
    back: list[PoolMessage]                 # valid, but another usage class or more than needed: give back


def partition(msgs: list[PoolMessage], resource_class: str, usage_class: str | None, want: int) -> Partition:
    """Split a received batch, first come first kept; no I/O."""
    candidates: list[PoolMessage] = []
    drop: list[PoolMessage] = []
    back: list[PoolMessage] = []
    seen: set[str] = set()
    for m in msgs:
        if m.instance_id in seen or m.resource_class != resource_class:
            drop.append(m)
        elif usage_class is not None and m.usage_class != usage_class:
            back.append(m)
        else:
            seen.add(m.instance_id)
            candidates.append(m)
    return Partition(candidates[:want], drop, back + candidates[want:])


def select(pool: Pool, run_id: str, resource_class: str, count: int, usage_class: str | None,
           clock: Clock = SYSTEM_CLOCK, touched: Touched | None = None,
           registration: dict[str, str] | None = None) -> SelectionResult:
    """Claim up to ``count`` runners; ``touched`` learns each id the moment its claim wins,
    so the caller's emergency path knows every row this run holds even if selection raises."""
    if count <= 0:
        return SelectionResult()
    claimed: list[Member] = []
    unhealthy_all: list[Member] = []
    agents: dict[str, AgentRecord | None] = {}
    res = _Tally()
    cfg = pool.config
    url = pool_q.queue_url(cfg, resource_class)
    deadline = Deadline(SELECTION_TIMEOUT_S, clock)
    first = True
    while len(claimed) < count and not deadline.expired:
        want = count - len(claimed)
        msgs = pool_q.receive(cfg.region, url, min(pool_q.BATCH_MAX, want), pool_q.LONG_POLL_S if first else 0)
        first = False
        rest = want - len(msgs)
        if msgs and rest > 0:       # the pool is warm: ask for the rest at once (SQS often returns fewer)
            sizes = [min(pool_q.BATCH_MAX, rest - i) for i in range(0, rest, pool_q.BATCH_MAX)]
            msgs += [m for batch in aws.parallel(lambda k: pool_q.receive(cfg.region, url, k, 0), sizes)
                     for m in batch]
        if not msgs:
            break
        res.received += len(msgs)
        split = partition(msgs, resource_class, usage_class, want)
        keep, drop, back = split.keep, split.drop, split.back
        won = _claim_all(pool, run_id, keep, clock, touched, registration)
        res.lost_races += len(keep) - len(won)      # the row moved on: the message was stale
        res.stale_dropped += len(drop) + (len(keep) - len(won))
        pool_q.delete(cfg.region, url, keep + drop)  # every claim is decided: won or stale
        if back:
            pool_q.give_back(cfg.region, url, back)
            res.given_back += len(back)
        if won:
            healthy, unhealthy = _check_health(pool, won, clock, agents)
            claimed.extend(healthy)
            unhealthy_all.extend(unhealthy)
        if not keep and back:
            break                                   # everything visible is for someone else
    if len(claimed) < count:                        # then the stopped tier: claimed, started in one call
        claimed.extend(stopped_tier.claim_and_start(pool, run_id, resource_class, count - len(claimed),
                                                    usage_class, clock, touched, registration))
    event("selection.done", run_id=run_id, resource_class=resource_class, wanted=count,
          claimed=[m.instance_id for m in claimed], unhealthy=[m.instance_id for m in unhealthy_all],
          received=res.received, lost_races=res.lost_races, given_back=res.given_back)
    return SelectionResult(claimed, unhealthy_all, res.received, res.stale_dropped, res.lost_races, res.given_back,
                           agents)


def _claim_all(pool: Pool, run_id: str, msgs: list[PoolMessage], clock: Clock, touched: Touched | None,
               registration: dict[str, str] | None = None) -> list[PoolMessage]:
    """Claim the messages' rows idle -> claimed, in one transaction per 100 (row by row only if one is
    cancelled by a stale message); the messages whose claim won."""
    if not msgs:
        return []
    lost = transition_together(pool, [Move(m.instance_id, State.IDLE) for m in msgs], to=State.CLAIMED,
                               expect_run=None, set_run=run_id, now=clock.now(), registration=registration)
    for iid, t in lost.items():
        event("claim.lost", run_id=run_id, instance_id=iid, reason=t.reason)
    won = [m for m in msgs if m.instance_id not in lost]
    if touched is not None:
        touched.add([m.instance_id for m in won])
    return won


def _check_health(pool: Pool, won: list[PoolMessage], clock: Clock,
                  agents: dict[str, AgentRecord | None]) -> tuple[list[Member], list[Member]]:
    """The claimed rows read back with their agents' (one batch read): healthy members and unhealthy."""
    rows = store.read_set(pool, [m.instance_id for m in won])
    agents.update({iid: agent for iid, (_, agent) in rows.items()})
    now = clock.now()
    healthy: list[Member] = []
    unhealthy: list[Member] = []
    for m in won:
        record, agent = rows.get(m.instance_id, (None, None))
        if record is None:                          # the row went away after our claim: nothing to hold
            event("claim.row_gone", instance_id=m.instance_id)
            continue
        member = Member(record.instance_id, record.arn, "pool", record.instance_type, record.subnet_id,
                        record.usage_class, record.resource_class)
        ok = agent is not None and agent.is_healthy(now, pool.config.heartbeat_stale_s) and agent.signal not in (
            Signal.SHUTDOWN, Signal.PRERUNNER_FAILED, Signal.INTERRUPTED)
        (healthy if ok else unhealthy).append(member)
        if not ok:
            age = agent.heartbeat_age(now) if agent else None
            event("claim.unhealthy", instance_id=m.instance_id,
                  heartbeat_age_s=round(age, 1) if age is not None else None)
    interruptions.record(pool, {m.instance_id: m.resource_class for m in unhealthy
                                if (rows.get(m.instance_id, (None, None))[1] or AgentRecord(m.arn)).interrupted},
                         now)
    return healthy, unhealthy
