"""A local stand-in for the slice of GitHub that runner-pool touches.

One HTTP origin plays both parts of github.com that matter to self-hosted
runners:

* the **REST API** the control plane calls (``/repos/{owner}/{repo}/...`` and
  ``/orgs/{org}/...``): registration and removal tokens, just-in-time runner
  configs (``generate-jitconfig``), list/get/delete runners. Shapes, status
  codes and pagination (``per_page`` default 30, at most 100) follow
  api.github.com, so :mod:`controlplane.github` runs against it unchanged.
  Every call needs ``Authorization: token <pat>`` (or ``Bearer``) or an
  installation token, else 401 ``Bad credentials``.
* **GitHub App installations** (when started with ``app_id`` and the App's
  public key): ``POST /app/installations/{id}/access_tokens`` checks an RS256
  JWT signed with the App's private key (issuer = the App id, unexpired, at
  most 10 minutes long, as GitHub requires) and answers an installation token
  valid one hour, which the REST API then accepts like the PAT.
* the **runner service** that ``config.sh`` and ``run.sh`` talk to
  (``/_runner/register``, ``/_runner/remove``, ``/_runner/ping``). Only our
  runner stand-in (``controlplane/local/actions_runner``) calls these; they
  check the registration/removal token exactly where GitHub would (unknown,
  expired, or issued for another repository or org), and a runner is
  ``online`` while it has pinged within ``offline_after_s``.

* the **label API** of a runner (``GET|POST|PUT|DELETE
  .../actions/runners/{runner_id}/labels`` and ``DELETE .../labels/{name}``),
  with an optional delay (``label_delay_s``) before a change takes effect:
  until then the runner is listed, and matched to jobs, with its old labels,
  while the write itself answers with the labels it stored (as GitHub does).
  That lets a test prove a caller waits for a change instead of assuming it.
* **jobs**: ``POST /_control/jobs`` queues a job with labels; an online runner
  that is not busy takes the oldest queued job of its scope whose labels are
  all among the runner's *current* labels, in the answer to its next ping
  (``busy`` while it runs; the runner reports it done on ``/_runner/job``).
  A just-in-time runner is removed after its one job, as on GitHub.

``/_control/*`` lets tests and the instance simulator inject faults into
registration (fail, hang, delay) and into any request by path or by the
runner's name (``name_contains`` also selects the label endpoints of that
runner: a relabel can be refused), set the label delay, queue and read jobs,
expire every token, read the whole state with per-endpoint request counts,
and reset. The same operations exist as
methods for in-process use, plus :meth:`GitHubStandIn.add_runner` to inject
drift (a runner GitHub knows and no instance owns).

Why the stand-in exists: provisioning is only accepted when every runner is
registered, so the local default needs something that registers runners,
rejects bad tokens and loses runners the way GitHub does, without network or
secrets. It keeps everything in memory behind one lock; request handlers run
in their own threads (werkzeug's threaded server, :mod:`controlplane.local.wsgi`),
and the only waits (the ``delay`` and ``hang`` faults) are bounded and end early
on :meth:`stop`.

Routing is werkzeug's: ``_routes()`` near the bottom lists every endpoint as
(method, rule, handler, kind), and its docstring says how to add one.

Differences from github.com worth knowing: scopes (a repository or an org)
exist on first use unless ``scopes`` is given; names compare
case-insensitively; ``--replace`` keeps the runner's id (as GitHub does) and
invalidates the old registration's credential, so a ``run.sh`` still running
under the old one sees 404 and exits.

Run it as a process with ``python -m controlplane.local.github_standin --port 0
--pat X``: it prints one line ``{"url": ...}`` and serves until SIGTERM.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlencode, urlsplit

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from controlplane.local.wsgi import Served

DEFAULT_PAT = "standin-pat"
JWT_MAX_LIFETIME_S = 600                # GitHub refuses an App JWT that lives longer than 10 minutes
JWT_LEEWAY_S = 60
DEFAULT_TOKEN_TTL_S = 3600.0            # GitHub's registration and removal tokens live one hour
DEFAULT_OFFLINE_AFTER_S = 10.0
HANG_LIMIT_S = 300.0                    # a ``hang`` fault gives up after this, so no thread lives forever
HANG_POLL_S = 0.05
SERVE_POLL_S = 0.2                      # how often ``main`` looks for SIGTERM
DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 100
DEFAULT_LABELS = ("self-hosted", "Linux", "X64")   # what config.sh adds without --no-default-labels
FAULT_MODES = ("fail", "hang", "delay")
RUNNER_STATUSES = ("online", "offline")
REGISTRATION = "registration"
REMOVAL = "removal"


@dataclass(frozen=True)
class FaultRule:
    """One injected fault.

    ``name_contains`` selects ``/_runner/register`` requests and a runner's
    label endpoints (``.../runners/{id}/labels``) by the runner's name;
    ``path_contains`` selects any REST or runner request by path (e.g.
    ``/actions/runners`` to make the API return 5xx). With both, both must
    match. ``count`` is how many requests it still applies to (``None``:
    always); ``status`` is the HTTP status of a ``fail``.
    """

    mode: str
    name_contains: str | None = None
    path_contains: str | None = None
    delay_s: float = 0.0
    count: int | None = None
    status: int = 500
    message: str | None = None              # the error message of a ``fail`` (default: names the request)

    def matches(self, path: str, runner_name: str | None) -> bool:
        if self.name_contains is not None and (runner_name is None or self.name_contains not in runner_name):
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass(frozen=True)
class _Runner:
    id: int
    scope: str
    name: str
    labels: tuple[tuple[str, str], ...]     # (name, "read-only" | "custom")
    credential: str                         # changes on --replace; stale pings get 404
    last_ping_monotonic: float | None
    fixed_status: str | None                # set by add_runner(): drift keeps its status
    ephemeral: bool = False                 # just-in-time: removed after its one job
    # A label change not in effect yet: (labels, monotonic time it takes effect); see label_delay_s.
    pending_labels: tuple[tuple[tuple[str, str], ...], float] | None = None
    labels_changed_at: float | None = None  # epoch when the current labels took effect (None: at registration)


@dataclass(frozen=True)
class _Job:
    id: int
    scope: str
    name: str
    labels: tuple[str, ...]
    duration_s: float
    status: str = "queued"                  # queued | in_progress | completed | abandoned
    runner_id: int | None = None
    runner_name: str | None = None
    runner_labels: tuple[str, ...] = ()     # the runner's labels when it took the job
    queued_at: float = 0.0                  # epoch seconds
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class _Token:
    kind: str                               # REGISTRATION | REMOVAL
    scope: str
    expires_at: float                       # epoch seconds


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any = None                        # JSON-able; None sends no body
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    params: dict[str, str]                  # from the path template
    query: dict[str, str]
    body: Any
    authorization: str = ""                 # the Authorization header (App JWTs are checked per route)


class _Fail(Exception):
    """Raised by a handler to answer with an error JSON ``{"message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.reply = _Reply(status, {"message": message})


_Handler = Callable[["GitHubStandIn", _Request], _Reply]


@dataclass(frozen=True)
class _Route:
    method: str
    rule: str                               # werkzeug syntax: ``/repos/<owner>/<repo>/actions/runners/<int:runner_id>``
    handler: _Handler
    kind: str                               # "api" (needs the PAT) | "app" | "runner" | "control"

    @property
    def template(self) -> str:
        """GitHub's documented spelling, ``/repos/{owner}/{repo}/...``: the key of the request counters."""
        return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", self.rule)


def _scope_of(params: dict[str, str]) -> str:
    if "org" in params:
        return params["org"].lower()
    return f"{params['owner']}/{params['repo']}".lower()


def _scope_from_url(url: object) -> str:
    """``http://host:port/owner/repo`` -> ``owner/repo``; ``.../org`` -> ``org``."""
    if not isinstance(url, str):
        raise _Fail(400, "url is required")
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if len(parts) not in (1, 2):
        raise _Fail(400, f"url must name a repository or an organization: {url}")
    return "/".join(parts).lower()


def _iso8601(epoch: float) -> str:
    whole = int(epoch)
    millis = int((epoch - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _int_field(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Fail(400, f"{key} must be an integer")
    return value


def _str_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _Fail(400, f"{key} is required")
    return value


def _body_dict(request: _Request) -> dict[str, Any]:
    if not isinstance(request.body, dict):
        raise _Fail(400, "a JSON object body is required")
    return request.body


def _labels_of(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Fail(400, "labels must be a list of strings")
    return [v.strip() for v in value if v.strip()]


class GitHubStandIn:
    """GitHub's runner REST API and runner service, in memory, on one local origin."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        pat: str = DEFAULT_PAT,
        token_ttl_s: float = DEFAULT_TOKEN_TTL_S,
        offline_after_s: float = DEFAULT_OFFLINE_AFTER_S,
        scopes: Iterable[str] | None = None,
        app_id: int | None = None,
        app_public_key: str = "",
        app_installation_id: int | None = None,
        label_delay_s: float = 0.0,
    ) -> None:
        """``scopes``: when given, only these repositories/orgs exist (others 404).
        ``app_*``: a GitHub App whose installation may mint tokens (its PEM public key).
        ``label_delay_s``: how long a label change takes to take effect (see the module docstring)."""
        self.host = host
        self.port = port
        self.pat = pat
        self.token_ttl_s = token_ttl_s
        self.offline_after_s = offline_after_s
        self.known_scopes = None if scopes is None else frozenset(s.lower() for s in scopes)
        self.app_id = app_id
        self.app_public_key = app_public_key
        self.app_installation_id = app_installation_id
        self.label_delay_s = label_delay_s
        # App installation tokens outlive reset(), as on GitHub: clients cache them for their hour.
        self._installation_tokens: dict[str, float] = {}      # value -> expires_at
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._served: Served | None = None
        self._url = ""
        self._wipe()

    def _wipe(self) -> None:
        self._runners: dict[int, _Runner] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[FaultRule] = []
        self._fault_generation = 0          # bumped by clear/reset: releases ``hang`` faults
        self._label_ids: dict[str, int] = {}
        self._jobs: dict[int, _Job] = {}
        self._next_job_id = 1
        self._requests: Counter[str] = Counter()
        self._tokens_issued = 0
        self._next_runner_id = 1

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> GitHubStandIn:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._served is not None:
            raise RuntimeError("the GitHub stand-in is already running")
        self._stopping.clear()
        self._served = Served(self._wsgi, host=self.host, port=self.port, name="github-standin",
                              server_version="GitHubStandIn/1")
        self._url = f"http://{self.host}:{self._served.port}"
        return self

    def stop(self) -> None:
        """Stop serving; requests held by ``hang``/``delay`` faults are answered 503."""
        self._stopping.set()
        served, self._served = self._served, None
        if served is not None:
            served.stop()

    def __enter__(self) -> GitHubStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://host:port``: the API base URL and the URL runners register against."""
        if self._served is None:
            raise RuntimeError("the GitHub stand-in is not running")
        return self._url

    # -- in-process control (the /_control endpoints call these) --------------------

    def add_runner(
        self, scope: str, name: str, labels: Sequence[str] = (), status: str = "offline",
    ) -> int:
        """Inject a runner GitHub knows about (drift); it keeps ``status``. Returns its id."""
        if status not in RUNNER_STATUSES:
            raise ValueError(f"status must be one of {RUNNER_STATUSES}, not {status!r}")
        with self._lock:
            runner = _Runner(
                id=self._next_runner_id, scope=scope.lower(), name=name,
                labels=tuple((label, "custom") for label in labels),
                credential=secrets.token_hex(16), last_ping_monotonic=None, fixed_status=status,
            )
            self._next_runner_id += 1
            self._runners[runner.id] = runner
            return runner.id

    def issue_token(self, scope: str, kind: str = REGISTRATION) -> tuple[str, float]:
        """A new registration or removal token for ``scope``: ``(token, expires_at)``."""
        if kind not in (REGISTRATION, REMOVAL):
            raise ValueError(f"unknown token kind {kind!r}")
        value = "A" + secrets.token_hex(14).upper()
        expires_at = time.time() + self.token_ttl_s
        with self._lock:
            self._tokens[value] = _Token(kind=kind, scope=scope.lower(), expires_at=expires_at)
            self._tokens_issued += 1
        return value, expires_at

    def add_fault(
        self,
        mode: str,
        name_contains: str | None = None,
        path_contains: str | None = None,
        delay_s: float = 0.0,
        count: int | None = None,
        status: int = 500,
        message: str | None = None,
    ) -> FaultRule:
        """Add a fault rule (see :class:`FaultRule`)."""
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {FAULT_MODES}, not {mode!r}")
        if name_contains is None and path_contains is None:
            raise ValueError("a fault needs name_contains or path_contains")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or null for always)")
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        rule = FaultRule(mode=mode, name_contains=name_contains, path_contains=path_contains,
                         delay_s=float(delay_s), count=count, status=status, message=message)
        with self._lock:
            self._faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every fault rule and release requests held by ``hang``."""
        with self._lock:
            self._faults.clear()
            self._fault_generation += 1

    def expire_tokens(self) -> int:
        """Every token issued so far expires now. Returns how many."""
        now = time.time()
        with self._lock:
            for value, token in self._tokens.items():
                self._tokens[value] = replace(token, expires_at=min(token.expires_at, now))
            return len(self._tokens)

    def set_label_delay(self, delay_s: float) -> None:
        """Label changes from now on take effect ``delay_s`` after they are made (0: at once)."""
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        with self._lock:
            self.label_delay_s = float(delay_s)

    def add_job(self, scope: str, labels: Sequence[str], name: str | None = None,
                duration_s: float = 0.0) -> int:
        """Queue a job for runners of ``scope`` carrying every one of ``labels``. Returns its id."""
        wanted = tuple(label.strip() for label in labels if label.strip())
        if not wanted:
            raise ValueError("a job needs at least one label (runs-on)")
        if duration_s < 0:
            raise ValueError("duration_s must not be negative")
        with self._lock:
            job = _Job(id=self._next_job_id, scope=scope.lower(), name=name or f"job-{self._next_job_id}",
                       labels=wanted, duration_s=float(duration_s), queued_at=time.time())
            self._next_job_id += 1
            self._jobs[job.id] = job
            return job.id

    def jobs(self) -> list[dict[str, Any]]:
        """Every job with its status and the runner that took it."""
        with self._lock:
            return [asdict(j) for j in sorted(self._jobs.values(), key=lambda j: j.id)]

    def reset(self) -> None:
        """Wipe runners, tokens, faults and counters (held ``hang`` requests are released)."""
        with self._lock:
            generation = self._fault_generation
            self._wipe()
            self._fault_generation = generation + 1

    def state(self) -> dict[str, Any]:
        """All runners (with their ``scope``), tokens issued, requests by path template."""
        with self._lock:
            runners = [self._runner_json(r, with_scope=True) for r in sorted(self._runners.values(),
                                                                               key=lambda r: r.id)]
            return {
                "runners": runners,
                "jobs": [asdict(j) for j in sorted(self._jobs.values(), key=lambda j: j.id)],
                "label_delay_s": self.label_delay_s,
                "tokens_issued": self._tokens_issued,
                "requests": dict(self._requests),
                "faults": [asdict(f) for f in self._faults],
            }

    # -- HTTP plumbing -------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The WSGI app: route with werkzeug, count the request by its route, answer."""
        http = Request(environ)
        path = http.path.rstrip("/") or "/"
        try:
            route, params = _ROUTES.bind("github").match(path, http.method)
        except HTTPException:               # no such path, or not with this method: GitHub says 404
            route, params = None, {}
        with self._lock:
            self._requests[f"{http.method} {route.template if route else path}"] += 1
        reply = self._answer(http, route, dict(params), path)
        return self._response(reply)(environ, start_response)

    def _answer(self, http: Request, route: _Route | None, params: Mapping[str, Any], path: str) -> _Reply:
        if route is None:
            return _Reply(404, {"message": "Not Found"})
        try:
            request = _Request(
                method=route.method, path=path, params={k: str(v) for k, v in params.items()},
                query={k: v[-1] for k, v in http.args.lists()},
                body=self._read_body(http), authorization=http.headers.get("Authorization", ""),
            )
            if route.kind != "control":
                held = self._apply_fault(request)
                if held is not None:
                    return held
            if route.kind == "api":
                if not self._authorized(request.authorization):
                    return _Reply(401, {"message": "Bad credentials",
                                        "documentation_url": "https://docs.github.com/rest"})
                if self.known_scopes is not None and _scope_of(request.params) not in self.known_scopes:
                    return _Reply(404, {"message": "Not Found"})
            return route.handler(self, request)
        except _Fail as fail:
            return fail.reply

    @staticmethod
    def _read_body(http: Request) -> Any:
        raw = http.get_data(cache=False)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Fail(400, "Problems parsing JSON") from None

    def _authorized(self, header: str) -> bool:
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() not in ("token", "bearer"):
            return False
        if secrets.compare_digest(credential, self.pat):
            return True
        with self._lock:
            expires_at = self._installation_tokens.get(credential)
        return expires_at is not None and time.time() < expires_at

    @staticmethod
    def _response(reply: _Reply) -> Response:
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        response = Response(payload, reply.status, headers=list(reply.headers),
                            content_type="application/json; charset=utf-8")
        if reply.body is None:
            del response.headers["Content-Type"]
        return response

    # -- faults ----------------------------------------------------------------------

    def _apply_fault(self, request: _Request) -> _Reply | None:
        """The reply a matching fault forces, or ``None`` to carry on normally."""
        name = None
        if request.path == "/_runner/register" and isinstance(request.body, dict):
            raw_name = request.body.get("name")
            name = raw_name if isinstance(raw_name, str) else None
        with self._lock:
            if "runner_id" in request.params and "/labels" in request.path:      # a runner's label endpoints
                runner = self._runners.get(int(request.params["runner_id"]))
                name = runner.name if runner is not None else None
            index = next((i for i, f in enumerate(self._faults) if f.matches(request.path, name)), None)
            if index is None:
                return None
            rule = self._faults[index]
            if rule.count is not None and rule.count <= 1:
                del self._faults[index]
            elif rule.count is not None:
                self._faults[index] = replace(rule, count=rule.count - 1)
            generation = self._fault_generation
        if rule.mode == "fail":
            return _Reply(rule.status, {"message": rule.message
                                        or f"stand-in fault: {request.method} {request.path} failed"})
        if rule.mode == "delay":
            if self._stopping.wait(rule.delay_s):
                return _Reply(503, {"message": "the GitHub stand-in is stopping"})
            return None
        give_up = time.monotonic() + HANG_LIMIT_S
        while True:
            with self._lock:
                if self._fault_generation != generation:
                    return None
            if time.monotonic() >= give_up:
                return _Reply(504, {"message": f"stand-in fault: hung for {HANG_LIMIT_S:.0f} s"})
            if self._stopping.wait(HANG_POLL_S):
                return _Reply(503, {"message": "the GitHub stand-in is stopping"})

    # -- state helpers (call with the lock held) -------------------------------------

    def _status(self, runner: _Runner) -> str:
        if runner.fixed_status is not None:
            return runner.fixed_status
        last = runner.last_ping_monotonic
        fresh = last is not None and time.monotonic() - last <= self.offline_after_s
        return "online" if fresh else "offline"

    def _label_id(self, name: str) -> int:
        return self._label_ids.setdefault(name.lower(), len(self._label_ids) + 1)

    def _settle(self, runner: _Runner) -> _Runner:
        """The runner with a pending label change applied once its time has come (stored back)."""
        if runner.pending_labels is not None:
            labels, due = runner.pending_labels
            now = time.monotonic()
            if now >= due:
                runner = replace(runner, labels=labels, pending_labels=None,
                                 labels_changed_at=time.time() - (now - due))
                self._runners[runner.id] = runner
        return runner

    def _labels_json(self, labels: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"id": self._label_id(n), "name": n, "type": t} for n, t in labels]

    def _busy_job(self, runner_id: int) -> _Job | None:
        return next((j for j in self._jobs.values() if j.runner_id == runner_id and j.status == "in_progress"), None)

    def _runner_json(self, runner: _Runner, with_scope: bool = False) -> dict[str, Any]:
        runner = self._settle(runner)
        out: dict[str, Any] = {
            "id": runner.id,
            "name": runner.name,
            "os": "linux",
            "status": self._status(runner),
            "busy": self._busy_job(runner.id) is not None,
            "labels": self._labels_json(runner.labels),
        }
        if with_scope:
            out["scope"] = runner.scope
            out["labels_changed_at"] = runner.labels_changed_at
            out["pending_labels"] = (None if runner.pending_labels is None
                                     else [n for n, _ in runner.pending_labels[0]])
        return out

    def _runner_in(self, scope: str, runner_id: int) -> _Runner | None:
        runner = self._runners.get(runner_id)
        return self._settle(runner) if runner is not None and runner.scope == scope else None

    def _forget_runner(self, runner_id: int) -> None:
        """The runner is gone (deleted or replaced): a job it was running is abandoned."""
        job = self._busy_job(runner_id)
        if job is not None:
            self._jobs[job.id] = replace(job, status="abandoned", finished_at=time.time())

    def _check_token(self, value: object, kind: str, scope: str) -> None:
        token = self._tokens.get(value) if isinstance(value, str) else None
        if token is None or token.kind != kind:
            raise _Fail(401, f"unknown {kind} token")
        if time.time() >= token.expires_at:
            raise _Fail(401, f"{kind} token expired")
        if token.scope != scope:
            raise _Fail(401, f"{kind} token was issued for {token.scope}, not {scope}")

    # -- REST API handlers -----------------------------------------------------------

    def _create_token(self, request: _Request, kind: str) -> _Reply:
        value, expires_at = self.issue_token(_scope_of(request.params), kind)
        return _Reply(201, {"token": value, "expires_at": _iso8601(expires_at)})

    def _registration_token(self, request: _Request) -> _Reply:
        return self._create_token(request, REGISTRATION)

    def _remove_token(self, request: _Request) -> _Reply:
        return self._create_token(request, REMOVAL)

    def _list_runners(self, request: _Request) -> _Reply:
        try:
            per_page = min(MAX_PER_PAGE, max(1, int(request.query.get("per_page", DEFAULT_PER_PAGE))))
            page = max(1, int(request.query.get("page", 1)))
        except ValueError:
            raise _Fail(422, "per_page and page must be integers") from None
        scope = _scope_of(request.params)
        name = request.query.get("name")
        with self._lock:
            runners = sorted((r for r in self._runners.values() if r.scope == scope
                              and (name is None or r.name.lower() == name.lower())), key=lambda r: r.id)
            window = [self._runner_json(r) for r in runners[(page - 1) * per_page: page * per_page]]
        last_page = max(1, -(-len(runners) // per_page))
        return _Reply(200, {"total_count": len(runners), "runners": window},
                      headers=self._link_header(request, per_page, page, last_page))

    def _link_header(self, request: _Request, per_page: int, page: int, last: int) -> tuple[tuple[str, str], ...]:
        """GitHub's ``Link`` header, for clients that paginate by following it."""
        def link(target: int, rel: str) -> str:
            query = urlencode({**request.query, "per_page": per_page, "page": target})
            return f'<{self._url}{request.path}?{query}>; rel="{rel}"'

        rels = []
        if page > 1:
            rels += [link(page - 1, "prev"), link(1, "first")]
        if page < last:
            rels += [link(page + 1, "next"), link(last, "last")]
        return (("Link", ", ".join(rels)),) if rels else ()

    def _get_runner(self, request: _Request) -> _Reply:
        with self._lock:
            runner = self._runner_in(_scope_of(request.params), int(request.params["runner_id"]))
            if runner is None:
                return _Reply(404, {"message": "Not Found"})
            return _Reply(200, self._runner_json(runner))

    def _generate_jitconfig(self, request: _Request) -> _Reply:
        """Register one ephemeral runner now; its whole credential goes back encoded, as on GitHub."""
        body = _body_dict(request)
        name = _str_field(body, "name")
        labels = _labels_of(body.get("labels"))
        if not labels:
            raise _Fail(422, "labels must not be empty")
        _int_field(body, "runner_group_id")
        scope = _scope_of(request.params)
        with self._lock:
            if any(r.scope == scope and r.name.lower() == name.lower() for r in self._runners.values()):
                raise _Fail(409, f"Already exists - A runner with the name {name} already exists.")
            runner = _Runner(id=self._next_runner_id, scope=scope, name=name,
                             labels=tuple((n, "custom") for n in labels), credential=secrets.token_hex(16),
                             last_ping_monotonic=None, fixed_status=None, ephemeral=True)
            self._next_runner_id += 1
            self._runners[runner.id] = runner
            payload = self._runner_json(runner)
        settings = {"agentId": runner.id, "agentName": name, "poolId": 1, "poolName": "Default",
                    "serverUrl": self._url, "gitHubUrl": f"{self._url}/{scope}", "workFolder": "_work",
                    "labels": labels, "ephemeral": True}
        files = {".runner": json.dumps(settings).encode("utf-8-sig"),
                 ".credentials": json.dumps({"scheme": "StandIn",
                                             "data": {"credential": runner.credential}}).encode()}
        encoded = base64.b64encode(json.dumps(
            {k: base64.b64encode(v).decode() for k, v in files.items()}).encode()).decode()
        return _Reply(201, {"runner": payload, "encoded_jit_config": encoded})

    # Labels of one runner. GitHub keeps read-only labels (self-hosted, OS, arch: only when the runner
    # was registered without --no-default-labels) apart from custom ones; these endpoints change the
    # custom ones and answer with the runner's labels as stored. With ``label_delay_s`` the change is
    # stored as pending: listings and job matching see the old labels until it takes effect.

    def _label_runner(self, request: _Request) -> _Runner:
        runner = self._runner_in(_scope_of(request.params), int(request.params["runner_id"]))
        if runner is None:
            raise _Fail(404, "Not Found")
        return runner

    def _store_labels(self, runner: _Runner, custom: Iterable[str]) -> _Reply:
        read_only = [(n, t) for n, t in (runner.pending_labels[0] if runner.pending_labels else runner.labels)
                     if t == "read-only"]
        names = {n.lower() for n, _ in read_only}
        labels: list[tuple[str, str]] = list(read_only)
        for name in custom:
            if name.lower() not in names:
                names.add(name.lower())
                labels.append((name, "custom"))
        stored = tuple(labels)
        if self.label_delay_s > 0:
            self._runners[runner.id] = replace(runner, pending_labels=(stored, time.monotonic() + self.label_delay_s))
        else:
            self._runners[runner.id] = replace(runner, labels=stored, pending_labels=None,
                                               labels_changed_at=time.time())
        return _Reply(200, {"total_count": len(stored), "labels": self._labels_json(stored)})

    def _custom_labels(self, runner: _Runner) -> list[str]:
        current = runner.pending_labels[0] if runner.pending_labels else runner.labels
        return [n for n, t in current if t == "custom"]

    def _get_labels(self, request: _Request) -> _Reply:
        with self._lock:
            runner = self._label_runner(request)
            return _Reply(200, {"total_count": len(runner.labels), "labels": self._labels_json(runner.labels)})

    def _labels_body(self, request: _Request, allow_empty: bool) -> list[str]:
        body = _body_dict(request)
        if "labels" not in body:
            raise _Fail(422, "labels is required")
        labels = _labels_of(body.get("labels"))
        if not labels and not allow_empty:
            raise _Fail(422, "labels must not be empty")
        return labels

    def _add_labels(self, request: _Request) -> _Reply:
        labels = self._labels_body(request, allow_empty=False)
        with self._lock:
            runner = self._label_runner(request)
            return self._store_labels(runner, self._custom_labels(runner) + labels)

    def _set_labels(self, request: _Request) -> _Reply:
        labels = self._labels_body(request, allow_empty=True)
        with self._lock:
            return self._store_labels(self._label_runner(request), labels)

    def _remove_all_labels(self, request: _Request) -> _Reply:
        with self._lock:
            return self._store_labels(self._label_runner(request), [])

    def _remove_label(self, request: _Request) -> _Reply:
        name = request.params["name"].lower()
        with self._lock:
            runner = self._label_runner(request)
            custom = self._custom_labels(runner)
            if name not in {n.lower() for n in custom}:
                raise _Fail(404, f"Label does not exist: {request.params['name']}")
            return self._store_labels(runner, [n for n in custom if n.lower() != name])

    def _installation_token(self, request: _Request) -> _Reply:
        """``POST /app/installations/{id}/access_tokens``: a JWT signed by the App buys a 1 h token."""
        if self.app_id is None or not self.app_public_key:
            return _Reply(404, {"message": "Not Found"})
        scheme, _, credential = request.authorization.partition(" ")
        if scheme.lower() != "bearer":
            return _Reply(401, {"message": "A JSON web token could not be decoded"})
        import jwt  # PyJWT: only the App path needs it

        try:
            claims = jwt.decode(credential.strip(), self.app_public_key, algorithms=["RS256"],
                                options={"require": ["iat", "exp", "iss"], "verify_iss": False},
                                leeway=JWT_LEEWAY_S)
        except jwt.PyJWTError as exc:
            return _Reply(401, {"message": f"A JSON web token could not be decoded: {exc}"})
        if str(claims.get("iss")) != str(self.app_id):
            return _Reply(401, {"message": "'Issuer' claim ('iss') must be the App id"})
        if float(claims["exp"]) - float(claims["iat"]) > JWT_MAX_LIFETIME_S + JWT_LEEWAY_S:
            return _Reply(401, {"message": "'Expiration time' claim ('exp') is too far in the future"})
        if self.app_installation_id is not None and int(request.params["installation_id"]) != self.app_installation_id:
            return _Reply(404, {"message": "Not Found"})
        value = "ghs_" + secrets.token_hex(18)
        expires_at = time.time() + DEFAULT_TOKEN_TTL_S
        with self._lock:
            self._installation_tokens[value] = expires_at
            self._tokens_issued += 1
        return _Reply(201, {"token": value, "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime(expires_at)),
                            "permissions": {"administration": "write"}, "repository_selection": "all"})

    def _delete_runner(self, request: _Request) -> _Reply:
        with self._lock:
            runner = self._runner_in(_scope_of(request.params), int(request.params["runner_id"]))
            if runner is None:
                return _Reply(404, {"message": "Not Found"})
            del self._runners[runner.id]
            self._forget_runner(runner.id)
            return _Reply(204)

    # -- runner service handlers -----------------------------------------------------

    def _register(self, request: _Request) -> _Reply:
        body = _body_dict(request)
        scope = _scope_from_url(body.get("url"))
        name = _str_field(body, "name")
        custom = _labels_of(body.get("labels"))
        system = list(DEFAULT_LABELS) if body.get("default_labels") else []
        labels = tuple((n, "read-only") for n in system) + tuple(
            (n, "custom") for n in custom if n.lower() not in {s.lower() for s in system})
        with self._lock:
            self._check_token(body.get("token"), REGISTRATION, scope)
            existing = next((r for r in self._runners.values()
                             if r.scope == scope and r.name.lower() == name.lower()), None)
            if existing is not None and not body.get("replace"):
                raise _Fail(409, f"a runner named {name} already exists in {scope}")
            if existing is not None:
                # --replace keeps the id and starts over: new credential, labels as given now.
                self._forget_runner(existing.id)
                runner = replace(existing, name=name, labels=labels, credential=secrets.token_hex(16),
                                 last_ping_monotonic=None, fixed_status=None, pending_labels=None,
                                 labels_changed_at=None, ephemeral=bool(body.get("ephemeral")))
            else:
                runner = _Runner(id=self._next_runner_id, scope=scope, name=name, labels=labels,
                                 credential=secrets.token_hex(16), last_ping_monotonic=None, fixed_status=None,
                                 ephemeral=bool(body.get("ephemeral")))
                self._next_runner_id += 1
            self._runners[runner.id] = runner
        return _Reply(200, {"id": runner.id, "name": runner.name, "credential": runner.credential})

    def _remove(self, request: _Request) -> _Reply:
        body = _body_dict(request)
        scope = _scope_from_url(body.get("url"))
        runner_id = _int_field(body, "id")
        with self._lock:
            self._check_token(body.get("token"), REMOVAL, scope)
            if self._runner_in(scope, runner_id) is None:
                return _Reply(404, {"message": "Not Found"})
            del self._runners[runner_id]
            self._forget_runner(runner_id)
        return _Reply(204)

    def _ping(self, request: _Request) -> _Reply:
        body = _body_dict(request)
        runner_id = _int_field(body, "id")
        credential = body.get("credential")
        with self._lock:
            runner = self._runners.get(runner_id)
            if runner is None:
                return _Reply(404, {"message": "runner not found: its registration was removed"})
            if credential is not None and credential != runner.credential:
                return _Reply(404, {"message": "runner registration was replaced"})
            runner = self._settle(replace(runner, last_ping_monotonic=time.monotonic()))
            self._runners[runner_id] = runner
            job = self._next_job_for(runner)
        if job is None:
            return _Reply(204)
        return _Reply(200, {"job": {"id": job.id, "name": job.name, "labels": list(job.labels),
                                    "duration_s": job.duration_s}})

    def _next_job_for(self, runner: _Runner) -> _Job | None:
        """Assign the oldest queued job whose labels the runner carries now (call with the lock held)."""
        if self._busy_job(runner.id) is not None or self._status(runner) != "online":
            return None
        have = {n.lower() for n, _ in runner.labels}
        for job in sorted(self._jobs.values(), key=lambda j: j.id):
            if job.status == "queued" and job.scope == runner.scope and all(label.lower() in have for label in job.labels):
                taken = replace(job, status="in_progress", runner_id=runner.id, runner_name=runner.name,
                                runner_labels=tuple(n for n, _ in runner.labels), started_at=time.time())
                self._jobs[job.id] = taken
                return taken
        return None

    def _job_done(self, request: _Request) -> _Reply:
        """``POST /_runner/job {id, credential, job_id, result}``: the runner finished its job."""
        body = _body_dict(request)
        runner_id, job_id = _int_field(body, "id"), _int_field(body, "job_id")
        with self._lock:
            runner = self._runners.get(runner_id)
            if runner is None or body.get("credential") != runner.credential:
                return _Reply(404, {"message": "runner not found: its registration was removed"})
            job = self._jobs.get(job_id)
            if job is None or job.runner_id != runner_id or job.status != "in_progress":
                raise _Fail(409, f"job {job_id} is not running on runner {runner_id}")
            self._jobs[job_id] = replace(job, status="completed", finished_at=time.time())
            if runner.ephemeral:                    # a just-in-time runner takes one job, then GitHub removes it
                del self._runners[runner_id]
        return _Reply(204)

    # -- control handlers --------------------------------------------------------------

    def _control_add_fault(self, request: _Request) -> _Reply:
        body = _body_dict(request)
        count = body.get("count")
        try:
            rule = self.add_fault(
                mode=str(body.get("mode", "fail")),
                name_contains=body.get("name_contains"),
                path_contains=body.get("path_contains"),
                delay_s=float(body.get("delay_s") or 0.0),
                count=None if count is None else int(count),
                status=int(body.get("status") or 500),
                message=body.get("message"),
            )
        except (TypeError, ValueError) as exc:
            raise _Fail(400, str(exc)) from None
        return _Reply(201, asdict(rule))

    def _control_label_delay(self, request: _Request) -> _Reply:
        try:
            self.set_label_delay(float(_body_dict(request).get("delay_s") or 0.0))
        except (TypeError, ValueError) as exc:
            raise _Fail(400, str(exc)) from None
        return _Reply(200, {"label_delay_s": self.label_delay_s})

    def _control_add_job(self, request: _Request) -> _Reply:
        body = _body_dict(request)
        try:
            job_id = self.add_job(str(body.get("scope") or ""), _labels_of(body.get("labels")),
                                  body.get("name"), float(body.get("duration_s") or 0.0))
        except (TypeError, ValueError) as exc:
            raise _Fail(400, str(exc)) from None
        return _Reply(201, {"id": job_id})

    def _control_jobs(self, _: _Request) -> _Reply:
        return _Reply(200, {"jobs": self.jobs()})

    def _control_clear_faults(self, _: _Request) -> _Reply:
        self.clear_faults()
        return _Reply(204)

    def _control_expire_tokens(self, _: _Request) -> _Reply:
        return _Reply(200, {"expired": self.expire_tokens()})

    def _control_state(self, _: _Request) -> _Reply:
        return _Reply(200, self.state())

    def _control_reset(self, _: _Request) -> _Reply:
        self.reset()
        return _Reply(204)


def _routes() -> tuple[_Route, ...]:
    """Every endpoint, in werkzeug's rule syntax; ``_ROUTES`` below routes by them.

    To add an endpoint, write a handler method ``(self, request: _Request) -> _Reply`` (raise
    :class:`_Fail` for an error reply) and add one line here: to ``api`` for a REST endpoint that
    exists under both ``/repos/<owner>/<repo>`` and ``/orgs/<org>`` (PAT-checked, scope-checked,
    faults apply), or to ``others`` with its kind. Path parameters arrive in ``request.params`` as
    strings; ``<int:...>`` only matches digits. The request counters in :meth:`state` key on
    ``"METHOD /path/{param}"`` (GitHub's documented spelling).
    """
    S = GitHubStandIn
    api: list[tuple[str, str, _Handler]] = [
        ("POST", "/actions/runners/registration-token", S._registration_token),
        ("POST", "/actions/runners/remove-token", S._remove_token),
        ("GET", "/actions/runners", S._list_runners),
        ("GET", "/actions/runners/<int:runner_id>", S._get_runner),
        ("DELETE", "/actions/runners/<int:runner_id>", S._delete_runner),
        ("POST", "/actions/runners/generate-jitconfig", S._generate_jitconfig),
        ("GET", "/actions/runners/<int:runner_id>/labels", S._get_labels),
        ("POST", "/actions/runners/<int:runner_id>/labels", S._add_labels),
        ("PUT", "/actions/runners/<int:runner_id>/labels", S._set_labels),
        ("DELETE", "/actions/runners/<int:runner_id>/labels", S._remove_all_labels),
        ("DELETE", "/actions/runners/<int:runner_id>/labels/<name>", S._remove_label),
    ]
    routes = [
        _Route(method, prefix + suffix, handler, "api")
        for prefix in ("/repos/<owner>/<repo>", "/orgs/<org>")
        for method, suffix, handler in api
    ]
    others: list[tuple[str, str, _Handler, str]] = [
        ("POST", "/app/installations/<int:installation_id>/access_tokens", S._installation_token, "app"),
        ("POST", "/_runner/register", S._register, "runner"),
        ("POST", "/_runner/remove", S._remove, "runner"),
        ("POST", "/_runner/ping", S._ping, "runner"),
        ("POST", "/_runner/job", S._job_done, "runner"),
        ("POST", "/_control/label-delay", S._control_label_delay, "control"),
        ("POST", "/_control/jobs", S._control_add_job, "control"),
        ("GET", "/_control/jobs", S._control_jobs, "control"),
        ("POST", "/_control/faults", S._control_add_fault, "control"),
        ("DELETE", "/_control/faults", S._control_clear_faults, "control"),
        ("POST", "/_control/expire-tokens", S._control_expire_tokens, "control"),
        ("GET", "/_control/state", S._control_state, "control"),
        ("POST", "/_control/reset", S._control_reset, "control"),
    ]
    routes += [_Route(method, rule, handler, kind) for method, rule, handler, kind in others]
    return tuple(routes)


# The endpoint of each werkzeug Rule is its _Route; trailing slashes are stripped before matching.
_ROUTES = Map([Rule(r.rule, methods=[r.method], endpoint=r) for r in _routes()],
              strict_slashes=False, merge_slashes=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.local.github_standin",
                                     description="Serve the local GitHub stand-in until SIGTERM.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--pat", default=DEFAULT_PAT, help="the token API callers must present")
    parser.add_argument("--token-ttl-s", type=float, default=DEFAULT_TOKEN_TTL_S)
    parser.add_argument("--offline-after-s", type=float, default=DEFAULT_OFFLINE_AFTER_S)
    parser.add_argument("--label-delay-s", type=float, default=0.0,
                        help="seconds before a label change takes effect (default 0: at once)")
    parser.add_argument("--scope", action="append", default=None,
                        help="only this repository/org exists (repeatable; default: any, on first use)")
    args = parser.parse_args(argv)

    stopped = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    standin = GitHubStandIn(host=args.host, port=args.port, pat=args.pat, token_ttl_s=args.token_ttl_s,
                            offline_after_s=args.offline_after_s, scopes=args.scope,
                            label_delay_s=args.label_delay_s)
    standin.start()
    try:
        print(json.dumps({"url": standin.url}), flush=True)
        while not stopped.wait(SERVE_POLL_S):
            pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
