"""Generate the configuration reference from :class:`PoolConfig` itself.

``python -m controlplane.configdoc > docs/configuration.md``; a test checks
the committed file matches, so the reference cannot drift from the code.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from controlplane.config import Accelerators, GitHubConfig, PoolConfig, Range, ResourceClass, SpotBreaker


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


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `controlplane/config.py` by `python -m controlplane.configdoc`; do not edit by hand.",
           "Keys may be written in snake_case (YAML) or camelCase (Pulumi config); both are accepted.", "",
           "## Pool", "", *table(PoolConfig), "",
           "## github", "", *table(GitHubConfig, "github."), "",
           "## resource_classes.NAME", "", *table(ResourceClass), "",
           "## Ranges (`vcpu`, `memory_mib`, `accelerators.count`)", "", *table(Range), "",
           "## accelerators", "", *table(Accelerators), "",
           "## spot_breaker", "", *table(SpotBreaker, "spot_breaker."), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
