"""GitHub's self-hosted runner API, as the control plane uses it.

Four operations on one scope, a repository (``owner/repo``) or an organization
(``org``): create a registration token, create a removal token, list the
scope's runners (every page, 100 per page) and delete a runner by id. The
scope picks the ``/repos/{owner}/{repo}/...`` or ``/orgs/{org}/...`` endpoints;
nothing else in the control plane builds GitHub URLs or imports githubkit.

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

Errors are mapped once, in :meth:`GitHubClient._mapped_errors`, and chained:
401 is a :class:`RunnerPoolError` about the token, 404 on the scope is a
:class:`ConfigError` naming the repository or organization, 403 names the
missing token scope; anything else keeps GitHub's status code in the message.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from githubkit import GitHub, TokenAuthStrategy
from githubkit.exception import GitHubException, RateLimitExceeded, RequestError, RequestFailed
from githubkit.typing import RetryOption

from controlplane.errors import ConfigError, RunnerPoolError

TOKEN_ENV_VARS = ("RUNNER_POOL_GITHUB_TOKEN", "GITHUB_TOKEN")
PER_PAGE = 100                      # GitHub's maximum for the runners listing
MAX_PAGES = 100                     # 10,000 runners: a bound on the loop, far above any real scope
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunnerToken:
    """A registration or removal token for ``config.sh``; valid one hour on GitHub."""

    token: str = field(repr=False)
    expires_at: float               # epoch seconds


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
        if retry_count >= self.max_retries:
            return RetryOption(False)
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
    token: str = field(repr=False)
    scope: str
    retry: RetryPolicy = DEFAULT_RETRY
    timeout_s: float = REQUEST_TIMEOUT_S
    token_source: str = TOKEN_ENV_VARS[0]      # the variable the token came from, for error messages

    def __post_init__(self) -> None:
        parts = self.scope.split("/")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"invalid GitHub scope {self.scope!r}",
                              hint="use owner/repo for a repository or the organization name")

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
        """A new removal token (``config.sh remove --token``)."""
        with self._mapped_errors("create a removal token"), self._github() as gh:
            if self.is_org:
                token = gh.rest.actions.create_remove_token_for_org(self.scope).parsed_data
            else:
                owner, repo = self.scope.split("/")
                token = gh.rest.actions.create_remove_token_for_repo(owner, repo).parsed_data
        return RunnerToken(token=token.token, expires_at=token.expires_at.timestamp())

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
                raise ConfigError(f"{self.token_source}: GitHub rejected the token",
                                  hint="it is invalid, expired or revoked; export a valid PAT") from exc
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

    def _github(self) -> GitHub[TokenAuthStrategy]:
        """A fresh githubkit client: never stored (see the module docstring)."""
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
        try:
            yield
        except RateLimitExceeded as exc:
            raise RunnerPoolError(
                f"GitHub rate limit exceeded while trying to {doing} for {self.scope_label}",
                hint=f"it resets in {exc.retry_after.total_seconds():.0f} s; fewer concurrent runs help",
            ) from exc
        except RequestFailed as exc:
            raise self._status_error(exc.response.status_code, doing) from exc
        except RequestError as exc:
            raise RunnerPoolError(
                f"could not reach GitHub at {self.api_url} to {doing}: {exc}",
                hint="check the GitHub API URL and the network",
            ) from exc
        except GitHubException as exc:
            raise RunnerPoolError(f"GitHub call failed while trying to {doing}: {exc!r}") from exc

    def _status_error(self, status: int, doing: str) -> RunnerPoolError:
        if status == 401:
            return RunnerPoolError(
                "GitHub rejected the token",
                hint="check RUNNER_POOL_GITHUB_TOKEN: it is invalid, expired or revoked",
            )
        if status == 403:
            return RunnerPoolError(
                f"GitHub refused to {doing} for {self.scope_label}",
                hint="the token needs admin access and the `repo` scope (repository) or `admin:org` (organization)",
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


def github_client_from_env(api_url: str, scope: str) -> GitHubClient:
    """A client with the PAT from ``RUNNER_POOL_GITHUB_TOKEN`` (or ``GITHUB_TOKEN``)."""
    for name in TOKEN_ENV_VARS:
        token = os.environ.get(name, "").strip()
        if token:
            return GitHubClient(api_url, token, scope, token_source=name)
    raise ConfigError("GitHub token not set",
                      hint="export RUNNER_POOL_GITHUB_TOKEN=<a PAT with repo or admin:org scope>")
