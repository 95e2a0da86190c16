"""The agent's runner identity: which user runs config.sh/run.sh, and what environment it inherits.

The agent ships inside user data (stdlib + boto3), so this reads its own
configuration object directly; the processes themselves are covered end to
end in tests/integration/test_instance_side.py.
"""
from __future__ import annotations

import os
import pwd

import pytest

from controlplane.agent import agent

BASE = {"RP_TABLE": "t", "RP_GITHUB_URL": "http://127.0.0.1:1", "RP_GITHUB_SCOPE": "o/r", "RP_POOL_LABEL": "p",
        "HOME": "/root"}


def test_without_a_runner_user_the_runner_may_run_as_root_and_inherits_no_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-runner")
    monkeypatch.setenv("RP_TABLE", "t")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cfg = agent.Cfg(dict(BASE))
    env = cfg.runner_env(ACTIONS_RUNNER_INPUT_TOKEN="tok")
    assert cfg.runner_as is None
    assert env["RUNNER_ALLOW_RUNASROOT"] == "1" and env["PATH"] == "/usr/bin:/bin"
    assert env["ACTIONS_RUNNER_INPUT_TOKEN"] == "tok"
    assert not [k for k in env if k.startswith(("AWS_", "RP_"))]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_with_a_runner_user_a_root_agent_runs_the_runner_as_that_user_with_its_home() -> None:
    nobody = pwd.getpwnam("nobody")
    cfg = agent.Cfg({**BASE, "RP_RUNNER_USER": "nobody"})
    assert cfg.runner_as == {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": [], "umask": 0o077}
    env = cfg.runner_env()
    assert env["HOME"] == nobody.pw_dir and env["USER"] == env["LOGNAME"] == "nobody"
    assert "RUNNER_ALLOW_RUNASROOT" not in env


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_runner_user_that_does_not_exist_stops_the_agent() -> None:
    with pytest.raises(agent.AgentError, match="no such user"):
        agent.Cfg({**BASE, "RP_RUNNER_USER": "no-such-runner-user"})


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_process_the_agent_starts_for_the_runner_really_runs_as_that_user(tmp_path: object) -> None:
    nobody = pwd.getpwnam("nobody")
    cfg = agent.Cfg({**BASE, "RP_RUNNER_USER": "nobody"})
    log = os.path.join(str(tmp_path), "out.log")
    rc, out = agent.run(["sh", "-c", "id -u; id -G"], "/", log, 10, env=cfg.runner_env(), user=cfg.runner_as)
    assert rc == 0
    uid, groups = out.split(" | ")
    assert int(uid) == nobody.pw_uid
    assert groups.split() == [str(nobody.pw_gid)], "no supplementary group of the agent is kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_processes_the_runner_user_left_behind_are_killed_before_the_next_registration() -> None:
    import subprocess

    uid = 61013                     # a uid no account and no process on this machine uses: only ours die
    assert agent.kill_user_processes(uid, timeout_s=0) == 0
    # A job that daemonized out of run.sh's process group, waiting for the next config.sh.
    lurker = subprocess.Popen(["sleep", "300"], cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                              start_new_session=True, user=uid, group=uid, extra_groups=[])
    try:
        assert agent.kill_user_processes(uid) == 1
        assert lurker.wait(timeout=10) == -9
    finally:
        if lurker.poll() is None:
            lurker.kill()
