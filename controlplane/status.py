"""``runner-pool status``: a pool's instances by state, and its queue depths."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controlplane import pool as pool_q
from controlplane import store
from controlplane.clock import SYSTEM_CLOCK, Clock
from controlplane.records import LIVE_STATES, State
from controlplane.store import Pool


@dataclass
class PoolStatus:
    pool: str
    by_state: dict[str, int] = field(default_factory=dict)
    instances: list[dict[str, Any]] = field(default_factory=list)
    queues: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "by_state": self.by_state, "instances": self.instances, "queues": self.queues}

    def render(self) -> str:
        lines = [f"pool {self.pool}: " + ", ".join(f"{n} {s}" for s, n in self.by_state.items() if n)]
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
    records = store.all_records(pool)
    agents = store.all_agents(pool)
    now = clock.now()
    st = PoolStatus(pool.name, {s.value: 0 for s in (*LIVE_STATES, State.TERMINATED)})
    for r in sorted(records, key=lambda r: (r.state.value, r.instance_id)):
        st.by_state[r.state.value] += 1
        a = agents.get(r.instance_id)
        st.instances.append({
            "id": r.instance_id, "state": r.state.value, "run_id": r.run_id, "resource_class": r.resource_class,
            "instance_type": r.instance_type, "subnet": r.subnet_id, "usage_class": r.usage_class,
            "reuse_count": r.reuse_count, "threshold_in_s": round(r.threshold - now, 1),
            "heartbeat_age_s": round(age, 1) if a and (age := a.heartbeat_age(now)) is not None else None,
            "signal": str(a.signal) if a and a.signal else None,
        })
    for cls, url in sorted(pool_q.pool_queues(pool.config).items()):
        st.queues[cls] = pool_q.depth(pool.region, url)
    return st
