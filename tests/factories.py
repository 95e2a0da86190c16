"""Test data made in one place: ids and names each scenario needs fresh."""
from __future__ import annotations

import uuid


def run_id() -> str:
    """A run id no other test uses (a GitHub run id as the CLI and the program take it)."""
    return f"run-{uuid.uuid4().hex[:10]}"
