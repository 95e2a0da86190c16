"""Rootfs instances for the tests where the operating system matters (controlplane/local/rootfs.py).

They need root, network namespaces and overlayfs. CI has them (``.ci/rootfs.sh``
builds the cached root first); on a machine without them the tests are
skipped with the reason, and under ``CI=true`` they fail instead, so CI can
never pass by skipping them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Emu, wait_for


@pytest.fixture(scope="session")
def rootfs_root() -> Iterator[str]:
    from controlplane.local import rootfs

    why = rootfs.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"rootfs instances cannot run in CI: {why}")
        pytest.skip(f"rootfs instances cannot run here: {why}")
    path, _ = rootfs.build_root(lambda m: print(m, flush=True))
    yield str(path)


def sim_status(emu: Emu) -> dict[str, dict[str, Any]]:
    return {m["instance_id"]: m for m in emu._call(f"{emu.aws}/_emulator/sim/status")["instances"]}


def init_pid(emu: Emu, iid: str, timeout_s: float = 60) -> int:
    """The host pid of the instance's PID 1, once it is up."""
    return int(wait_for(lambda: sim_status(emu).get(iid, {}).get("init_pid"), f"{iid} to be up", timeout_s))


def inside(emu: Emu, iid: str, argv: list[str], user: str | None = None, input_text: str | None = None) -> Any:
    """Run ``argv`` in the instance (as ``user``, default root)."""
    from controlplane.local import rootfs

    return rootfs.exec_in(init_pid(emu, iid), argv, user=user, input_text=input_text)


def rootfs_pool(make_pool: Any, emu: Emu, **overrides: Any) -> Any:
    """A pool whose instances are all rootfs instances (a behaviour rule matching its name)."""
    timings = {"validation_timeout_s": 240, "claim_timeout_s": 600, "heartbeat_interval_s": 2,
               "heartbeat_stale_s": 20, "deregistration_timeout_s": 60}
    pool = make_pool(**{**timings, **overrides})
    emu.behaviour(match={"pool": pool.config.name}, kind="rootfs")
    return pool
