"""GitHub's self-hosted runner API, as the control plane uses it.

Operations on one scope, a repository (``owner/repo``) or an organization
(``org``): create a registration token, create a just-in-time runner config
(ephemeral mode), list the scope's runners (every page, 100 per page), get and
delete a runner by id, and set a runner's custom labels (a warm hit relabels a
listening runner instead of registering a new one; GitHub has no batch
endpoint, so :meth:`GitHubClient.set_labels_many` and
:meth:`GitHubClient.get_runners` run one call per runner in parallel). The
scope picks the ``/repos/{owner}/{repo}/...`` or ``/orgs/{org}/...`` endpoints;
nothing else in the control plane builds GitHub URLs or imports githubkit.
githubkit is imported where a call is made, not with this module: it takes
about a quarter of a second, and a command reaches AWS before it needs GitHub.

Why a githubkit client per call: Pulumi pickles dynamic providers and an HTTP
client holds sockets and an ``SSLContext``, so :class:`GitHubClient` keeps only
plain values (URL, token, scope, retry policy) and opens a client inside each
method. A paginated listing shares one client across its pages.

Retries go through githubkit's own ``auto_retry`` hook with
:class:`RetryPolicy`: 5xx answers and transport errors back off exponentially,
a rate limit waits for GitHub's reset only when that is close
(``max_rate_limit_wait_s``), and nothing is retried more than ``max_retries``
times, so every call has a bounded worst case. All requests are idempotent
enough to retry: a second token is as good as the first, and a delete whose
first answer was lost comes back 404, which :meth:`GitHubClient.delete_runner`
reports as "already gone". githubkit's HTTP cache is off: a cached runner list
would hide the drift reconcile looks for.

Authentication is a PAT (``RUNNER_POOL_GITHUB_TOKEN``) or a GitHub App
installation (``github.app_id`` + ``github.app_installation_id`` in the pool
config, or ``RUNNER_POOL_GITHUB_APP_ID`` / ``..._INSTALLATION_ID``, and the
private key in ``RUNNER_POOL_GITHUB_APP_PRIVATE_KEY`` or ``..._KEY_FILE``).
With an App, githubkit's ``AppInstallationAuthStrategy`` signs a JWT with the
key, exchanges it for an installation token (``POST
/app/installations/{id}/access_tokens``) and caches that token in its
process-wide memory cache until a minute before it expires, so the per-call
clients share one token and a long command refreshes it by itself.

Errors are mapped once, in :meth:`GitHubClient._mapped_errors`, and chained:
401 is a :class:`RunnerPoolError` about the credential, 404 on the scope is a
:class:`ConfigError` naming the repository or organization. A 403 is one of
two things GitHub answers with the same status: a secondary rate limit
(githubkit recognises it by ``Retry-After`` or an exhausted
``X-RateLimit-Remaining``; we also by GitHub's message, which sometimes comes
without either header), which is retried like any rate limit, or a missing
permission, which is not retried and names the permission to grant.
"""
from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from controlplane.errors import ConfigError, RunnerPoolError

if TYPE_CHECKING:
    from githubkit import AppInstallationAuthStrategy, GitHub, TokenAuthStrategy
    from githubkit.exception import GitHubException
    from githubkit.typing import RetryOption

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


@dataclass(frozen=True)
class RetryPolicy:
    """githubkit ``auto_retry`` decision with bounded waits (see the module docstring)."""

    max_retries: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 10.0
    max_rate_limit_wait_s: float = 60.0

    def backoff_s(self, retry_count: int) -> float:
        return float(min(self.max_delay_s, self.base_delay_s * 2**retry_count))

    def __call__(self, exc: GitHubException, retry_count: int) -> RetryOption:
        from githubkit.exception import RateLimitExceeded, RequestError, RequestFailed
        from githubkit.typing import RetryOption

        if retry_count >= self.max_retries:
            return RetryOption(False)
        if not isinstance(exc, RequestFailed) and isinstance(exc.__cause__, RequestFailed):
            exc = exc.__cause__                     # an answer inside the auth flow (App token exchange)
        if is_secondary_rate_limit(exc) and not isinstance(exc, RateLimitExceeded):
            # No Retry-After: GitHub asks for at least a minute; the cap keeps a provision moving.
            return RetryOption(True, timedelta(seconds=min(60.0, self.max_rate_limit_wait_s)))
        if isinstance(exc, RateLimitExceeded):
            # GitHub says when the limit resets; waiting longer than the cap would stall a provision.
            wait_s = exc.retry_after.total_seconds()
            if wait_s > self.max_rate_limit_wait_s:
                return RetryOption(False)
            return RetryOption(True, timedelta(seconds=max(wait_s, self.base_delay_s)))
        if isinstance(exc, RequestFailed):
            if exc.response.status_code < 500:
                return RetryOption(False)
        elif not isinstance(exc, RequestError):     # timeouts and connection errors are RequestErrors
            return RetryOption(False)
        # githubkit sleeps 60 s when a retry carries no delay, so always give one.
        return RetryOption(True, timedelta(seconds=self.backoff_s(retry_count)))


DEFAULT_RETRY = RetryPolicy()


def is_secondary_rate_limit(exc: BaseException) -> bool:
    """A 403/429 that is a rate limit, not a refusal (by githubkit's headers or GitHub's message)."""
    from githubkit.exception import RateLimitExceeded, RequestFailed

    if isinstance(exc, RateLimitExceeded):
        return True
    if not isinstance(exc, RequestFailed) or exc.response.status_code not in (403, 429):
        return False
    if exc.response.status_code == 429:
        return True
    try:
        body = exc.response.json()
    except Exception:  # noqa: BLE001 - any unreadable body is not a rate-limit message
        return False
    message = str(body.get("message", "")) if isinstance(body, dict) else ""
    return "rate limit" in message.lower()


class _ApiLabel(Protocol):
    @property
    def name(self) -> str: ...


class _ApiRunner(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def busy(self) -> bool: ...
    @property
    def labels(self) -> Sequence[_ApiLabel]: ...


def _runner_of(api: _ApiRunner) -> GitHubRunner:
    return GitHubRunner(id=api.id, name=api.name, status=api.status, busy=api.busy,
                        labels=tuple(label.name for label in api.labels))


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

    def registration_token(self) -> RunnerToken:
        """A new registration token (``config.sh --token``)."""
        with self._mapped_errors("create a registration token"), self._github() as gh:
            if self.is_org:
                token = gh.rest.actions.create_registration_token_for_org(self.scope).parsed_data
            else:
                owner, repo = self.scope.split("/")
                token = gh.rest.actions.create_registration_token_for_repo(owner, repo).parsed_data
        return RunnerToken(token=token.token, expires_at=token.expires_at.timestamp())

    def removal_token(self) -> RunnerToken:
        """A new removal token (``config.sh remove --token``); the control plane itself no longer
        needs one (it deletes runners by id), but ``runner-pool`` keeps it for manual cleanups."""
        with self._mapped_errors("create a removal token"), self._github() as gh:
            if self.is_org:
                token = gh.rest.actions.create_remove_token_for_org(self.scope).parsed_data
            else:
                owner, repo = self.scope.split("/")
                token = gh.rest.actions.create_remove_token_for_repo(owner, repo).parsed_data
        return RunnerToken(token=token.token, expires_at=token.expires_at.timestamp())

    def jit_config(self, name: str, labels: Sequence[str],
                   runner_group_id: int = DEFAULT_RUNNER_GROUP_ID) -> JitConfig:
        """Register one just-in-time runner (``generate-jitconfig``): fixed name and labels, one job."""
        with self._mapped_errors(f"create a just-in-time runner {name}"), self._github() as gh:
            if self.is_org:
                data = gh.rest.actions.generate_runner_jitconfig_for_org(
                    self.scope, name=name, runner_group_id=runner_group_id, labels=list(labels)).parsed_data
            else:
                owner, repo = self.scope.split("/")
                data = gh.rest.actions.generate_runner_jitconfig_for_repo(
                    owner, repo, name=name, runner_group_id=runner_group_id, labels=list(labels)).parsed_data
        return JitConfig(runner_id=data.runner.id, encoded=data.encoded_jit_config)

    def get_runner(self, runner_id: int) -> GitHubRunner | None:
        """One runner by id; ``None`` when GitHub does not have it (404)."""
        with self._github() as gh:
            return self._get_runner(gh, runner_id)

    def _get_runner(self, gh: GitHub[TokenAuthStrategy] | GitHub[AppInstallationAuthStrategy],
                    runner_id: int) -> GitHubRunner | None:
        from githubkit.exception import RequestFailed

        with self._mapped_errors(f"get runner {runner_id}"):
            try:
                if self.is_org:
                    api = gh.rest.actions.get_self_hosted_runner_for_org(self.scope, runner_id).parsed_data
                else:
                    owner, repo = self.scope.split("/")
                    api = gh.rest.actions.get_self_hosted_runner_for_repo(owner, repo, runner_id).parsed_data
            except RequestFailed as exc:
                if exc.response.status_code == 404:
                    return None
                raise
        return _runner_of(api)

    def check_access(self) -> None:
        """One cheap read (a page of one runner) that proves the token works for the scope.

        Run it before anything changes: a token GitHub rejects (401) or that lacks
        the permission (403) is then bad input, a :class:`ConfigError` naming the
        variable the token came from, like an unknown scope (404) already is.
        """
        try:
            with self._mapped_errors("list runners"), self._github() as gh:
                if self.is_org:
                    gh.rest.actions.list_self_hosted_runners_for_org(self.scope, per_page=1)
                else:
                    owner, repo = self.scope.split("/")
                    gh.rest.actions.list_self_hosted_runners_for_repo(owner, repo, per_page=1)
        except ConfigError:
            raise
        except RunnerPoolError as exc:
            status = getattr(getattr(exc.__cause__, "response", None), "status_code", None)
            if status == 401:
                raise ConfigError(f"{self.token_source}: GitHub rejected the "
                                  + ("App's credentials" if self.is_app else "token"),
                                  hint="it is invalid, expired or revoked; "
                                  + ("check the App id, installation id and private key" if self.is_app
                                     else "export a valid PAT")) from exc
            if status == 403:
                raise ConfigError(f"{self.token_source}: {exc.message}", hint=exc.hint) from exc
            raise

    def list_runners(self) -> list[GitHubRunner]:
        """Every runner of the scope, following pagination (ordered as GitHub returns them).

        Runners that appear on two pages (the list shifted between requests)
        are kept once.
        """
        found: dict[int, GitHubRunner] = {}
        with self._mapped_errors("list runners"), self._github() as gh:
            for page in range(1, MAX_PAGES + 1):
                if self.is_org:
                    data = gh.rest.actions.list_self_hosted_runners_for_org(
                        self.scope, per_page=PER_PAGE, page=page).parsed_data
                    total, batch = data.total_count, [_runner_of(r) for r in data.runners]
                else:
                    owner, repo = self.scope.split("/")
                    repo_data = gh.rest.actions.list_self_hosted_runners_for_repo(
                        owner, repo, per_page=PER_PAGE, page=page).parsed_data
                    total, batch = repo_data.total_count, [_runner_of(r) for r in repo_data.runners]
                for runner in batch:
                    found.setdefault(runner.id, runner)
                if len(batch) < PER_PAGE or page * PER_PAGE >= total:
                    break
        return list(found.values())

    def delete_runner(self, runner_id: int) -> bool:
        """Delete a runner; ``False`` when GitHub no longer has it (404), which is success."""
        from githubkit.exception import RequestFailed

        with self._mapped_errors(f"delete runner {runner_id}"):
            try:
                with self._github() as gh:
                    if self.is_org:
                        gh.rest.actions.delete_self_hosted_runner_from_org(self.scope, runner_id)
                    else:
                        owner, repo = self.scope.split("/")
                        gh.rest.actions.delete_self_hosted_runner_from_repo(owner, repo, runner_id)
            except RequestFailed as exc:
                if exc.response.status_code == 404:
                    return False
                raise
        return True

    def set_labels(self, runner_id: int, labels: Sequence[str]) -> tuple[str, ...]:
        """Replace a runner's custom labels (``PUT .../runners/{id}/labels``; empty: remove them all).

        Returns every label GitHub says the runner now has (read-only ones
        too). That is what GitHub stored, not proof that dispatch uses it yet:
        callers that need the change in effect check the runner afterwards.
        """
        with self._github() as gh:
            return self._set_labels(gh, runner_id, labels)

    def _set_labels(self, gh: GitHub[TokenAuthStrategy] | GitHub[AppInstallationAuthStrategy], runner_id: int,
                    labels: Sequence[str]) -> tuple[str, ...]:
        with self._mapped_errors(f"set the labels of runner {runner_id}"):
            actions = gh.rest.actions
            if not labels:                      # GitHub's documented way to clear: DELETE .../labels
                if self.is_org:
                    cleared = actions.remove_all_custom_labels_from_self_hosted_runner_for_org(
                        self.scope, runner_id).parsed_data
                else:
                    owner, repo = self.scope.split("/")
                    cleared = actions.remove_all_custom_labels_from_self_hosted_runner_for_repo(
                        owner, repo, runner_id).parsed_data
                return tuple(label.name for label in cleared.labels)
            if self.is_org:
                data = actions.set_custom_labels_for_self_hosted_runner_for_org(
                    self.scope, runner_id, labels=list(labels)).parsed_data
            else:
                owner, repo = self.scope.split("/")
                data = actions.set_custom_labels_for_self_hosted_runner_for_repo(
                    owner, repo, runner_id, labels=list(labels)).parsed_data
        return tuple(label.name for label in data.labels)

    def set_labels_many(self, changes: Sequence[tuple[int, Sequence[str]]]
                        ) -> dict[int, tuple[str, ...] | RunnerPoolError]:
        """:meth:`set_labels` for each ``(runner id, labels)``, in parallel (GitHub has no batch
        endpoint): per runner the labels GitHub stored, or the error that refused it."""
        return self._each(lambda gh, change: self._set_labels(gh, change[0], change[1]), changes,
                          key=lambda change: change[0])

    def get_runners(self, runner_ids: Sequence[int]) -> dict[int, GitHubRunner | None | RunnerPoolError]:
        """:meth:`get_runner` for each id, in parallel: the runner, ``None`` (gone), or the error."""
        return self._each(self._get_runner, runner_ids, key=lambda runner_id: runner_id)

    def _each(self, fn: Callable[[Any, T], R], items: Sequence[T], key: Callable[[T], int]
              ) -> dict[int, R | RunnerPoolError]:
        """Run ``fn(gh, item)`` over ``items`` in threads sharing one githubkit client (its HTTP
        connection pool is thread-safe; githubkit finds the open client through a context variable,
        so each thread runs in a copy of this context). Each call keeps its own retries; a
        :class:`RunnerPoolError` is the result of its item, anything else propagates."""
        def one(gh: Any, item: T) -> R | RunnerPoolError:
            try:
                return fn(gh, item)
            except RunnerPoolError as exc:
                return exc

        if not items:
            return {}
        with self._github() as gh:
            if len(items) == 1:
                return {key(items[0]): one(gh, items[0])}
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(items))) as pool:
                futures = [pool.submit(contextvars.copy_context().run, one, gh, item) for item in items]
                return {key(item): f.result() for item, f in zip(items, futures, strict=True)}

    def _github(self) -> GitHub[TokenAuthStrategy] | GitHub[AppInstallationAuthStrategy]:
        """A fresh githubkit client: never stored (see the module docstring)."""
        from githubkit import AppInstallationAuthStrategy, GitHub, TokenAuthStrategy

        if self.app_id is not None:
            return GitHub(
                AppInstallationAuthStrategy(str(self.app_id), self.app_private_key,
                                            installation_id=int(self.app_installation_id or 0)),
                base_url=self.api_url, timeout=self.timeout_s, auto_retry=self.retry, http_cache=False)
        return GitHub(
            TokenAuthStrategy(self.token),
            base_url=self.api_url,
            timeout=self.timeout_s,
            auto_retry=self.retry,
            http_cache=False,
        )

    @contextmanager
    def _mapped_errors(self, doing: str) -> Iterator[None]:
        """Turn githubkit errors into runner-pool errors, once, chained to the original."""
        from githubkit.exception import GitHubException, RateLimitExceeded, RequestError, RequestFailed

        try:
            yield
        except RateLimitExceeded as exc:
            raise RunnerPoolError(
                f"GitHub rate limit exceeded while trying to {doing} for {self.scope_label}",
                hint=f"it resets in {exc.retry_after.total_seconds():.0f} s; fewer concurrent runs help"
                + ("" if self.is_app else "; a GitHub App installation has a higher limit than a PAT"),
            ) from exc
        except RequestFailed as exc:
            if is_secondary_rate_limit(exc):
                raise RunnerPoolError(
                    f"GitHub secondary rate limit hit while trying to {doing} for {self.scope_label}",
                    hint="too many requests at once; retry in a minute or run fewer provisions concurrently",
                ) from exc
            raise self._status_error(exc.response.status_code, doing) from exc
        except RequestError as exc:
            inner = exc.__cause__
            if isinstance(inner, RequestFailed):        # raised inside the auth flow (App token exchange)
                raise self._status_error(inner.response.status_code, doing) from inner
            raise RunnerPoolError(
                f"could not reach GitHub at {self.api_url} to {doing}: {exc}",
                hint="check the GitHub API URL and the network",
            ) from exc
        except GitHubException as exc:
            raise RunnerPoolError(f"GitHub call failed while trying to {doing}: {exc!r}") from exc

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
