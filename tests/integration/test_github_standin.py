"""The GitHub stand-in, the control plane's GitHub client and the runner stand-in, over real HTTP.

Each scenario starts a real stand-in on 127.0.0.1 and goes through the same
paths as production: :class:`GitHubClient` (urllib3) for the REST API and
``bash config.sh`` / ``bash run.sh`` subprocesses for the runner side.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.clock import Deadline, wait_until
from controlplane.errors import ConfigError, RunnerPoolError
from controlplane.github import GitHubClient, GitHubRunner, RetryPolicy, github_client_from_env
from controlplane.local.github_standin import GitHubStandIn

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER_SOURCE = REPO_ROOT / "controlplane" / "local" / "actions_runner"
PAT = "test-pat"
SCOPE = "octo/app"
FAST_RETRY = RetryPolicy(max_retries=3, base_delay_s=0.01, max_delay_s=0.05)
PING_S = "0.2"
WAIT_S = 5.0

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_standin() -> Iterator[GitHubStandIn]:
    standin = GitHubStandIn(pat=PAT, offline_after_s=0.6).start()
    yield standin
    standin.stop()


@pytest.fixture
def standin(shared_standin: GitHubStandIn) -> GitHubStandIn:
    shared_standin.reset()
    return shared_standin


@pytest.fixture
def client(standin: GitHubStandIn) -> GitHubClient:
    return GitHubClient(standin.url, PAT, SCOPE, retry=FAST_RETRY)


@pytest.fixture
def runner_dir(tmp_path: Path) -> Path:
    target = tmp_path / "actions-runner"
    shutil.copytree(RUNNER_SOURCE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _env(python: str = sys.executable) -> dict[str, str]:
    return {**os.environ, "RUNNER_POOL_PYTHON": python, "RUNNER_POOL_STANDIN_PING_S": PING_S}


def config(runner_dir: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(runner_dir / "config.sh"), *args], cwd=runner_dir, env=_env(python),
                          capture_output=True, text=True, timeout=30, check=False)


def register(runner_dir: Path, standin: GitHubStandIn, token: str, name: str = "i-0abc-1",
             scope: str = SCOPE, *extra: str) -> subprocess.CompletedProcess[str]:
    return config(runner_dir, "--unattended", "--url", f"{standin.url}/{scope}", "--token", token,
                  "--name", name, "--labels", "run-42,runner-pool-p", "--no-default-labels", "--replace",
                  "--disableupdate", *extra)


def start_run_sh(runner_dir: Path, python: str = sys.executable) -> subprocess.Popen[str]:
    return subprocess.Popen(["bash", str(runner_dir / "run.sh")], cwd=runner_dir, env=_env(python),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_run_sh(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=WAIT_S)
    return process.returncode, out, err


def http(method: str, url: str, body: Any = None, pat: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if pat is not None:
        headers["Authorization"] = f"token {pat}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _NO_PROXY.open(request, timeout=WAIT_S) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def eventually(probe: Any, timeout_s: float = WAIT_S) -> Any:
    return wait_until(probe, Deadline(timeout_s), interval_s=0.05)


def runner_named(client: GitHubClient, name: str) -> GitHubRunner | None:
    return next((r for r in client.list_runners() if r.name == name), None)


# -- the REST API through GitHubClient -------------------------------------------------


def test_registration_and_removal_tokens_are_distinct_and_valid_for_an_hour(
        client: GitHubClient, standin: GitHubStandIn) -> None:
    registration = client.registration_token()
    removal = client.removal_token()

    assert registration.token and removal.token and registration.token != removal.token
    for token in (registration, removal):
        assert 3590 < token.expires_at - time.time() <= 3600
        assert token.token not in repr(token)
    assert standin.state()["tokens_issued"] == 2


def test_listing_follows_pagination_over_250_runners_in_three_calls(
        client: GitHubClient, standin: GitHubStandIn) -> None:
    for n in range(250):
        standin.add_runner(SCOPE, f"i-{n:04d}-1", ["runner-pool-p"])
    standin.add_runner("octo/other", "elsewhere", [])

    runners = client.list_runners()

    assert len(runners) == 250 and len({r.id for r in runners}) == 250
    assert runners[0] == GitHubRunner(id=runners[0].id, name="i-0000-1", status="offline", busy=False,
                                      labels=("runner-pool-p",))
    assert standin.state()["requests"]["GET /repos/{owner}/{repo}/actions/runners"] == 3


def test_raw_listing_pages_by_30_by_default_and_at_most_100(standin: GitHubStandIn) -> None:
    for n in range(120):
        standin.add_runner(SCOPE, f"r{n}", [])
    base = f"{standin.url}/repos/{SCOPE}/actions/runners"

    status, first = http("GET", base, pat=PAT)
    _, capped = http("GET", f"{base}?per_page=500&page=2", pat=PAT)

    assert status == 200 and first["total_count"] == 120 and len(first["runners"]) == 30
    assert len(capped["runners"]) == 20
    assert set(first["runners"][0]) >= {"id", "name", "os", "status", "busy", "labels"}


def test_getting_and_deleting_a_runner_by_id_answers_404_once_it_is_gone(standin: GitHubStandIn) -> None:
    runner_id = standin.add_runner(SCOPE, "i-1-1", ["x"], status="online")
    url = f"{standin.url}/repos/{SCOPE}/actions/runners/{runner_id}"

    assert http("GET", url, pat=PAT)[1]["status"] == "online"
    assert http("DELETE", url, pat=PAT) == (204, None)
    assert http("GET", url, pat=PAT) == (404, {"message": "Not Found"})
    assert http("DELETE", url, pat=PAT) == (404, {"message": "Not Found"})


def test_deleting_a_runner_twice_returns_false_the_second_time(
        client: GitHubClient, standin: GitHubStandIn) -> None:
    runner_id = standin.add_runner(SCOPE, "i-0abc-1", ["runner-pool-p"])

    assert client.delete_runner(runner_id) is True
    assert client.delete_runner(runner_id) is False
    assert client.list_runners() == []


def test_a_bad_pat_is_reported_as_a_rejected_token_not_a_config_error(standin: GitHubStandIn) -> None:
    bad = GitHubClient(standin.url, "not-the-pat", SCOPE, retry=FAST_RETRY)

    with pytest.raises(RunnerPoolError) as caught:
        bad.list_runners()

    assert not isinstance(caught.value, ConfigError)
    assert caught.value.message == "GitHub rejected the token" and caught.value.hint
    assert http("POST", f"{standin.url}/orgs/o/actions/runners/registration-token", pat="nope") == (
        401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"})


def test_an_unknown_repository_is_a_config_error_naming_it() -> None:
    with GitHubStandIn(pat=PAT, scopes=[SCOPE]) as standin:
        client = GitHubClient(standin.url, PAT, "octo/missing", retry=FAST_RETRY)

        with pytest.raises(ConfigError) as caught:
            client.registration_token()

    assert "repository octo/missing" in caught.value.message


def test_an_organization_scope_uses_the_org_endpoints(standin: GitHubStandIn) -> None:
    org = GitHubClient(standin.url, PAT, "octo-org", retry=FAST_RETRY)
    runner_id = standin.add_runner("octo-org", "i-9-1", ["runner-pool-p"])
    org.registration_token()
    org.removal_token()

    assert [r.id for r in org.list_runners()] == [runner_id]
    assert org.delete_runner(runner_id) is True
    requests = standin.state()["requests"]
    assert requests["POST /orgs/{org}/actions/runners/registration-token"] == 1
    assert requests["POST /orgs/{org}/actions/runners/remove-token"] == 1
    assert requests["DELETE /orgs/{org}/actions/runners/{runner_id}"] == 1


def test_server_errors_are_retried_until_github_answers(client: GitHubClient, standin: GitHubStandIn) -> None:
    standin.add_runner(SCOPE, "i-1-1", [])
    standin.add_fault("fail", path_contains="/actions/runners", count=2, status=502)

    assert [r.name for r in client.list_runners()] == ["i-1-1"]
    assert standin.state()["requests"]["GET /repos/{owner}/{repo}/actions/runners"] == 3


def test_server_errors_that_persist_surface_with_the_status_after_bounded_retries(
        client: GitHubClient, standin: GitHubStandIn) -> None:
    standin.add_fault("fail", path_contains="/registration-token", status=503)

    with pytest.raises(RunnerPoolError, match="HTTP 503"):
        client.registration_token()

    assert standin.state()["requests"]["POST /repos/{owner}/{repo}/actions/runners/registration-token"] == 4


def test_the_client_reads_the_pat_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNNER_POOL_GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        github_client_from_env("https://api.github.com", SCOPE)
    assert caught.value.message == "GitHub token not set"
    assert caught.value.hint.startswith("export RUNNER_POOL_GITHUB_TOKEN=<a PAT with repo or admin:org scope>")

    monkeypatch.setenv("GITHUB_TOKEN", "fallback")
    assert github_client_from_env("https://api.github.com", SCOPE).token == "fallback"
    monkeypatch.setenv("RUNNER_POOL_GITHUB_TOKEN", "preferred")
    assert github_client_from_env("https://api.github.com", SCOPE).token == "preferred"


def test_a_client_survives_pickling_and_never_shows_its_token(client: GitHubClient) -> None:
    clone = pickle.loads(pickle.dumps(client))

    assert clone == client and clone.registration_token().token
    assert PAT not in repr(client)


@pytest.mark.parametrize("scope", ["", "a/b/c", "/repo", "owner/"])
def test_a_malformed_scope_is_a_config_error(scope: str) -> None:
    with pytest.raises(ConfigError, match="invalid GitHub scope"):
        GitHubClient("https://api.github.com", PAT, scope)


# -- the runner stand-in (config.sh / run.sh) --------------------------------------------


def test_a_runner_registers_heartbeats_online_and_is_gone_after_config_remove(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    token = client.registration_token().token
    configured = register(runner_dir, standin, token)
    assert configured.returncode == 0, configured.stderr
    settings = json.loads((runner_dir / ".runner").read_text(encoding="utf-8-sig"))
    assert settings["agentName"] == "i-0abc-1" and settings["labels"] == ["run-42", "runner-pool-p"]
    assert (runner_dir / ".credentials").exists()
    assert runner_named(client, "i-0abc-1") == GitHubRunner(
        id=settings["agentId"], name="i-0abc-1", status="offline", busy=False, labels=("run-42", "runner-pool-p"))

    run = start_run_sh(runner_dir)
    try:
        online = eventually(lambda: (r := runner_named(client, "i-0abc-1")) is not None and r.status == "online")
    finally:
        code, out, err = stop_run_sh(run)
    assert online and code == 0 and "Listening for Jobs" in out

    removal = client.removal_token().token
    removed = config(runner_dir, "remove", "--token", removal)
    assert removed.returncode == 0, removed.stderr
    assert client.list_runners() == []
    assert not (runner_dir / ".runner").exists() and not (runner_dir / ".credentials").exists()
    for output in (configured.stdout + configured.stderr, out + err, removed.stdout + removed.stderr):
        assert token not in output and removal not in output


def test_a_runner_goes_offline_when_its_heartbeats_stop(client: GitHubClient, standin: GitHubStandIn) -> None:
    status, registered = http("POST", f"{standin.url}/_runner/register", {
        "url": f"{standin.url}/{SCOPE}", "token": client.registration_token().token, "name": "i-7-1",
        "labels": ["runner-pool-p"], "replace": True})
    assert status == 200
    assert http("POST", f"{standin.url}/_runner/ping", {"id": registered["id"]}) == (204, None)

    def status_of_runner() -> str:
        runner = runner_named(client, "i-7-1")
        return runner.status if runner else "missing"

    assert status_of_runner() == "online"
    assert eventually(lambda: status_of_runner() == "offline")


def test_an_expired_registration_token_fails_config_and_registers_nothing(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    token = client.registration_token().token
    assert http("POST", f"{standin.url}/_control/expire-tokens")[0] == 200

    configured = register(runner_dir, standin, token)

    assert configured.returncode != 0 and "registration token expired" in configured.stderr
    assert token not in configured.stdout + configured.stderr
    assert not (runner_dir / ".runner").exists()
    assert client.list_runners() == []


def test_a_token_issued_for_another_repository_is_refused(
        runner_dir: Path, standin: GitHubStandIn) -> None:
    other = GitHubClient(standin.url, PAT, "octo/other", retry=FAST_RETRY)

    configured = register(runner_dir, standin, other.registration_token().token)

    assert configured.returncode != 0 and "issued for octo/other" in configured.stderr
    assert standin.state()["runners"] == []


def test_config_refuses_to_configure_a_runner_twice(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    token = client.registration_token().token
    assert register(runner_dir, standin, token).returncode == 0

    again = register(runner_dir, standin, token, "i-0abc-2")

    assert again.returncode == 1 and "already configured" in again.stderr
    assert [r.name for r in client.list_runners()] == ["i-0abc-1"]


def test_config_fails_cleanly_when_github_cannot_be_reached(runner_dir: Path) -> None:
    with GitHubStandIn(pat=PAT) as gone:
        url = gone.url

    configured = config(runner_dir, "--unattended", "--url", f"{url}/{SCOPE}", "--token", "T", "--name", "n")

    assert configured.returncode == 1 and "could not reach" in configured.stderr
    assert not (runner_dir / ".runner").exists()


def test_replacing_a_runner_keeps_its_id_and_stops_the_old_listener(
        runner_dir: Path, tmp_path: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    token = client.registration_token().token
    assert register(runner_dir, standin, token).returncode == 0
    first_id = json.loads((runner_dir / ".runner").read_text(encoding="utf-8-sig"))["agentId"]
    old = start_run_sh(runner_dir)
    second_dir = tmp_path / "second"
    shutil.copytree(RUNNER_SOURCE, second_dir, ignore=shutil.ignore_patterns("__pycache__", ".runner", ".credentials"))

    assert register(second_dir, standin, token).returncode == 0

    second_id = json.loads((second_dir / ".runner").read_text(encoding="utf-8-sig"))["agentId"]
    try:
        old_exited = eventually(lambda: old.poll() is not None)
    finally:
        code, _, err = stop_run_sh(old)
    assert second_id == first_id
    assert old_exited and code == 2 and "deleted" in err


def test_a_fail_fault_breaks_registration_only_for_matching_names(
        runner_dir: Path, tmp_path: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    assert http("POST", f"{standin.url}/_control/faults",
                {"name_contains": "i-bad", "mode": "fail", "count": None})[0] == 201
    token = client.registration_token().token

    failed = register(runner_dir, standin, token, "i-bad-1")
    good_dir = tmp_path / "good"
    shutil.copytree(RUNNER_SOURCE, good_dir, ignore=shutil.ignore_patterns("__pycache__"))
    succeeded = register(good_dir, standin, token, "i-good-1")

    assert failed.returncode != 0 and "HTTP 500" in failed.stderr
    assert succeeded.returncode == 0
    assert [r.name for r in client.list_runners()] == ["i-good-1"]


def test_a_counted_fail_fault_lets_the_retry_through(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    standin.add_fault("fail", name_contains="i-0abc", count=1)
    token = client.registration_token().token

    assert register(runner_dir, standin, token).returncode != 0
    assert register(runner_dir, standin, token).returncode == 0
    assert standin.state()["faults"] == []


def test_a_delay_fault_slows_registration_but_it_succeeds(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    http("POST", f"{standin.url}/_control/faults", {"name_contains": "i-0abc", "mode": "delay", "delay_s": 0.5})
    token = client.registration_token().token

    started = time.monotonic()
    configured = register(runner_dir, standin, token)

    assert configured.returncode == 0 and time.monotonic() - started >= 0.5
    assert runner_named(client, "i-0abc-1") is not None


def test_a_hang_fault_holds_registration_until_the_faults_are_cleared(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    standin.add_fault("hang", name_contains="i-0abc")
    token = client.registration_token().token
    hung = subprocess.Popen(
        ["bash", str(runner_dir / "config.sh"), "--unattended", "--url", f"{standin.url}/{SCOPE}",
         "--token", token, "--name", "i-0abc-1"],
        cwd=runner_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert eventually(lambda: standin.state()["requests"].get("POST /_runner/register"))
        assert hung.poll() is None

        assert http("DELETE", f"{standin.url}/_control/faults") == (204, None)

        assert hung.wait(timeout=WAIT_S) == 0
    finally:
        if hung.poll() is None:
            hung.kill()
        hung.communicate(timeout=WAIT_S)
    assert runner_named(client, "i-0abc-1") is not None


def test_stopping_the_stand_in_releases_a_hung_registration() -> None:
    standin = GitHubStandIn(pat=PAT).start()
    standin.add_fault("hang", name_contains="")
    answers: list[int] = []

    def register_call() -> None:
        answers.append(http("POST", f"{standin.url}/_runner/register",
                            {"url": f"{standin.url}/{SCOPE}", "token": "x", "name": "n"})[0])

    caller = threading.Thread(target=register_call)
    caller.start()
    eventually(lambda: standin.state()["requests"].get("POST /_runner/register"))
    standin.stop()
    caller.join(WAIT_S)

    assert not caller.is_alive() and answers == [503]


def test_run_sh_exits_2_when_the_runner_is_deleted_through_the_api(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    assert register(runner_dir, standin, client.registration_token().token).returncode == 0
    run = start_run_sh(runner_dir)
    try:
        runner = eventually(lambda: (r := runner_named(client, "i-0abc-1")) and r.status == "online" and r)
        assert runner, "run.sh never came online"

        assert client.delete_runner(runner.id) is True

        assert eventually(lambda: run.poll() is not None)
    finally:
        code, out, _ = stop_run_sh(run)
    assert code == 2 and "Listening for Jobs" in out


def test_run_sh_refuses_to_start_when_not_configured(runner_dir: Path) -> None:
    run = start_run_sh(runner_dir)
    _, err = run.communicate(timeout=WAIT_S)

    assert run.returncode == 1 and "Not configured" in err


def test_config_remove_succeeds_when_github_already_forgot_the_runner(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    assert register(runner_dir, standin, client.registration_token().token).returncode == 0
    client.delete_runner(client.list_runners()[0].id)

    removed = config(runner_dir, "remove", "--token", client.removal_token().token)

    assert removed.returncode == 0 and "Does not exist" in removed.stdout
    assert not (runner_dir / ".runner").exists()


def test_config_remove_with_a_registration_token_fails_and_keeps_the_runner(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    token = client.registration_token().token
    assert register(runner_dir, standin, token).returncode == 0

    removed = config(runner_dir, "remove", "--token", token)

    assert removed.returncode != 0 and "unknown removal token" in removed.stderr
    assert (runner_dir / ".runner").exists() and len(client.list_runners()) == 1


def _python39() -> str | None:
    for candidate in (shutil.which("python3.9"), "/root/.pyenv/versions/3.9.18/bin/python3"):
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def test_the_runner_stand_in_runs_on_python_3_9(
        runner_dir: Path, client: GitHubClient, standin: GitHubStandIn) -> None:
    python = _python39()
    if python is None:
        pytest.skip("no python3.9 on this machine")

    configured = config(runner_dir, "--unattended", "--url", f"{standin.url}/{SCOPE}", "--token",
                        client.registration_token().token, "--name", "i-39-1", python=python)
    assert configured.returncode == 0, configured.stderr
    assert [r.labels for r in client.list_runners()] == [("self-hosted", "Linux", "X64")]
    run = start_run_sh(runner_dir, python=python)
    try:
        online = eventually(lambda: client.list_runners()[0].status == "online")
    finally:
        code, out, _ = stop_run_sh(run)
    removed = config(runner_dir, "remove", "--token", client.removal_token().token, python=python)

    assert online and code == 0 and "Listening for Jobs" in out
    assert removed.returncode == 0 and client.list_runners() == []


# -- control endpoints and the process form ----------------------------------------------


def test_control_state_lists_every_scope_and_reset_wipes_it(standin: GitHubStandIn) -> None:
    standin.add_runner("octo/a", "one", ["x"], status="online")
    standin.add_runner("octo-org", "two", [])

    status, state = http("GET", f"{standin.url}/_control/state")

    assert status == 200
    assert [(r["scope"], r["name"], r["status"]) for r in state["runners"]] == [
        ("octo/a", "one", "online"), ("octo-org", "two", "offline")]
    assert http("POST", f"{standin.url}/_control/reset") == (204, None)
    assert http("GET", f"{standin.url}/_control/state")[1]["runners"] == []


def test_the_stand_in_runs_as_a_process_until_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane.local.github_standin", "--port", "0", "--pat", "proc-pat"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        client = GitHubClient(url, "proc-pat", SCOPE, retry=FAST_RETRY)
        assert client.registration_token().token
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=WAIT_S)
    assert process.returncode == 0


# -- runner labels and jobs (relabelling warm hits) --------------------------------------


@pytest.mark.parametrize("scope", [SCOPE, "octo"], ids=["repository", "organization"])
def test_labels_are_set_replaced_and_removed_through_the_client(standin: GitHubStandIn, scope: str) -> None:
    client = GitHubClient(standin.url, PAT, scope, retry=FAST_RETRY)
    rid = standin.add_runner(scope, "i-0lab-1", [], status="online")

    assert set(client.set_labels(rid, ["run-1", "runner-pool-p"])) == {"run-1", "runner-pool-p"}
    assert set((client.get_runner(rid) or GitHubRunner(0, "", "", False, ())).labels) == {"run-1", "runner-pool-p"}
    assert set(client.set_labels(rid, ["run-2", "runner-pool-p"])) == {"run-2", "runner-pool-p"}   # replaces
    assert client.set_labels(rid, []) == ()                                                         # removes all
    assert (client.get_runner(rid) or GitHubRunner(0, "", "", False, ("x",))).labels == ()
    with pytest.raises(ConfigError):                                    # another scope's runner: 404
        GitHubClient(standin.url, PAT, "octo/elsewhere", retry=FAST_RETRY).set_labels(rid, ["run-3"])


def test_a_batch_of_label_changes_reports_each_runner_and_a_refusal_by_name(
        client: GitHubClient, standin: GitHubStandIn) -> None:
    ids = [standin.add_runner(SCOPE, f"i-0b{n}-1", [], status="online") for n in range(5)]
    standin.add_fault("fail", name_contains="i-0b3-", path_contains="/labels", status=422, count=1,
                      message="Validation Failed")

    out = client.set_labels_many([(rid, ["run-9"]) for rid in ids])

    assert isinstance(out[ids[3]], RunnerPoolError) and "422" in str(out[ids[3]])
    assert all(out[rid] == ("run-9",) for rid in ids if rid != ids[3])
    assert {r.id: r.labels for r in client.list_runners()}[ids[3]] == ()    # the refused one is unchanged
    assert standin.state()["requests"]["PUT /repos/{owner}/{repo}/actions/runners/{runner_id}/labels"] == 5


def test_a_label_delay_shows_the_old_labels_until_the_change_takes_effect(
        client: GitHubClient, standin: GitHubStandIn) -> None:
    rid = standin.add_runner(SCOPE, "i-0dly-1", ["old"], status="online")
    standin.set_label_delay(0.5)
    try:
        assert client.set_labels(rid, ["new"]) == ("new",)                 # what GitHub stored
        assert (client.get_runner(rid) or GitHubRunner(0, "", "", False, ())).labels == ("old",)
        assert eventually(lambda: (client.get_runner(rid) or GitHubRunner(0, "", "", False, ())).labels
                          == ("new",), timeout_s=5)
    finally:
        standin.set_label_delay(0.0)


def test_jobs_go_to_a_listening_runner_on_its_current_labels_only(
        client: GitHubClient, standin: GitHubStandIn, runner_dir: Path) -> None:
    assert register(runner_dir, standin, standin.issue_token(SCOPE)[0]).returncode == 0
    process = start_run_sh(runner_dir)
    try:
        runner = eventually(lambda: (r := runner_named(client, "i-0abc-1")) and r.status == "online" and r)
        stale = standin.add_job(SCOPE, ["run-41"], "a job for a label it no longer has")
        client.set_labels(runner.id, ["run-43"])
        wanted = standin.add_job(SCOPE, ["run-43"], "a job for its new label", duration_s=0.5)
        running = eventually(lambda: next((j for j in standin.jobs() if j["id"] == wanted
                                           and j["status"] == "in_progress"), None))
        assert running["runner_id"] == runner.id and list(running["runner_labels"]) == ["run-43"]
        assert (client.get_runner(runner.id) or runner).busy
        assert eventually(lambda: next(j for j in standin.jobs() if j["id"] == wanted)["status"] == "completed")
        assert not (client.get_runner(runner.id) or runner).busy
        assert next(j for j in standin.jobs() if j["id"] == stale)["status"] == "queued"
    finally:
        stop_run_sh(process)
