"""The stopped tier on a Debian root: refresh stops an idle runner (an OS shutdown of the instance,
which its agent takes quietly), the next provision starts it, cloud-init's per-boot script runs the
installed bootstrap and the agent registers for that run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane import store
from controlplane.clock import AheadClock
from controlplane.refresh import refresh
from tests.conftest import FAST, Emu, wait_for
from tests.reliability.invariants import check, online
from tests.rootfs.conftest import rootfs_pool, sim_status
from tests.rootfs.test_rootfs_lifecycle import cli_json, run_id, settled

pytestmark = pytest.mark.usefixtures("rootfs_root")


def test_a_stopped_rootfs_runner_is_started_by_the_next_provision_and_registers_from_its_per_boot_script(
        make_pool: Any, emu: Emu) -> None:
    pool = rootfs_pool(make_pool, emu, resource_classes={"small": {
        "vcpu": {"min": 2, "max": 2}, "memory_mib": {"min": 4096}, "instance_types": ["c*", "m*"],
        "stopped_time_s": 900}})
    name = pool.config.name
    first = run_id()
    code, out = cli_json("provision", "--pool", name, "--run-id", first, "--resource-class", "small")
    assert code == 0, out
    (iid,) = [m["id"] for m in out["instances"]]
    code, out = cli_json("release", "--pool", name, "--run-id", first)
    assert code == 0 and out["returned_to_pool"] == [iid], out

    parked = refresh(pool.config, clock=AheadClock(FAST["idle_time_s"] + 30), run_reconcile=False)
    assert parked.stopped == [iid], parked.to_dict()
    wait_for(lambda: settled(emu, iid, "halted"), f"{iid} to halt", 60)
    _, agent = store.read_set(pool, [iid])[iid]
    assert agent is not None and str(agent.signal) != "shutdown", "the agent took the stop quietly"

    second = run_id()
    code, out = cli_json("provision", "--pool", name, "--run-id", second, "--resource-class", "small")
    assert code == 0, out
    assert [(m["id"], m["source"]) for m in out["instances"]] == [(iid, "stopped")]
    assert [r["name"].rsplit("-", 1)[0] for r in online(emu, second)] == [iid]
    home = Path(sim_status(emu)[iid]["home"])
    log = (home / "layer/upper/var/log/runner-pool.log").read_text()
    assert log.count("runner-pool bootstrap ") == 2, "the second boot ran the installed bootstrap"
    assert sim_status(emu)[iid]["boots"] == 2

    code, out = cli_json("release", "--pool", name, "--run-id", second)
    assert code == 0 and out["returned_to_pool"] == [iid], out
    check(pool, emu)
