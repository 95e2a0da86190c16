"""A pool of N rows in a known mix of health and drift, and the check that nothing is missed.

Shared by ``bench/scale.py`` (10,000 rows, timed) and ``tests/reliability/test_scale.py``
(a few thousand rows: enough to cross DynamoDB's 1 MB page and EC2's DescribeInstances
page, outcomes only). Both run against their own emulator and GitHub stand-in, started in
this process, with **no simulator**: what is measured is the control plane reading and
repairing many rows, and 10,000 agent processes would measure the machine instead.

What agents, provisions and GitHub would have written is planted directly:

* EC2 instances with RunInstances in batches (one reservation per batch, as one fleet per
  provision makes), tagged as the launch template and the fleet request tag them;
* state rows as :class:`InstanceRecord` items (the product's wire format), in BatchWriteItem;
* agent rows (what each instance's agent heartbeats) in the agent's attribute names;
* runners through the stand-in's :meth:`GitHubStandIn.add_runner` (what ``config.sh`` registers).

Every planted item belongs to one :data:`KINDS` entry, which says what refresh and reconcile
must do to it. :func:`check_refresh`, :func:`check_reconcile` and :func:`check_end_state`
compare what they did with that, item by item, and return problems (empty: nothing missed,
nothing healthy touched).
"""
from __future__ import annotations

import os
import random
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from controlplane import aws, launch_template, store
from controlplane.apply import pool_instance_ids, terminate_instances
from controlplane.clock import AheadClock
from controlplane.config import PoolConfig, parse_config
from controlplane.github import GitHubClient
from controlplane.reconcile import ORPHAN_GRACE_S, ReconcileResult
from controlplane.records import AGENT_SK, InstanceRecord, State, agent_pk, wire
from controlplane.refresh import RefreshResult
from controlplane.store import Pool

SCOPE = "octo-org/octo-repo"
PAT = "scale-pat"
FOREIGN_LABEL = "runner-pool-someone-else"
INSTANCE_TYPE = "c5a.large"
SEED = 20261201
# Subnets big enough for 10,000 instances (build_network's are /24: 251 addresses each).
BIG_SUBNETS = (("10.42.64.0/18", "us-east-1a"), ("10.42.128.0/18", "us-east-1b"),
               ("10.42.192.0/18", "us-east-1c"))
# Long deadlines, so no healthy row expires while a 10,000-row benchmark runs.
TIMINGS: dict[str, Any] = {
    "idle_time_s": 4 * 3600, "max_runtime_s": 4 * 3600, "claim_timeout_s": 3600,
    "deregistration_timeout_s": 3600, "max_lifetime_s": 86400,
}
# Instances look this much older than they are, so the orphans are past reconcile's grace.
CLOCK_AHEAD_S = ORPHAN_GRACE_S + 60


@dataclass(frozen=True)
class Kind:
    """One kind of planted item and what the control plane must do with it."""

    name: str
    share: float                 # of N rows (for the kinds without a row too)
    state: State | None          # the row's state; None: no row
    instance: str                # "live", "gone" (terminated behind our back) or "none" (never existed)
    runner: bool = False         # a runner of this pool is registered for it
    expiry: str = ""             # refresh's key in RefreshResult.expired, "" if refresh must leave it
    reconcile: str = ""          # the reconcile action on its instance or row, "" if none
    threshold: str = "future"    # "future" or "past"
    old: bool = False            # launched longer ago than max_lifetime_s


KINDS: tuple[Kind, ...] = (
    # healthy: nobody may touch these
    Kind("idle", 0.61, State.IDLE, "live"),
    Kind("running", 0.15, State.RUNNING, "live", runner=True),
    Kind("draining", 0.01, State.DRAINING, "live", runner=True),        # agent deregistering
    Kind("claimed", 0.01, State.CLAIMED, "live"),                       # a provision validating
    Kind("created", 0.01, State.CREATED, "live"),                       # a provision validating
    Kind("terminated", 0.10, State.TERMINATED, "gone"),                 # history, until TTL
    # refresh, two-phase expiry
    Kind("expired_idle", 0.02, State.IDLE, "live", expiry="idle", threshold="past"),
    Kind("lifetime_idle", 0.01, State.IDLE, "live", expiry="lifetime", old=True),
    Kind("expired_claimed", 0.01, State.CLAIMED, "live", expiry="claimed", threshold="past"),
    Kind("expired_created", 0.01, State.CREATED, "live", expiry="created", threshold="past"),
    Kind("expired_draining", 0.01, State.DRAINING, "live", runner=True, expiry="draining", threshold="past"),
    Kind("expired_running", 0.01, State.RUNNING, "live", runner=True, expiry="running", threshold="past"),
    # reconcile: rows whose instance is gone, instances with no row or a terminated row, stray runners
    Kind("ghost_idle", 0.01, State.IDLE, "gone", reconcile="close_row"),
    Kind("ghost_running", 0.01, State.RUNNING, "gone", runner=True, reconcile="close_row"),
    Kind("ghost_draining", 0.005, State.DRAINING, "gone", runner=True, reconcile="close_row"),
    Kind("ghost_claimed", 0.005, State.CLAIMED, "gone", reconcile="close_row"),
    Kind("dead_row_live_instance", 0.01, State.TERMINATED, "live", reconcile="terminate_instance"),
    Kind("orphan", 0.01, None, "live", reconcile="terminate_instance"),
    Kind("orphan_with_runner", 0.01, None, "live", runner=True, reconcile="terminate_instance"),
    Kind("ghost_runner", 0.01, None, "none", runner=True),
    Kind("foreign_runner", 0.005, None, "none", runner=True),           # another pool's: leave it
)
BY_NAME = {k.name: k for k in KINDS}
HEALTHY = ("idle", "running", "draining", "claimed", "created")


def counts_for(rows: int) -> dict[str, int]:
    """How many of each kind for ``rows`` state rows (at least one of each); the row total is exact."""
    out = {k.name: max(1, round(k.share * rows)) for k in KINDS}
    out["idle"] += rows - sum(out[k.name] for k in KINDS if k.state is not None)
    return out


# ---------------------------------------------------------------- the local world

def ahead_clock() -> AheadClock:
    """The clock every planting and check uses: instances look ``CLOCK_AHEAD_S`` older."""
    return AheadClock(CLOCK_AHEAD_S)


@contextmanager
def fast_tag_lookups() -> Iterator[None]:
    """moto finds one resource's tags by scanning every tag in the region; look them up by id instead.

    moto's ``get_tags`` (every ``tag:`` filter, every instance it serialises) calls
    ``describe_tags(filters={"resource-id": [id]})``, which walks all tags: DescribeInstances
    is O(instances x tags), 8 s at 2,000 tagged instances and minutes at 10,000. This answers
    that one filter from the resource's own tags (the same list, in the same order) and sends
    every other call to moto. An emulator speed fix, semantics unchanged; undone on exit.
    """
    from moto.ec2.models.tags import TagBackend
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    original = TagBackend.describe_tags

    def describe_tags(self: Any, filters: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
        ids = (filters or {}).get("resource-id") or []
        if set(filters or {}) != {"resource-id"} or len(ids) != 1 or any(c in ids[0] for c in "*?["):
            return original(self, filters)
        rid = ids[0]
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(rid), "")
        return [{"resource_id": rid, "key": k, "value": v, "resource_type": kind}
                for k, v in dict(self.tags.get(rid) or {}).items()]

    TagBackend.describe_tags = describe_tags  # type: ignore[method-assign]
    try:
        yield
    finally:
        TagBackend.describe_tags = original  # type: ignore[method-assign]


@dataclass
class World:
    """The emulator, the GitHub stand-in and the network, all in this process."""

    emu: Any
    github: Any                   # GitHubStandIn
    network: dict[str, Any]
    subnets: list[str]

    @property
    def client(self) -> GitHubClient:
        return GitHubClient(api_url=self.github.url, token=PAT, scope=SCOPE)

    def runners(self) -> list[dict[str, Any]]:
        """The stand-in's runners, shaped as ``tests.conftest.Emu.runners`` (for invariants.check)."""
        return list(self.github.state()["runners"])

    def reset(self) -> None:
        """Forget every AWS resource and runner; build the network again."""
        urllib.request.urlopen(urllib.request.Request(f"{self.emu.url}/moto-api/reset", method="POST"),
                               timeout=60).read()
        self.github.reset()
        self.network, self.subnets = _network(self.emu.url)


def _network(url: str) -> tuple[dict[str, Any], list[str]]:
    from controlplane.local.daemon import build_network

    net = build_network(url)
    ec2 = aws.client("ec2", net["region"])
    subnets = [ec2.create_subnet(VpcId=net["vpc"], CidrBlock=cidr, AvailabilityZone=az)["Subnet"]["SubnetId"]
               for cidr, az in BIG_SUBNETS]
    return net, subnets


@contextmanager
def local_world() -> Iterator[World]:
    """Emulator + GitHub stand-in in this process; the AWS environment points at them until exit."""
    from controlplane.local.daemon import aws_env
    from controlplane.local.emulator import Emulator
    from controlplane.local.github_standin import GitHubStandIn

    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION", "AWS_REGION")}
    with fast_tag_lookups():
        emu = Emulator().start()
        github = GitHubStandIn(pat=PAT).start()
        try:
            os.environ.update(aws_env(emu.url))
            net, subnets = _network(emu.url)
            yield World(emu, github, net, subnets)
        finally:
            try:
                # moto's models are this process's memory: give it back
                urllib.request.urlopen(urllib.request.Request(f"{emu.url}/moto-api/reset", method="POST"),
                                       timeout=60).read()
            finally:
                github.stop()
                emu.stop()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def pool_config(world: World, name: str, **overrides: Any) -> PoolConfig:
    """A pool like ``tests.conftest.pool_config_dict`` builds, on the big subnets, with long deadlines."""
    net = world.network
    body: dict[str, Any] = {
        "name": name, "region": net["region"],
        "github": {"repository": SCOPE, "url": world.github.url, "api_url": world.github.url},
        "resource_classes": {
            "small": {"vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096},
                      "instance_types": ["c*", "m*"]},
            "large": {"vcpu": {"min": 8, "max": 8}, "memory_mib": {"min": 16384}},
        },
        "subnets": world.subnets, "ami": net["ami"], "security_groups": [net["security_group"]],
        "instance_profile": net["instance_profile"], "heartbeat_interval_s": 5, "heartbeat_stale_s": 15,
        **TIMINGS,
    }
    body.update(overrides)
    return parse_config(body, "scale pool")


# ---------------------------------------------------------------- planting

@dataclass
class Planted:
    """What was planted, by kind, and the rows exactly as written."""

    pool: Pool
    now: float
    counts: dict[str, int]
    ids: dict[str, list[str]]                       # kind -> instance ids (made up when there is none)
    runners: dict[str, dict[str, int]] = field(default_factory=dict)   # kind -> instance id -> runner id
    rows: dict[str, InstanceRecord] = field(default_factory=dict)      # instance id -> row as written
    agents: set[str] = field(default_factory=set)   # instance ids with an agent row
    reservations: int = 0

    @property
    def rows_total(self) -> int:
        return len(self.rows)

    @property
    def instances_total(self) -> int:
        return sum(len(v) for k, v in self.ids.items() if BY_NAME[k].instance != "none")


def _launch(pool: Pool, subnets: list[str], n: int, batch: int) -> tuple[list[str], int]:
    """``n`` pool instances, ``batch`` per RunInstances (one reservation each), tagged as the product tags."""
    cfg = pool.config
    ec2 = aws.client("ec2", pool.region)
    base = launch_template.instance_tags(cfg)
    ids: list[str] = []
    calls = 0
    while len(ids) < n:
        size = min(batch, n - len(ids))
        tags = {**base, "runner-pool:run-id": f"plant-{calls}", "runner-pool:class": "small"}
        resp = ec2.run_instances(
            ImageId=cfg.ami, InstanceType=INSTANCE_TYPE, MinCount=size, MaxCount=size,
            SubnetId=subnets[calls % len(subnets)],
            TagSpecifications=[{"ResourceType": "instance",
                                "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}])
        ids += [i["InstanceId"] for i in resp["Instances"]]
        calls += 1
    return ids, calls


def _row(pool: Pool, kind: Kind, iid: str, k: int, now: float) -> InstanceRecord:
    cfg = pool.config
    deadline = {State.IDLE: cfg.idle_time_s, State.RUNNING: cfg.max_runtime_s,
                State.CLAIMED: cfg.claim_timeout_s, State.CREATED: cfg.claim_timeout_s,
                State.DRAINING: cfg.deregistration_timeout_s, State.TERMINATED: 0}[kind.state]  # type: ignore[index]
    threshold = now - 60 if kind.threshold == "past" or kind.state is State.TERMINATED else now + deadline
    in_run = kind.state in (State.RUNNING, State.CLAIMED, State.CREATED)
    run = f"run-{kind.name}-{k // 10}" if in_run else None
    # a draining row's run was just cleared; idle and terminated ones remember their last run, or had none
    last = None
    if kind.state is State.DRAINING or (kind.state in (State.IDLE, State.TERMINATED) and k % 3):
        last = f"run-{kind.name}-{k // 10}"
    launched = now - cfg.max_lifetime_s - 60 if kind.old else now - 3600
    return InstanceRecord(
        arn=pool.arn(iid), state=kind.state, threshold=threshold,  # type: ignore[arg-type]
        resource_class="small", instance_type=INSTANCE_TYPE, usage_class="on-demand",
        subnet_id=cfg.subnets[k % len(cfg.subnets)], launched_at=launched, run_id=run,
        last_run_id=last, reuse_count=k % 7, version=1 + k % 5, updated_at=now - 30,
        expires_at=now + 86400 if kind.state is State.TERMINATED else None, availability_zone="us-east-1a")


def _agent_item(pool: Pool, rec: InstanceRecord, now: float) -> dict[str, Any]:
    """The row an instance's agent keeps, in its attribute names (agent.py ``signal``, ``heartbeat``)."""
    run = rec.run_id or rec.last_run_id
    registered = rec.state in (State.RUNNING, State.DRAINING)
    return wire({
        "pk": agent_pk(rec.arn), "sk": AGENT_SK, "instance_id": rec.instance_id, "heartbeat_at": now - 2.0,
        "signal": "registered" if registered else "waiting", "signal_at": now - 60.0,
        "signal_run": run if registered else None,
        "runner_name": f"{rec.instance_id}-1" if registered else None,
        "expires_at": now + 86400.0,
    })


def plant(pool: Pool, world: World, rows: int, *, batch: int = 50,
          clock: AheadClock | None = None) -> Planted:
    """Launch, write and register ``rows`` rows' worth of the :data:`KINDS` mix; returns what went where."""
    now = float(int((clock or ahead_clock()).now()))    # whole seconds: rows read back compare equal
    counts = counts_for(rows)
    rng = random.Random(SEED)
    with_instance = [k for k in KINDS if k.instance != "none"]
    launched, reservations = _launch(pool, world.subnets, sum(counts[k.name] for k in with_instance), batch)
    rng.shuffle(launched)                        # every kind spread over reservations, pages and subnets
    ids: dict[str, list[str]] = {}
    for k in with_instance:
        ids[k.name], launched = launched[:counts[k.name]], launched[counts[k.name]:]
    made_up = 0
    for k in KINDS:
        if k.instance == "none":
            ids[k.name] = [f"i-f{made_up + j:016x}" for j in range(counts[k.name])]
            made_up += counts[k.name]
    out = Planted(pool, now, counts, ids, reservations=reservations)

    puts: list[dict[str, Any]] = []
    for k in KINDS:
        if k.state is None:
            continue
        for j, iid in enumerate(ids[k.name]):
            rec = _row(pool, k, iid, j, now)
            out.rows[iid] = rec
            puts.append({"PutRequest": {"Item": rec.to_item()}})
            if k.name != "terminated":       # history rows' agents are gone with their instances
                puts.append({"PutRequest": {"Item": _agent_item(pool, rec, now)}})
                out.agents.add(iid)
    for name in ("orphan_with_runner",):      # a wedged instance whose row was lost: its agent row lingers
        for iid in ids[name]:
            rec = _row(pool, BY_NAME["running"], iid, 0, now)
            puts.append({"PutRequest": {"Item": _agent_item(pool, rec, now)}})
            out.agents.add(iid)
    store._batch_write(pool, puts)

    gone = [iid for k in KINDS if k.instance == "gone" for iid in ids[k.name]]
    terminate_instances(pool.region, gone)        # behind the control plane's back

    for k in KINDS:
        if not k.runner:
            continue
        label = FOREIGN_LABEL if k.name == "foreign_runner" else pool.config.pool_label
        out.runners[k.name] = {}
        for j, iid in enumerate(ids[k.name]):
            rec = out.rows.get(iid)
            run = (rec.run_id or rec.last_run_id) if rec else f"run-{k.name}-{j // 10}"
            status = "online" if k.instance == "live" else "offline"
            out.runners[k.name][iid] = world.github.add_runner(SCOPE, f"{iid}-1", labels=[run or "x", label],
                                                               status=status)
    return out


# ---------------------------------------------------------------- what must happen

def expected_expired(p: Planted) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k in KINDS:
        if k.expiry:
            out.setdefault(k.expiry, set()).update(p.ids[k.name])
    return out


def _runner_goes(p: Planted, kind: Kind) -> bool:
    """A runner must be removed when its instance will not be live after refresh and reconcile."""
    return kind.runner and kind.name != "foreign_runner" and (
        kind.instance != "live" or bool(kind.expiry) or kind.reconcile == "terminate_instance")


def expected_actions(p: Planted) -> set[tuple[str, str]]:
    want: set[tuple[str, str]] = set()
    for k in KINDS:
        if k.reconcile:
            want.update((k.reconcile, iid) for iid in p.ids[k.name])
        if _runner_goes(p, k):
            want.update(("delete_runner", str(rid)) for rid in p.runners[k.name].values())
    return want


def _diff(what: str, got: set[Any], want: set[Any], limit: int = 5) -> list[str]:
    problems = []
    if want - got:
        problems.append(f"{what}: {len(want - got)} missed, e.g. {sorted(want - got)[:limit]}")
    if got - want:
        problems.append(f"{what}: {len(got - want)} unexpected, e.g. {sorted(got - want)[:limit]}")
    return problems


def check_refresh(p: Planted, res: RefreshResult, *, acting: bool = True) -> list[str]:
    """Refresh expired exactly the planted expired rows (or, on a later pass, nothing)."""
    got = {k: set(v) for k, v in res.expired.items() if v}
    want = expected_expired(p) if acting else {}
    problems = [f"refresh failed: {f}" for f in res.failed]
    for key in sorted(set(got) | set(want)):
        problems += _diff(f"refresh expired[{key}]", got.get(key, set()), want.get(key, set()))
    return problems


def check_reconcile(p: Planted, res: ReconcileResult, *, acting: bool = True) -> list[str]:
    """Reconcile found and fixed exactly the planted drift (or, on a later pass, nothing)."""
    want = expected_actions(p) if acting else set()
    found = {(a.kind, a.target) for a in res.actions}
    fixed = {(a.kind, a.target) for a in res.applied}
    return ([f"reconcile failed: {f}" for f in res.failed] + _diff("reconcile found", found, want)
            + _diff("reconcile fixed", fixed, want))


def check_end_state(p: Planted, world: World) -> tuple[list[str], dict[str, int]]:
    """Item by item: healthy untouched, drift repaired; then the pool's invariants."""
    pool = p.pool
    rows = {r.instance_id: r for r in store.all_records(pool)}
    agents = set(store.all_agents(pool))
    live_ec2 = set(pool_instance_ids(pool.config))
    runner_ids = {r["id"] for r in world.runners()}
    problems: list[str] = []
    bad: dict[str, list[str]] = {}

    def wrong(what: str, iid: str) -> None:
        bad.setdefault(what, []).append(iid)

    for k in KINDS:
        for iid in p.ids[k.name]:
            row = rows.get(iid)
            if k.name in HEALTHY or k.name == "terminated":
                if row != p.rows[iid]:
                    wrong(f"{k.name} row changed", iid)
                if k.name in HEALTHY and iid not in live_ec2:
                    wrong(f"{k.name} instance not live", iid)
                if (iid in agents) != (k.name in HEALTHY):
                    wrong(f"{k.name} agent row {'missing' if k.name in HEALTHY else 'left'}", iid)
            else:
                if k.state is not None and (row is None or row.state is not State.TERMINATED):
                    wrong(f"{k.name} row not terminated", iid)
                if k.state is None and row is not None:
                    wrong(f"{k.name} has a row", iid)
                if iid in live_ec2:
                    wrong(f"{k.name} instance still live", iid)
                if iid in agents:
                    wrong(f"{k.name} agent row left", iid)
            if k.runner:
                rid = p.runners[k.name][iid]
                if _runner_goes(p, k) == (rid in runner_ids):
                    wrong(f"{k.name} runner {'left' if rid in runner_ids else 'removed'}", iid)
    for what, ids in sorted(bad.items()):
        problems.append(f"{what}: {len(ids)}, e.g. {sorted(ids)[:5]}")

    live_rows = {i for i, r in rows.items() if r.state is not State.TERMINATED}
    problems += [f"EC2 instance with no live row: {i}" for i in sorted(live_ec2 - live_rows)[:5]]
    problems += [f"live row with no instance: {i}" for i in sorted(live_rows - live_ec2)[:5]]
    label = pool.config.pool_label
    strays = [r["name"] for r in world.runners() if label in [lb["name"] for lb in r["labels"]]
              and r["name"].rsplit("-", 1)[0] not in live_rows]
    problems += [f"runner with no live instance: {n}" for n in strays[:5]]
    return problems, {"rows": len(rows), "live_rows": len(live_rows), "live_instances": len(live_ec2),
                      "agent_rows": len(agents), "runners": len(runner_ids)}
