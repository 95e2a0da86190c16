"""GitHub's self-hosted runner API, as the control plane uses it.

Operations on one scope, a repository (``owner/repo``) or an organization
(``org``): create a registration token, create a just-in-time runner config
(ephemeral mode), list the scope's runners (every page, 100 per page), get and
delete a runner by id, and set a runner's custom labels (a warm hit relabels a
listening runner instead of registering a new one; GitHub has no batch
endpoint, so :meth:`GitHubClient.set_labels_many` and
:meth:`GitHubClient.get_runners` run one call per runner in parallel). The
scope picks the ``/repos/{owner}/{repo}/...`` or ``/orgs/{org}/...`` endpoints;
nothing else in the control plane builds GitHub URLs.

**Transport: urllib3**, the HTTP library botocore itself runs on, so it is
loaded already when a command first needs GitHub. The runner API is a handful
of JSON endpoints; a general GitHub SDK (githubkit, which this module used
before) cost about 0.3 s of CPU per command to import and to build its
clients and response models, a third of a warm provision (BENCHMARKS.md,
issue 15). One connection pool per process (:func:`_http`) is shared by
every client and thread; :class:`GitHubClient` itself keeps only plain values
(URL, token, scope, retry policy), because Pulumi pickles dynamic providers
and a connection pool cannot be pickled. An HTTPS proxy from the standard
environment variables (``HTTPS_PROXY``, ``NO_PROXY``) is honoured.

**Retries** (:class:`RetryPolicy`, every call): 5xx answers and transport
errors back off exponentially; a rate limit (a 403 or 429 with
``Retry-After``, an exhausted ``X-RateLimit-Remaining``, or GitHub's "rate
limit" message, which sometimes comes without either header) waits for
GitHub's reset only when that is close (``max_rate_limit_wait_s``); nothing
is retried more than ``max_retries`` times, so every call has a bounded
worst case. All requests are idempotent enough to retry: a second token is
as good as the first, and a delete whose first answer was lost comes back
404, which :meth:`GitHubClient.delete_runner` reports as "already gone".
Nothing is cached but an App's installation token: a cached runner list
would hide the drift reconcile looks for.

**Authentication** is a PAT (``RUNNER_POOL_GITHUB_TOKEN``) or a GitHub App
installation (``github.app_id`` + ``github.app_installation_id`` in the pool
config, or ``RUNNER_POOL_GITHUB_APP_ID`` / ``..._INSTALLATION_ID``, and the
private key in ``RUNNER_POOL_GITHUB_APP_PRIVATE_KEY`` or ``..._KEY_FILE``).
With an App, a JWT signed with the key (PyJWT, RS256, nine minutes) is
exchanged for an installation token (``POST
/app/installations/{id}/access_tokens``), which is cached in the process
until a minute before it expires, so every call of a command shares one
token and a long command refreshes it by itself.

**Errors** are mapped once, in :meth:`GitHubClient._mapped_errors`, and
chained: 401 is a :class:`RunnerPoolError` about the credential, 404 on the
scope is a :class:`ConfigError` naming the repository or organization. A 403
is a rate limit (retried as above) or a missing permission, which is not
retried and names the permission to grant.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from controlplane.errors import ConfigError, RunnerPoolError

if TYPE_CHECKING:
    import urllib3

    from controlplane.config import GitHubConfig

TOKEN_ENV_VARS = ("RUNNER_POOL_GITHUB_TOKEN", "GITHUB_TOKEN")
APP_ID_ENV = "RUNNER_POOL_GITHUB_APP_ID"
APP_INSTALLATION_ENV = "RUNNER_POOL_GITHUB_APP_INSTALLATION_ID"
APP_KEY_ENV = "RUNNER_POOL_GITHUB_APP_PRIVATE_KEY"
APP_KEY_FILE_ENV = "RUNNER_POOL_GITHUB_APP_PRIVATE_KEY_FILE"
DEFAULT_RUNNER_GROUP_ID = 1         # "Default": every repository runner is in it
PAT_PERMISSION = "a PAT with admin access and the `repo` scope (repository) or `admin:org` (organization)"
APP_PERMISSION = ("a GitHub App installation with the repository permission `Administration: read and write` "
                  "(repository) or the organization permission `Self-hosted runners: read and write` (organization)")
PER_PAGE = 100                      # GitHub's maximum for the runners listing
MAX_PARALLEL = 16                   # concurrent calls of one batch (GitHub has no batch endpoint for labels)
MAX_PAGES = 100                     # 10,000 runners: a bound on the loop, far above any real scope
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
API_VERSION = "2022-11-28"
APP_JWT_LIFETIME_S = 540            # GitHub refuses more than 10 minutes; iat is backdated 60 s for clock skew
TOKEN_REFRESH_MARGIN_S = 60.0       # an installation token is replaced a minute before it expires

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class RunnerToken:
    """A registration or removal token for ``config.sh``; valid one hour on GitHub."""

    token: str = field(repr=False)
    expires_at: float               # epoch seconds


@dataclass(frozen=True)
class JitConfig:
    """A just-in-time runner: registered already, one job, then GitHub removes it."""

    runner_id: int
    encoded: str = field(repr=False)     # ``encoded_jit_config``: the runner's whole credential


@dataclass(frozen=True)
class GitHubRunner:
    """A runner as GitHub lists it (``status`` is ``online`` or ``offline``)."""

    id: int
    name: str
    status: str
    busy: bool
    labels: tuple[str, ...]


class HttpFailure(Exception):
    """GitHub answered with an error status (after the retries it deserved)."""

    def __init__(self, status: int, message: str, rate_limit_reset_s: float | None = None,
                 rate_limited: bool = False) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.rate_limited = rate_limited
        self.rate_limit_reset_s = rate_limit_reset_s     # GitHub's wait: Retry-After, or until the reset


class Unreachable(Exception):
    """No answer from GitHub: connection refused, DNS, TLS or a timeout (after the retries)."""


def _failure_of(status: int, headers: Mapping[str, str], body: Any, now: float) -> HttpFailure:
    """An error answer, classified once: a rate limit (and GitHub's wait, when it says one) or not.

    A rate limit is a 403 or 429 with ``Retry-After``, an exhausted ``X-RateLimit-Remaining``
    (wait until ``X-RateLimit-Reset``), any 429, or GitHub's "rate limit" message without headers.
    """
    message = str(body.get("message", "")) if isinstance(body, dict) else ""
    if status not in (403, 429):
        return HttpFailure(status, message)
    retry_after = headers.get("retry-after", "")
    if retry_after.strip().isdigit():
        return HttpFailure(status, message, float(retry_after), rate_limited=True)
    if headers.get("x-ratelimit-remaining") == "0":
        reset = headers.get("x-ratelimit-reset", "")
        wait_s = max(0.0, float(reset) - now) if reset.strip().isdigit() else None
        return HttpFailure(status, message, wait_s, rate_limited=True)
    return HttpFailure(status, message, rate_limited=status == 429 or "rate limit" in message.lower())


@dataclass(frozen=True)
class RetryPolicy:
    """When a GitHub call is sent again, and after how long (see the module docstring)."""

    max_retries: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 10.0
    max_rate_limit_wait_s: float = 60.0

    def backoff_s(self, retry_count: int) -> float:
        return float(min(self.max_delay_s, self.base_delay_s * 2**retry_count))

    def delay_s(self, failure: HttpFailure | Unreachable, retry_count: int) -> float | None:
        """Seconds to wait before retry ``retry_count + 1`` of a failed call, or None: do not retry."""
        if retry_count >= self.max_retries:
            return None
        if isinstance(failure, Unreachable) or failure.status >= 500:
            return self.backoff_s(retry_count)
        if not failure.rate_limited:
            return None                              # any other 4xx: sending it again changes nothing
        wait_s = failure.rate_limit_reset_s
        if wait_s is None:                           # no header: GitHub asks for at least a minute
            return min(60.0, self.max_rate_limit_wait_s)
        if wait_s > self.max_rate_limit_wait_s:
            return None                              # waiting that long would stall a provision
        return max(wait_s, self.base_delay_s)


DEFAULT_RETRY = RetryPolicy()

_pool_lock = threading.Lock()
_pools: dict[str, urllib3.PoolManager] = {}
_tokens: dict[tuple[str, int, int, str], tuple[str, float]] = {}   # App installation token, expiry
_tokens_lock = threading.Lock()


def _http(url: str) -> urllib3.PoolManager:
    """The process's connection pool for ``url`` (a proxy's, when the environment names one for it)."""
    import urllib.request

    import urllib3

    parts = urlsplit(url)
    proxy = "" if urllib.request.proxy_bypass(parts.hostname or "") else \
        urllib.request.getproxies().get(parts.scheme, "")
    with _pool_lock:
        pool = _pools.get(proxy)
        if pool is None:
            kwargs: dict[str, Any] = {"maxsize": MAX_PARALLEL, "retries": False}
            pool = _pools[proxy] = (urllib3.ProxyManager(proxy, **kwargs) if proxy else urllib3.PoolManager(**kwargs))
        return pool


def _runner_of(api: Mapping[str, Any]) -> GitHubRunner:
    return GitHubRunner(id=int(api["id"]), name=str(api["name"]), status=str(api["status"]), busy=bool(api["busy"]),
                        labels=tuple(str(label["name"]) for label in api.get("labels", ())))


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class GitHubClient:
    """Runner operations on one repository or organization; plain values only."""

    api_url: str
    token: str = field(repr=False)             # a PAT; empty with App authentication
    scope: str
    retry: RetryPolicy = DEFAULT_RETRY
    timeout_s: float = REQUEST_TIMEOUT_S
    token_source: str = TOKEN_ENV_VARS[0]      # the variable the token came from, for error messages
    app_id: int | None = None                  # GitHub App authentication instead of the PAT
    app_installation_id: int | None = None
    app_private_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        parts = self.scope.split("/")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"invalid GitHub scope {self.scope!r}",
                              hint="use owner/repo for a repository or the organization name")
        if self.app_id is not None and not (self.app_installation_id and self.app_private_key):
            raise ConfigError("GitHub App authentication needs an installation id and a private key",
                              hint=f"set {APP_INSTALLATION_ENV} and {APP_KEY_ENV} (or {APP_KEY_FILE_ENV})")

    @property
    def is_app(self) -> bool:
        return self.app_id is not None

    @property
    def permission(self) -> str:
        return APP_PERMISSION if self.is_app else PAT_PERMISSION

    @property
    def is_org(self) -> bool:
        return "/" not in self.scope

    @property
    def scope_label(self) -> str:
        return f"organization {self.scope}" if self.is_org else f"repository {self.scope}"

    def _base(self) -> str:
        """The scope's runner endpoints: ``/repos/{owner}/{repo}/actions/runners`` or ``/orgs/{org}/...``."""
        return f"/orgs/{self.scope}/actions/runners" if self.is_org else f"/repos/{self.scope}/actions/runners"

    def registration_token(self) -> RunnerToken:
        """A new registration token (``config.sh --token``)."""
        with self._mapped_errors("create a registration token"):
            data = self._call("POST", f"{self._base()}/registration-token")
        return RunnerToken(token=str(data["token"]), expires_at=_epoch(str(data["expires_at"])))

    def removal_token(self) -> RunnerToken:
        """A new removal token (``config.sh remove --token``); the control plane itself no longer
        needs one (it deletes runners by id), but ``runner-pool`` keeps it for manual cleanups."""
        with self._mapped_errors("create a removal token"):
            data = self._call("POST", f"{self._base()}/remove-token")
        return RunnerToken(token=str(data["token"]), expires_at=_epoch(str(data["expires_at"])))

    def jit_config(self, name: str, labels: Sequence[str],
                   runner_group_id: int = DEFAULT_RUNNER_GROUP_ID) -> JitConfig:
        """Register one just-in-time runner (``generate-jitconfig``): fixed name and labels, one job."""
        with self._mapped_errors(f"create a just-in-time runner {name}"):
            data = self._call("POST", f"{self._base()}/generate-jitconfig",
                              {"name": name, "runner_group_id": runner_group_id, "labels": list(labels)})
        return JitConfig(runner_id=int(data["runner"]["id"]), encoded=str(data["encoded_jit_config"]))

    def get_runner(self, runner_id: int) -> GitHubRunner | None:
        """One runner by id; ``None`` when GitHub does not have it (404)."""
        with self._mapped_errors(f"get runner {runner_id}"):
            try:
                return _runner_of(self._call("GET", f"{self._base()}/{int(runner_id)}"))
            except HttpFailure as exc:
                if exc.status == 404:
                    return None
                raise

    def check_access(self) -> None:
        """One cheap read (a page of one runner) that proves the token works for the scope.

        Run it before anything changes: a token GitHub rejects (401) or that lacks
        the permission (403) is then bad input, a :class:`ConfigError` naming the
        variable the token came from, like an unknown scope (404) already is.
        """
        try:
            with self._mapped_errors("list runners"):
                self._call("GET", f"{self._base()}?per_page=1")
        except ConfigError:
            raise
        except RunnerPoolError as exc:
            status = getattr(exc.__cause__, "status", None)
            if status == 401:
                raise ConfigError(f"{self.token_source}: GitHub rejected the "
                                  + ("App's credentials" if self.is_app else "token"),
                                  hint="it is invalid, expired or revoked; "
                                  + ("check the App id, installation id and private key" if self.is_app
                                     else "export a valid PAT")) from exc
            if status == 403 and not getattr(exc.__cause__, "rate_limited", False):
                raise ConfigError(f"{self.token_source}: {exc.message}", hint=exc.hint) from exc
            raise

    def list_runners(self) -> list[GitHubRunner]:
        """Every runner of the scope, following pagination (ordered as GitHub returns them).

        Runners that appear on two pages (the list shifted between requests)
        are kept once.
        """
        found: dict[int, GitHubRunner] = {}
        with self._mapped_errors("list runners"):
            for page in range(1, MAX_PAGES + 1):
                data = self._call("GET", f"{self._base()}?per_page={PER_PAGE}&page={page}")
                total, batch = int(data["total_count"]), [_runner_of(r) for r in data["runners"]]
                for runner in batch:
                    found.setdefault(runner.id, runner)
                if len(batch) < PER_PAGE or page * PER_PAGE >= total:
                    break
        return list(found.values())

    def delete_runner(self, runner_id: int) -> bool:
        """Delete a runner; ``False`` when GitHub no longer has it (404), which is success."""
        with self._mapped_errors(f"delete runner {runner_id}"):
            try:
                self._call("DELETE", f"{self._base()}/{int(runner_id)}")
            except HttpFailure as exc:
                if exc.status == 404:
                    return False
                raise
        return True

    def set_labels(self, runner_id: int, labels: Sequence[str]) -> tuple[str, ...]:
        """Replace a runner's custom labels (``PUT .../runners/{id}/labels``; empty: remove them all).

        Returns every label GitHub says the runner now has (read-only ones
        too). That is what GitHub stored, not proof that dispatch uses it yet:
        callers that need the change in effect check the runner afterwards.
        """
        with self._mapped_errors(f"set the labels of runner {runner_id}"):
            path = f"{self._base()}/{int(runner_id)}/labels"
            # GitHub's documented way to clear is DELETE .../labels; PUT replaces the custom labels.
            data = self._call("DELETE", path) if not labels else self._call("PUT", path, {"labels": list(labels)})
        return tuple(str(label["name"]) for label in data["labels"])

    def set_labels_many(self, changes: Sequence[tuple[int, Sequence[str]]]
                        ) -> dict[int, tuple[str, ...] | RunnerPoolError]:
        """:meth:`set_labels` for each ``(runner id, labels)``, in parallel (GitHub has no batch
        endpoint): per runner the labels GitHub stored, or the error that refused it."""
        return self._each(lambda change: self.set_labels(change[0], change[1]), changes,
                          key=lambda change: change[0])

    def get_runners(self, runner_ids: Sequence[int]) -> dict[int, GitHubRunner | None | RunnerPoolError]:
        """:meth:`get_runner` for each id, in parallel: the runner, ``None`` (gone), or the error."""
        return self._each(self.get_runner, runner_ids, key=lambda runner_id: runner_id)

    def _each(self, fn: Callable[[T], R], items: Sequence[T], key: Callable[[T], int]
              ) -> dict[int, R | RunnerPoolError]:
        """Run ``fn(item)`` over ``items`` in threads (:func:`controlplane.aws.parallel`; the
        process's connection pool is thread-safe). Each call keeps its own retries; a
        :class:`RunnerPoolError` is the result of its item, anything else propagates."""
        from controlplane import aws

        def one(item: T) -> R | RunnerPoolError:
            try:
                return fn(item)
            except RunnerPoolError as exc:
                return exc

        return {key(item): result for item, result in
                zip(items, aws.parallel(one, items, max_workers=MAX_PARALLEL), strict=True)}

    # ------------------------------------------------------------ transport

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """One API call with this client's credential; its JSON answer (None when empty)."""
        return self._send(method, path, body, f"Bearer {self._installation_token()}" if self.is_app
                          else f"token {self.token}")

    def _send(self, method: str, path: str, body: Any, authorization: str) -> Any:
        """Send with :class:`RetryPolicy`; the JSON answer, or :class:`HttpFailure` / :class:`Unreachable`."""
        import urllib3

        url = self.api_url.rstrip("/") + path
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION,
                   "User-Agent": "runner-pool", "Authorization": authorization}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, self.timeout_s), read=self.timeout_s)
        retry = 0
        while True:
            failure: HttpFailure | Unreachable
            try:
                raw = _http(url).request(method, url, body=payload, headers=headers, timeout=timeout,
                                         redirect=False, retries=False)
            except urllib3.exceptions.HTTPError as exc:      # no answer: refused, DNS, TLS, timeout
                failure = Unreachable(f"{type(exc).__name__}: {exc}")
            else:
                data = _json(raw.data)
                if raw.status < 400:
                    return data
                failure = _failure_of(raw.status, {k.lower(): v for k, v in raw.headers.items()}, data, time.time())
            wait = self.retry.delay_s(failure, retry)
            if wait is None:
                raise failure
            time.sleep(wait)
            retry += 1

    def _installation_token(self) -> str:
        """The App installation's token: cached per process until a minute before it expires."""
        key = (self.api_url, int(self.app_id or 0), int(self.app_installation_id or 0),
               hashlib.sha256(self.app_private_key.encode()).hexdigest())
        with _tokens_lock:
            cached = _tokens.get(key)
            if cached is not None and cached[1] - TOKEN_REFRESH_MARGIN_S > time.time():
                return cached[0]
            import jwt  # PyJWT: only App authentication signs anything

            now = int(time.time())
            signed = jwt.encode({"iat": now - 60, "exp": now + APP_JWT_LIFETIME_S, "iss": str(self.app_id)},
                                self.app_private_key, algorithm="RS256")
            data = self._send("POST", f"/app/installations/{int(self.app_installation_id or 0)}/access_tokens",
                              None, f"Bearer {signed}")
            token, expires_at = str(data["token"]), _epoch(str(data["expires_at"]))
            _tokens[key] = (token, expires_at)
            return token

    @contextmanager
    def _mapped_errors(self, doing: str) -> Iterator[None]:
        """Turn transport failures into runner-pool errors, once, chained to the original."""
        try:
            yield
        except HttpFailure as exc:
            if exc.rate_limited:
                if exc.rate_limit_reset_s is not None and exc.rate_limit_reset_s > 0:
                    raise RunnerPoolError(
                        f"GitHub rate limit exceeded while trying to {doing} for {self.scope_label}",
                        hint=f"it resets in {exc.rate_limit_reset_s:.0f} s; fewer concurrent runs help"
                        + ("" if self.is_app else "; a GitHub App installation has a higher limit than a PAT"),
                    ) from exc
                raise RunnerPoolError(
                    f"GitHub secondary rate limit hit while trying to {doing} for {self.scope_label}",
                    hint="too many requests at once; retry in a minute or run fewer provisions concurrently",
                ) from exc
            raise self._status_error(exc.status, doing) from exc
        except Unreachable as exc:
            raise RunnerPoolError(
                f"could not reach GitHub at {self.api_url} to {doing}: {exc}",
                hint="check the GitHub API URL and the network",
            ) from exc

    def _status_error(self, status: int, doing: str) -> RunnerPoolError:
        if status == 401:
            if self.is_app:
                return RunnerPoolError("GitHub rejected the App's credentials",
                                       hint=f"check {APP_ID_ENV}, {APP_INSTALLATION_ENV} and the private key")
            return RunnerPoolError(
                "GitHub rejected the token",
                hint="check RUNNER_POOL_GITHUB_TOKEN: it is invalid, expired or revoked",
            )
        if status == 403:
            return RunnerPoolError(
                f"GitHub refused to {doing} for {self.scope_label}: permission missing",
                hint=f"it takes {self.permission}",
            )
        if status == 404:
            return ConfigError(
                f"GitHub {self.scope_label} not found",
                hint="check its spelling and that the token can see it (GitHub answers 404 when it cannot)",
            )
        return RunnerPoolError(
            f"GitHub answered HTTP {status} when trying to {doing} for {self.scope_label}",
            hint="retry later; https://www.githubstatus.com shows GitHub's incidents",
        )


def _json(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"message": data[:200].decode("utf-8", "replace")}


def github_client_from_env(api_url: str, scope: str, app_id: int | None = None,
                           app_installation_id: int | None = None) -> GitHubClient:
    """A client for the GitHub App when one is configured (arguments or environment), else with
    the PAT from ``RUNNER_POOL_GITHUB_TOKEN`` (or ``GITHUB_TOKEN``)."""
    app = _env_int(APP_ID_ENV) if app_id is None else app_id
    if app is not None:
        installation = _env_int(APP_INSTALLATION_ENV) if app_installation_id is None else app_installation_id
        return GitHubClient(api_url, "", scope, token_source=APP_ID_ENV, app_id=app,
                            app_installation_id=installation, app_private_key=_app_private_key())
    for name in TOKEN_ENV_VARS:
        token = os.environ.get(name, "").strip()
        if token:
            return GitHubClient(api_url, token, scope, token_source=name)
    raise ConfigError("GitHub token not set",
                      hint="export RUNNER_POOL_GITHUB_TOKEN=<a PAT with repo or admin:org scope>, "
                           f"or configure a GitHub App ({APP_ID_ENV})")


def github_client_for(github: GitHubConfig) -> GitHubClient:
    """The client a pool's ``github`` config asks for: its App when it names one, else from the env."""
    return github_client_from_env(github.api_url, github.scope, github.app_id, github.app_installation_id)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"{name}: {raw!r} is not a number", hint="use the numeric id GitHub shows for it")
    return int(raw)


def _app_private_key() -> str:
    key = os.environ.get(APP_KEY_ENV, "").strip()
    path = os.environ.get(APP_KEY_FILE_ENV, "").strip()
    if not key and path:
        try:
            with open(path, encoding="utf-8") as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"{APP_KEY_FILE_ENV}: cannot read {path}: {exc.strerror}",
                              hint="point it at the App's PEM private key") from None
    if "PRIVATE KEY" not in key:
        raise ConfigError(f"{APP_KEY_ENV}: no PEM private key given",
                          hint=f"export {APP_KEY_ENV} (the PEM text) or {APP_KEY_FILE_ENV} (its path)")
    return key
