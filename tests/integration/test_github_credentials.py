"""How the control plane and the runner hold GitHub credentials, over real HTTP against the stand-in.

* a GitHub App installation authenticates like a PAT: the client signs a JWT
  with the App's key, the stand-in checks it and mints an installation token,
  which later calls reuse instead of minting again;
* a 403 that is a secondary rate limit is retried; a 403 for a missing
  permission is not, and its error names the permission;
* the runner takes its registration token and its just-in-time config from
  the environment (``ACTIONS_RUNNER_INPUT_*``), so neither is ever on argv.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controlplane.clock import Deadline, wait_until
from controlplane.errors import ConfigError, RunnerPoolError
from controlplane.github import (
    APP_ID_ENV,
    APP_INSTALLATION_ENV,
    APP_KEY_ENV,
    GitHubClient,
    RetryPolicy,
    github_client_from_env,
)
from controlplane.local.github_standin import GitHubStandIn

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER_SOURCE = REPO_ROOT / "controlplane" / "local" / "actions_runner"
PAT = "credentials-pat"
SCOPE = "octo/credentials"
APP_ID = 4242
INSTALLATION_ID = 77
FAST_RETRY = RetryPolicy(max_retries=3, base_delay_s=0.01, max_delay_s=0.05, max_rate_limit_wait_s=0.05)
WAIT_S = 10.0


def _pem_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@pytest.fixture(scope="module")
def app_key() -> tuple[str, str]:
    return _pem_pair()


@pytest.fixture(scope="module")
def standin(app_key: tuple[str, str]) -> Iterator[GitHubStandIn]:
    gh = GitHubStandIn(pat=PAT, app_id=APP_ID, app_public_key=app_key[1],
                       app_installation_id=INSTALLATION_ID).start()
    yield gh
    gh.stop()


@pytest.fixture(autouse=True)
def fresh(standin: GitHubStandIn) -> None:
    standin.reset()


def app_client(standin: GitHubStandIn, private_key: str, installation: int = INSTALLATION_ID) -> GitHubClient:
    return GitHubClient(standin.url, "", SCOPE, retry=FAST_RETRY, app_id=APP_ID,
                        app_installation_id=installation, app_private_key=private_key)


def requests(standin: GitHubStandIn, key: str) -> int:
    return int(standin.state()["requests"].get(key, 0))


# -- GitHub App authentication ----------------------------------------------------------


def test_an_app_installation_mints_one_token_and_reuses_it_for_later_calls(
        standin: GitHubStandIn, app_key: tuple[str, str]) -> None:
    client = app_client(standin, app_key[0])
    token = client.registration_token()
    assert token.token
    standin.add_runner(SCOPE, "i-0app-1", ["run-1"], status="online")
    assert [r.name for r in client.list_runners()] == ["i-0app-1"]
    jit = client.jit_config("i-0app-2", ["run-2", "pool"])
    assert client.get_runner(jit.runner_id) is not None
    assert requests(standin, "POST /app/installations/{installation_id}/access_tokens") <= 1, \
        "the installation token is cached across the per-call clients (minted at most once)"


def test_an_app_key_github_does_not_know_is_rejected_with_a_clear_error(app_key: tuple[str, str]) -> None:
    # An App of its own: installation tokens are cached per App (and key) in the process.
    other_app = APP_ID + 1
    with GitHubStandIn(pat=PAT, app_id=other_app, app_public_key=app_key[1],
                       app_installation_id=INSTALLATION_ID) as gh:
        wrong_private, _ = _pem_pair()
        client = GitHubClient(gh.url, "", SCOPE, retry=FAST_RETRY, app_id=other_app,
                              app_installation_id=INSTALLATION_ID, app_private_key=wrong_private)
        with pytest.raises(RunnerPoolError) as caught:
            client.list_runners()
        assert caught.value.message == "GitHub rejected the App's credentials"
        assert requests(gh, "POST /app/installations/{installation_id}/access_tokens") == 1, "a 401 is not retried"
        assert requests(gh, "GET /repos/{owner}/{repo}/actions/runners") == 0, "no API call got through"


def test_the_app_is_configured_from_the_environment(standin: GitHubStandIn, app_key: tuple[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNNER_POOL_GITHUB_TOKEN", raising=False)
    monkeypatch.setenv(APP_ID_ENV, str(APP_ID))
    monkeypatch.setenv(APP_INSTALLATION_ENV, str(INSTALLATION_ID))
    monkeypatch.setenv(APP_KEY_ENV, app_key[0])
    client = github_client_from_env(standin.url, SCOPE)
    assert client.is_app and "PRIVATE KEY" not in repr(client)
    assert client.registration_token().token
    monkeypatch.delenv(APP_KEY_ENV)
    with pytest.raises(ConfigError) as caught:
        github_client_from_env(standin.url, SCOPE)
    assert caught.value.message.startswith(APP_KEY_ENV)


# -- 403: rate limit or permission --------------------------------------------------------


def test_a_secondary_rate_limit_403_is_retried_and_the_call_succeeds(standin: GitHubStandIn) -> None:
    standin.add_fault("fail", path_contains="/actions/runners", status=403, count=2,
                      message="You have exceeded a secondary rate limit. Please wait a few minutes.")
    client = GitHubClient(standin.url, PAT, SCOPE, retry=FAST_RETRY)
    assert client.list_runners() == []
    assert requests(standin, "GET /repos/{owner}/{repo}/actions/runners") == 3


def test_a_403_for_a_missing_permission_fails_at_once_naming_the_permission(
        standin: GitHubStandIn, app_key: tuple[str, str]) -> None:
    standin.add_fault("fail", path_contains="/actions/runners", status=403,
                      message="Resource not accessible by integration")
    with pytest.raises(RunnerPoolError) as pat_error:
        GitHubClient(standin.url, PAT, SCOPE, retry=FAST_RETRY).list_runners()
    assert requests(standin, "GET /repos/{owner}/{repo}/actions/runners") == 1, "not retried"
    assert "permission missing" in pat_error.value.message
    assert "`repo` scope" in (pat_error.value.hint or "")
    with pytest.raises(ConfigError) as app_error:
        app_client(standin, app_key[0]).check_access()             # bad input: exit 2 before any change
    assert "permission missing" in app_error.value.message
    assert "`Administration: read and write`" in (app_error.value.hint or "")


def test_a_secondary_rate_limit_that_persists_says_so_not_permission(standin: GitHubStandIn) -> None:
    standin.add_fault("fail", path_contains="/actions/runners", status=403,
                      message="You have exceeded a secondary rate limit.")
    with pytest.raises(RunnerPoolError) as caught:
        GitHubClient(standin.url, PAT, SCOPE, retry=FAST_RETRY).list_runners()
    assert "secondary rate limit" in caught.value.message
    assert "permission" not in caught.value.message
    assert requests(standin, "GET /repos/{owner}/{repo}/actions/runners") == FAST_RETRY.max_retries + 1


# -- the runner reads its secrets from the environment ----------------------------------


@pytest.fixture
def runner_dir(tmp_path: Path) -> Path:
    target = tmp_path / "actions-runner"
    shutil.copytree(RUNNER_SOURCE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUNNER_POOL_PYTHON": sys.executable,
            "RUNNER_POOL_STANDIN_PING_S": "0.2", **extra}


def test_config_sh_takes_the_token_from_the_environment_only(standin: GitHubStandIn, runner_dir: Path) -> None:
    token = GitHubClient(standin.url, PAT, SCOPE).registration_token().token
    argv = ["bash", "config.sh", "--unattended", "--url", f"{standin.url}/{SCOPE}", "--name", "i-0env-1",
            "--labels", "run-env", "--no-default-labels"]
    done = subprocess.run(argv, cwd=runner_dir, env=_env(ACTIONS_RUNNER_INPUT_TOKEN=token), capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    (runner,) = standin.state()["runners"]
    assert runner["name"] == "i-0env-1"
    assert token not in (runner_dir / ".runner").read_text(encoding="utf-8-sig")
    assert token not in (runner_dir / ".credentials").read_text()


def test_run_sh_starts_a_just_in_time_runner_from_the_environment(standin: GitHubStandIn,
                                                                  runner_dir: Path) -> None:
    jit = GitHubClient(standin.url, PAT, SCOPE).jit_config("i-0jit-1", ["run-jit", "pool-label"])
    (runner,) = standin.state()["runners"]
    assert runner["id"] == jit.runner_id and {lb["name"] for lb in runner["labels"]} == {"run-jit", "pool-label"}
    proc = subprocess.Popen(["bash", "run.sh"], cwd=runner_dir, env=_env(ACTIONS_RUNNER_INPUT_JITCONFIG=jit.encoded),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        online = wait_until(lambda: standin.state()["runners"][0]["status"] == "online", Deadline(WAIT_S), 0.05)
        assert online, "the just-in-time runner comes online"
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            assert jit.encoded.encode() not in fh.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT_S)
    assert "Listening for Jobs" in out
    assert jit.encoded not in out
