"""Stand-in for GitHub's ``actions-runner`` (``config.sh`` and ``run.sh``).

The instance agent drives the runner only through its command line, so this
file copies that command line and the effects the agent can observe, and talks
to :mod:`controlplane.local.github_standin` instead of github.com:

``config.sh --unattended --url URL --name N --labels a,b [--replace] ...``
    registers through ``POST <origin>/_runner/register`` and writes ``.runner``
    and ``.credentials`` in the runner directory (the directory holding the
    scripts, as the real runner does; agents run it from there). Exits 1 if
    already configured, on any HTTP error or when GitHub cannot be reached.
    Like the real runner, every argument may come from the environment as
    ``ACTIONS_RUNNER_INPUT_<NAME>`` (``ACTIONS_RUNNER_INPUT_TOKEN`` for
    ``--token``), which is read and then unset, so the token need not be on the
    command line (where any local user reads it in ``/proc/<pid>/cmdline``).
``config.sh remove --token T``
    removes the registration (``POST /_runner/remove``) and deletes both files.
    Like the real runner it succeeds when GitHub no longer knows the runner or
    the runner is not configured; a bad or expired token fails.
``run.sh [--jitconfig X]`` (or ``ACTIONS_RUNNER_INPUT_JITCONFIG``)
    with a just-in-time config first writes the settings and credential files
    it carries (as the real runner does), then heartbeats (``POST /_runner/ping``, every ``RUNNER_POOL_STANDIN_PING_S``,
    default 2 s), prints ``Listening for Jobs`` once connected, and runs until
    SIGTERM/SIGINT (exit 0) or until GitHub says the registration is gone
    (404: exit 2), which is what a real listener does when its runner is
    deleted. Connection errors are retried, as the real listener does. A ping
    may hand it a job (the GitHub stand-in matches queued jobs to the runner's
    current labels): it prints ``Running job: <name>``, keeps pinging, and
    after the job's ``duration_s`` reports it done (``POST /_runner/job``); a
    just-in-time runner then exits 0, as the real one does after its one job.

Like the real runner, ``.runner`` is UTF-8 *with a byte-order mark*: read it
with ``encoding="utf-8-sig"``. Tokens are never printed.

Stdlib only and Python >= 3.9 (annotations are strings: ``from __future__``):
it runs on the instance next to the agent.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.abspath(__file__))
SETTINGS_FILE = ".runner"
CREDENTIALS_FILE = ".credentials"
DEFAULT_PING_S = 2.0
HTTP_TIMEOUT_S = float(os.environ.get("RUNNER_POOL_STANDIN_HTTP_TIMEOUT_S", "100"))   # the real runner's
PING_TIMEOUT_S = 10.0
DEFAULT_LABELS = ["self-hosted", "Linux", "X64"]
ALREADY_CONFIGURED = ("Cannot configure the runner because it is already configured. "
                      "To reconfigure the runner, run 'config.cmd remove' or './config.sh remove' first.")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REGISTRATION_GONE = 2
INPUT_PREFIX = "ACTIONS_RUNNER_INPUT_"

# The stand-in is always local: never send its traffic through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpFailure(Exception):
    """An HTTP call that did not succeed; ``status`` is 0 when no answer came."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _say(line: str = "") -> None:
    print(line, flush=True)


def _error(line: str) -> None:
    print(f"Error: {line}", file=sys.stderr, flush=True)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"--url must be an absolute URL, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _post(origin: str, path: str, body: dict[str, Any], timeout_s: float) -> tuple[int, Any]:
    """POST JSON; returns ``(status, parsed body or None)``, raises :class:`HttpFailure` otherwise."""
    request = urllib.request.Request(
        origin + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "actions-runner-standin"},
    )
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        raise HttpFailure(exc.code, f"HTTP {exc.code} from POST {origin}{path}: {_message_of(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HttpFailure(0, f"could not reach {origin}: {reason}") from None


def _message_of(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        return exc.reason or ""
    return str(body.get("message", "")) if isinstance(body, dict) else ""


def _env_input(name: str) -> str | None:
    """``ACTIONS_RUNNER_INPUT_<NAME>``, removed from the environment once read (as the runner does)."""
    key = INPUT_PREFIX + name.upper()
    value = os.environ.pop(key, None)
    return value or None


def _path(name: str) -> str:
    return os.path.join(ROOT, name)


def _write_json(name: str, data: dict[str, Any], bom: bool, mode: int = 0o644) -> None:
    """Write atomically, so an interrupted config never leaves half a file."""
    target = _path(name)
    tmp = target + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8-sig" if bom else "utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, target)


def _read_json(name: str) -> dict[str, Any] | None:
    try:
        with open(_path(name), encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


def _remove_file(name: str, what: str) -> None:
    try:
        os.remove(_path(name))
    except FileNotFoundError:
        _say(f"Does not exist. Skipping Removing {what}")
    else:
        _say(f"\u221a Removed {what}")


# -- config ---------------------------------------------------------------------------


def _config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="config.sh", allow_abbrev=False, add_help=False)
    parser.add_argument("--unattended", action="store_true")
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--name")
    parser.add_argument("--labels", default="")
    parser.add_argument("--no-default-labels", action="store_true")
    parser.add_argument("--replace", action="store_true")
    parser.add_argument("--disableupdate", action="store_true")
    parser.add_argument("--ephemeral", action="store_true")
    parser.add_argument("--work", default="_work")
    parser.add_argument("--runnergroup", default="Default")
    return parser


def configure(argv: Sequence[str]) -> int:
    args, unknown = _config_parser().parse_known_args(list(argv))
    if unknown:
        _error("Unrecognized command-line input arguments: " + ", ".join(a for a in unknown if a.startswith("-")))
        return EXIT_FAILED
    args.token = _env_input("token") or args.token
    args.url = _env_input("url") or args.url
    if os.path.exists(_path(SETTINGS_FILE)):
        _error(ALREADY_CONFIGURED)
        return EXIT_FAILED
    if not args.url or not args.token:
        _error("--url and --token are required (the stand-in runner is always unattended)")
        return EXIT_FAILED
    try:
        origin = _origin(args.url)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_FAILED
    name = args.name or socket.gethostname()
    custom = [label.strip() for label in args.labels.split(",") if label.strip()]
    labels = custom if args.no_default_labels else DEFAULT_LABELS + custom

    _say("# Authentication")
    _say()
    try:
        _, reply = _post(origin, "/_runner/register", {
            "url": args.url, "token": args.token, "name": name, "labels": custom,
            "default_labels": not args.no_default_labels, "replace": args.replace,
            "ephemeral": args.ephemeral,
        }, HTTP_TIMEOUT_S)
    except HttpFailure as exc:
        _error(f"registering runner {name} failed: {exc.message}")
        return EXIT_FAILED
    _say("\u221a Connected to GitHub")
    _say()
    _say("# Runner Registration")
    _say()
    _say("\u221a Runner successfully added")
    _say("\u221a Runner connection is good")
    _say()
    _say("# Runner settings")
    _say()
    _write_json(CREDENTIALS_FILE, {"scheme": "StandIn", "data": {"credential": reply.get("credential")}},
                bom=False, mode=0o600)
    _write_json(SETTINGS_FILE, {
        "agentId": reply["id"], "agentName": name, "poolId": 1, "poolName": args.runnergroup,
        "serverUrl": origin, "gitHubUrl": args.url, "workFolder": args.work,
        "labels": labels, "ephemeral": args.ephemeral,
    }, bom=True)
    _say("\u221a Settings Saved.")
    _say()
    return EXIT_OK


def unconfigure(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="config.sh remove", allow_abbrev=False, add_help=False)
    parser.add_argument("--token")
    parser.add_argument("--unattended", action="store_true")
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        _error("Unrecognized command-line input arguments: " + ", ".join(a for a in unknown if a.startswith("-")))
        return EXIT_FAILED
    args.token = _env_input("token") or args.token

    _say("# Runner removal")
    _say()
    settings = _read_json(SETTINGS_FILE)
    has_credentials = os.path.exists(_path(CREDENTIALS_FILE))
    if settings is not None and has_credentials:
        if not args.token:
            _error("--token is required to remove the runner")
            return EXIT_FAILED
        try:
            _post(_origin(settings["gitHubUrl"]), "/_runner/remove",
                  {"url": settings["gitHubUrl"], "token": args.token, "id": settings["agentId"]}, HTTP_TIMEOUT_S)
        except HttpFailure as exc:
            if exc.status != 404:
                _error(f"Failed: Removing runner from the server: {exc.message}")
                return EXIT_FAILED
            _say("Does not exist. Skipping Removing runner from the server")
        else:
            _say("\u221a Runner removed successfully")
    else:
        _say("Cannot connect to server, because config files are missing. "
             "Skipping removing runner from the server.")
    _remove_file(CREDENTIALS_FILE, ".credentials")
    _remove_file(SETTINGS_FILE, ".runner")
    _say()
    return EXIT_OK


# -- run --------------------------------------------------------------------------------


def _write_jitconfig(encoded: str) -> str:
    """Unpack a just-in-time config (base64 JSON of base64 file contents) into the runner's files."""
    try:
        files = json.loads(base64.b64decode(encoded))
        if not isinstance(files, dict):
            raise ValueError("not a JSON object")
        contents = {name: base64.b64decode(files[name]) for name in (SETTINGS_FILE, CREDENTIALS_FILE)}
    except (ValueError, KeyError, TypeError) as exc:
        return f"invalid jitconfig: {exc}"
    for name, data in contents.items():
        target = _path(name)
        fd = os.open(target + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(target + ".tmp", target)
    return ""


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.sh", allow_abbrev=False, add_help=False)
    parser.add_argument("--jitconfig")
    args, _ = parser.parse_known_args(list(argv))
    jitconfig = _env_input("jitconfig") or args.jitconfig
    if jitconfig:
        if os.path.exists(_path(SETTINGS_FILE)):
            _error(ALREADY_CONFIGURED)
            return EXIT_FAILED
        problem = _write_jitconfig(jitconfig)
        if problem:
            _error(problem)
            return EXIT_FAILED
    settings = _read_json(SETTINGS_FILE)
    credentials = _read_json(CREDENTIALS_FILE)
    if settings is None or credentials is None:
        _error("Not configured. Run config.(sh/cmd) to configure the runner.")
        return EXIT_FAILED
    interval_s = float(os.environ.get("RUNNER_POOL_STANDIN_PING_S") or DEFAULT_PING_S)
    origin = str(settings.get("serverUrl") or _origin(settings["gitHubUrl"]))
    body = {"id": settings["agentId"], "credential": credentials.get("data", {}).get("credential") or None}

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    connected = False
    job: dict[str, Any] | None = None           # the job being run and when it ends (monotonic)
    job_ends = 0.0
    while True:
        if job is not None and time.monotonic() >= job_ends:
            try:
                _post(origin, "/_runner/job", {**body, "job_id": job["id"], "result": "succeeded"}, PING_TIMEOUT_S)
            except HttpFailure as exc:
                if exc.status == 404:
                    _error(f"The runner registration has been deleted from the server: {exc.message}")
                    return EXIT_REGISTRATION_GONE
                _say(f"Could not report job {job['name']}: {exc.message}. Retrying.")
            else:
                _say(_stamp() + f": Job {job['name']} completed with result: Succeeded")
                job = None
                if settings.get("ephemeral"):   # a just-in-time runner takes one job, then exits
                    return EXIT_OK
        try:
            _, reply = _post(origin, "/_runner/ping", body, PING_TIMEOUT_S)
        except HttpFailure as exc:
            if exc.status == 404:
                _error(f"The runner registration has been deleted from the server: {exc.message}")
                return EXIT_REGISTRATION_GONE
            if connected or exc.status:
                _say(f"Runner connect error: {exc.message}. Retrying until reconnected.")
            connected = False
        else:
            if not connected:
                _say("\u221a Connected to GitHub")
                _say()
                _say("Current runner version: 'standin'")
                _say(_stamp() + ": Listening for Jobs")
            connected = True
            offered = reply.get("job") if isinstance(reply, dict) else None
            if isinstance(offered, dict) and job is None:
                job = offered
                job_ends = time.monotonic() + float(offered.get("duration_s") or 0.0)
                _say(_stamp() + f": Running job: {offered.get('name')}")
        wait_s = interval_s if job is None else max(0.0, min(interval_s, job_ends - time.monotonic()))
        if stopping.wait(wait_s):
            _say("Exiting...")
            return EXIT_OK


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())


def main(argv: list[str]) -> int:
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")   # the real runner prints "\u221a"; never crash on a C locale
    if argv[:1] == ["config"]:
        rest = argv[1:]
        if rest[:1] == ["remove"]:
            return unconfigure(rest[1:])
        return configure(rest)
    if argv[:1] == ["run"]:
        return run(argv[1:])
    _error("usage: standin_runner.py config [remove] ARGS... | run")
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
