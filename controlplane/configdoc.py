"""Generate the configuration reference from :class:`PoolConfig` itself.

``python -m controlplane.configdoc > docs/configuration.md``; a test checks
the committed file matches, so the reference cannot drift from the code.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from controlplane.config import (
    Accelerators,
    GitHubConfig,
    PoolConfig,
    Range,
    ResourceClass,
    SpotBreaker,
    WarmSchedule,
)


def _type(ann: Any) -> str:
    s = str(ann).replace("typing.", "").replace("controlplane.config.", "")
    return s.replace("<class '", "").replace("'>", "")


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        return "—" if field.default is None else f"`{field.default!r}`"
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`"
    return "**required**"


def table(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = ["| key (YAML / Pulumi) | type | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        key = f"`{prefix}{name}` / `{prefix}{f.alias}`" if f.alias and f.alias != name else f"`{prefix}{name}`"
        rows.append(f"| {key} | {_type(f.annotation)} | {_default(f)} | {f.description or ''} |")
    return rows


POOL_CONTROLS = """## Pool controls

Warm minimum, ceilings and cost tags, set per resource class and per pool
(`runner-pool status` shows each class's state).

```yaml
max_instances: 40                  # the whole pool, every class together
run_tag_keys: [repository, workflow, team]
resource_classes:
  small:
    vcpu: {min: 2, max: 2}
    memory_mib: {min: 4096}
    min_idle: 3                    # refresh keeps 3 idle runners ...
    min_idle_schedule:             # ... on working days, 07:00-19:00 Berlin time; 0 outside
      timezone: Europe/Berlin
      days: [mon, tue, wed, thu, fri]
      start: "07:00"
      end: "19:00"
    max_instances: 20
```

**Warm minimum** (`min_idle`, `min_idle_schedule`). Each `refresh` counts the
class's idle runners and the instances an earlier top-up launched that are not
up yet (each instance once; runners of a run do not count), and creates the
difference with one CreateFleet. The new instances join the pool (`created ->
idle`, one message each) as soon as their agents report `waiting`; refresh
waits for them up to `validation_timeout_s`, and the next refresh takes any it
did not see. Idle runners above the minimum still expire after `idle_time_s`;
those the minimum needs are kept (the youngest) with a new idle threshold, and
an instance past `max_lifetime_s` is retired and replaced. Run refresh on a
schedule shorter than `idle_time_s` to keep the minimum. A warm top-up respects
the ceilings (it creates only what fits). Ephemeral classes cannot have one.

**Ceilings** (`max_instances` per class and per pool). They count live
instances: every instance launched and not yet terminated, whatever its state.
A provision whose new instances (what the pool's idle runners cannot serve)
would pass one fails before any claim or launch: exit 2 with
`error: class small is at its ceiling: resource_classes.small.max_instances is
20, 20 live, 3 more would pass it (...)`, and RunnerFleet's create fails with
the same line. Concurrent provisions cannot pass a ceiling together: each
launch first reserves its instances with a conditional update of a counter item
in the state table (`pk=ceiling`, `sk=class#<name>` and `sk=pool`; `live <=
max - n`, so of racing provisions only those that fit win); the reservation not
used by CreateFleet is given back at once, a terminated row gives its instance
back, and reconcile corrects a counter a crashed process left off once it has
been still for two minutes. The count before claiming is a fast read; a
provision that passed it and then loses the reservation gives back what it
claimed and fails with the same error. See `controlplane/ceilings.py`.

**Cost tags** (`run_tag_keys`; `--tag KEY=VALUE` on `provision`, `tags` on
RunnerFleet and the run stack's config). While a run holds an instance, the
instance carries `runner-pool:run-id=<run>` and the tags the provision passed
(only keys in `run_tag_keys`; EC2's characters, values up to 256). Created
instances get them at launch; claimed ones with one CreateTags per provision
after the commit; release removes the keys with one DeleteTags before the
runners go back to the pool. Activate the keys as cost allocation tags in the
Billing console to see instance hours per run, repository, workflow or team.
"""


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `controlplane/config.py` by `python -m controlplane.configdoc`; do not edit by hand.",
           "Keys may be written in snake_case (YAML) or camelCase (Pulumi config); both are accepted.", "",
           "## Pool", "", *table(PoolConfig), "",
           "## github", "", *table(GitHubConfig, "github."), "",
           "## resource_classes.NAME", "", *table(ResourceClass), "",
           "## Ranges (`vcpu`, `memory_mib`, `accelerators.count`)", "", *table(Range), "",
           "## accelerators", "", *table(Accelerators), "",
           "## spot_breaker", "", *table(SpotBreaker, "spot_breaker."), "",
           "## resource_classes.NAME.min_idle_schedule", "", *table(WarmSchedule, "min_idle_schedule."), "",
           POOL_CONTROLS]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
