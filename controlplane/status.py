"""``runner-pool status``: a pool per resource class, its instances, its queues.

Per class: how many rows are in each state (every :class:`~controlplane.records.State`
but ``terminated``, generically, so a state added to the machine shows up as a
column), the warm minimum (configured, and in force now under its schedule),
the ceiling with the live count it is checked against, spot interruptions in
the last hour (:func:`controlplane.interruptions.last_hour`) and the pool hit rate of the class's last
provisions (:func:`controlplane.poolstats.hit_rate`). The same in ``--json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controlplane import ceilings, interruptions, poolstats, store
from controlplane import pool as pool_q
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.records import State
from controlplane.store import Pool

# Columns of the class table: every state a live row can be in, in the machine's order.
CLASS_STATES: tuple[State, ...] = tuple(s for s in State if s is not State.TERMINATED)


@dataclass
class ClassStatus:
    name: str
    by_state: dict[str, int]
    min_idle: int
    min_idle_now: int
    max_instances: int | None
    live: int                                  # rows not terminated: what the ceiling is checked against
    counted: int                               # the ceiling counter (live + launches in flight)
    interruptions_last_hour: int
    hit_rate: float | None                     # None: no provision recorded
    hit_rate_provisions: int
    configured: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PoolStatus:
    pool: str
    by_state: dict[str, int] = field(default_factory=dict)
    instances: list[dict[str, Any]] = field(default_factory=list)
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    classes: dict[str, ClassStatus] = field(default_factory=dict)
    max_instances: int | None = None
    live: int = 0
    counted: int = 0
    interruptions_last_hour: dict[str, int] = field(default_factory=dict)     # per class

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "by_state": self.by_state, "instances": self.instances, "queues": self.queues,
                "classes": {c: s.to_dict() for c, s in sorted(self.classes.items())},
                "max_instances": self.max_instances, "live": self.live, "counted": self.counted,
                "interruptions_last_hour": self.interruptions_last_hour}

    def render(self) -> str:
        lines = [f"pool {self.pool}: " + (", ".join(f"{n} {s}" for s, n in self.by_state.items() if n) or "empty")
                 + f"; {self.live} live" + (f" of max_instances {self.max_instances}" if self.max_instances else "")]
        heads = [s.value for s in CLASS_STATES] + ["min", "max", "interrupted 1h", "hit rate"]
        rows = []
        for name, c in sorted(self.classes.items()):
            warm = "-" if not c.min_idle else (str(c.min_idle) if c.min_idle_now == c.min_idle
                                                else f"{c.min_idle} ({c.min_idle_now} now)")
            ceiling = f"{c.live}/{c.max_instances}" if c.max_instances is not None else "-"
            inter = str(c.interruptions_last_hour)
            hit = ("—" if c.hit_rate is None
                   else f"{c.hit_rate:.0%} of last {c.hit_rate_provisions}")
            rows.append([name + ("" if c.configured else " (removed)"),
                         *[str(c.by_state.get(s.value, 0)) for s in CLASS_STATES], warm, ceiling, inter, hit])
        widths = [max(len(r[i]) for r in [["class", *heads], *rows]) for i in range(len(heads) + 1)]
        for r in [["class", *heads], *rows]:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        for cls, d in sorted(self.queues.items()):
            lines.append(f"  queue {cls}: {d['visible']} waiting, {d['in_flight']} in flight")
        live = [i for i in self.instances if i["state"] != "terminated"]
        if live:
            lines.append(f"  {'instance':<21} {'state':<10} {'class':<10} {'type':<12} {'run':<24} heartbeat")
            for i in live:
                hb = f"{i['heartbeat_age_s']:.0f} s ago" if i["heartbeat_age_s"] is not None else "none"
                lines.append(f"  {i['id']:<21} {i['state']:<10} {i['resource_class']:<10} {i['instance_type']:<12} "
                             f"{i['run_id'] or '-':<24} {hb}")
        return "\n".join(lines)


def pool_status(pool: Pool, clock: Clock = SYSTEM_CLOCK) -> PoolStatus:
    cfg = pool.config
    records = store.all_records(pool)
    agents = store.all_agents(pool)
    now = clock.now()
    st = PoolStatus(pool.name, {s.value: 0 for s in State}, max_instances=cfg.max_instances)
    per_class: dict[str, dict[str, int]] = {c: {s.value: 0 for s in CLASS_STATES} for c in cfg.resource_classes}
    for r in sorted(records, key=lambda r: (r.state.value, r.instance_id)):
        st.by_state[r.state.value] = st.by_state.get(r.state.value, 0) + 1
        if r.state is not State.TERMINATED:
            per_class.setdefault(r.resource_class, {s.value: 0 for s in CLASS_STATES})
            per_class[r.resource_class][r.state.value] = per_class[r.resource_class].get(r.state.value, 0) + 1
        a = agents.get(r.instance_id)
        st.instances.append({
            "id": r.instance_id, "state": r.state.value, "run_id": r.run_id, "resource_class": r.resource_class,
            "instance_type": r.instance_type, "subnet": r.subnet_id, "usage_class": r.usage_class,
            "reuse_count": r.reuse_count, "threshold_in_s": round(r.threshold - now, 1),
            "heartbeat_age_s": round(age, 1) if a and (age := a.heartbeat_age(now)) is not None else None,
            "signal": str(a.signal) if a and a.signal else None,
        })
    inter = st.interruptions_last_hour = interruptions.last_hour(pool, now)
    counters = ceilings.read(cfg, ceilings.counter_keys(cfg, list(per_class)))
    for cls, by_state in sorted(per_class.items()):
        rc = cfg.resource_classes.get(cls)
        hr = poolstats.hit_rate(cfg, cls)
        st.classes[cls] = ClassStatus(
            name=cls, by_state=by_state, min_idle=rc.min_idle if rc else 0,
            min_idle_now=rc.min_idle_at(now) if rc else 0, max_instances=rc.max_instances if rc else None,
            live=sum(by_state.values()), counted=counters[ceilings.class_sk(cls)].live,
            interruptions_last_hour=inter.get(cls, 0),
            hit_rate=hr.rate, hit_rate_provisions=hr.provisions, configured=rc is not None)
    st.live = sum(c.live for c in st.classes.values())
    st.counted = counters[ceilings.POOL_SK].live
    for cls, url in sorted(pool_q.pool_queues(cfg).items()):
        st.queues[cls] = pool_q.depth(pool.region, url)
    return st
