"""Name patterns every entry point checks, without importing the config model.

:mod:`controlplane.config` (pydantic) validates the pool config with them;
the CLI checks its arguments with them before any import of pydantic, so a
command reaches AWS in a fraction of a second (BENCHMARKS.md, "Command start").
"""
from __future__ import annotations

import re

NAME_RE = r"^[a-z][a-z0-9-]{0,29}$"
CLASS_RE = r"^[a-z0-9][a-z0-9-]{0,29}$"
REGION_RE = r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$"
USAGE_CLASSES: tuple[str, ...] = ("spot", "on-demand")
# A run id is also the runner label jobs target with `runs-on:`.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
