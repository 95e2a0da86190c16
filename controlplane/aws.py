"""The one place that talks to boto3.

Why clients live here and nowhere else: Pulumi pickles dynamic providers with
dill and a boto3 client holds an ``SSLContext`` that cannot be pickled, so no
object of the control plane keeps a client. Building one is not free (tens of
milliseconds, more under thread contention), so this module caches clients
per process, keyed by everything that changes what a client talks to
(service, region, retry policy, endpoint, credentials in the environment).
boto3 clients are thread-safe; sessions are not, so each is built under a lock.

Clients with the same endpoint and credentials share one botocore session,
and so one data loader: botocore's endpoint tables (``endpoints.json``, over
a megabyte) and the list of known services are read once per process, not
once per client, and its JSON is parsed into plain dicts (botocore's own
loader asks for ``OrderedDict``, several times slower on the 4 MB EC2
model; plain dicts keep their order too).

Every client:

* honours ``AWS_ENDPOINT_URL`` (the local emulator) and the standard
  credential chain, through boto3 itself;
* retries throttling with botocore's ``adaptive`` mode (client-side rate
  limiting plus exponential backoff), up to ``MAX_ATTEMPTS``;
* has connect and read timeouts, so no call can hang a provision;
* counts its calls into the current :class:`CallCounter`, so provision and
  release can report API calls per runner.

CreateFleet gets the same retries as every call. With ``Type=instant``
capacity problems come back in the response's ``Errors``, not as exceptions,
so what botocore retries there is throttling (``RequestLimitExceeded``) and
5xx, and the ``ClientToken`` makes a retried call return the first call's
fleet instead of launching another. (It used to have 3 attempts "to fail
fast": a burst of three throttled requests then failed the whole run.)

An endpoint that refuses connections (a network blip, an endpoint or proxy
restarting) is retried for ``UNREACHABLE_RETRY_S`` on every client, the
fleet client included: botocore's own budget for it is 8 attempts at a 50 ms
(DynamoDB: 25 ms) backoff base, about 1.5 s, after which a provision would
die mid-validation and leave its cleanup to reconcile. Only failures to
*connect* get the longer budget: such a request never reached AWS, so
sending it again is safe even for a write; a connection that broke after the
request was sent keeps botocore's budget.
"""
from __future__ import annotations

import contextvars
import gzip
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError
from botocore.loaders import JSONFileLoader, Loader

from controlplane.errors import AlreadyExists as AlreadyExists
from controlplane.errors import AwsError as AwsError
from controlplane.errors import ConditionFailed as ConditionFailed
from controlplane.errors import NotFound as NotFound
from controlplane.errors import Throttled as Throttled
from controlplane.errors import Unreachable as Unreachable

T = TypeVar("T")
R = TypeVar("R")

MAX_ATTEMPTS = 8
FLEET_MAX_ATTEMPTS = MAX_ATTEMPTS    # see the module docstring
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30           # > SQS long poll (20 s max)
UNREACHABLE_RETRY_S = 30      # keep retrying a call whose connection is refused this long
UNREACHABLE_BACKOFF_MAX_S = 2

THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestThrottled", "TooManyRequestsException",
    "RequestThrottledException", "SlowDown",
})


class CallCounter:
    """Thread-safe count of AWS calls by ``service.Operation``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def by_service(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for key, n in self.snapshot().items():
            out[key.split(".", 1)[0]] += n
        return dict(out)

    def total(self) -> int:
        return sum(self.snapshot().values())


_counter: contextvars.ContextVar[CallCounter | None] = contextvars.ContextVar("rp_call_counter", default=None)


@contextmanager
def counted() -> Iterator[CallCounter]:
    """Count the AWS calls made inside the block (and in threads started by :func:`parallel`)."""
    counter = CallCounter()
    token = _counter.set(counter)
    try:
        yield counter
    finally:
        _counter.reset(token)


def _count_call(model: Any, **_: Any) -> None:
    counter = _counter.get()
    if counter is not None:
        counter.add(f"{model.service_model.service_name}.{model.name}")


def _retry_unreachable(attempts: int, caught_exception: BaseException | None = None,
                       request_dict: dict[str, Any] | None = None, **_: Any) -> float | None:
    """``needs-retry`` handler: a delay while the endpoint refuses connections, else None (botocore decides)."""
    if not isinstance(caught_exception, (EndpointConnectionError, ConnectTimeoutError)) or request_dict is None:
        return None
    if _name_not_resolved(caught_exception):
        return None                          # a wrong host or region: waiting will not fix it
    context = request_dict.setdefault("context", {})
    since = context.setdefault("runner_pool_unreachable_since", time.monotonic())
    if time.monotonic() - since > UNREACHABLE_RETRY_S:
        return None
    return float(random.uniform(0.5, 1.0) * min(UNREACHABLE_BACKOFF_MAX_S, 0.1 * 2 ** attempts))


def _name_not_resolved(exc: BaseException) -> bool:
    """Whether a connection error is DNS failing (``socket.gaierror`` somewhere in its chain)."""
    seen: list[BaseException] = []
    err: BaseException | None = getattr(exc, "kwargs", {}).get("error") or exc
    while err is not None and err not in seen:
        if isinstance(err, socket.gaierror) or type(err).__name__ == "NameResolutionError":
            return True
        seen.append(err)
        err = err.__cause__ or err.__context__
    return False


def _config(region: str, attempts: int) -> Config:
    return Config(
        region_name=region,
        retries={"mode": "adaptive", "total_max_attempts": attempts},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=50,
    )


class _PlainJsonFiles(JSONFileLoader):
    """botocore's file loader, parsing to plain dicts (``exists`` is botocore's own)."""

    OPENERS: tuple[tuple[str, Callable[[str], Any]], ...] = (
        (".json", lambda path: open(path, "rb")),
        (".json.gz", lambda path: gzip.open(path, "rb")),
    )

    def load_file(self, file_path: str) -> Any:
        for ext, opener in self.OPENERS:
            if os.path.isfile(file_path + ext):
                with opener(file_path + ext) as fp:
                    return json.loads(fp.read())
        return None


_clients: dict[tuple[str, ...], Any] = {}
_sessions: dict[tuple[str, ...], boto3.session.Session] = {}
_clients_lock = threading.Lock()


def _session(env: tuple[str, ...]) -> boto3.session.Session:
    """The session for clients that see this endpoint and these credentials (call under the lock)."""
    s = _sessions.get(env)
    if s is None:
        core = botocore.session.get_session()
        core.register_component("data_loader", Loader(file_loader=_PlainJsonFiles()))
        s = _sessions[env] = boto3.session.Session(botocore_session=core)
    return s


def client(service: str, region: str, *, attempts: int = MAX_ATTEMPTS) -> Any:
    """A boto3 client for ``service`` in ``region`` (cached here; never store it elsewhere)."""
    env = (os.environ.get("AWS_ENDPOINT_URL", ""), os.environ.get("AWS_ACCESS_KEY_ID", ""),
           os.environ.get("AWS_PROFILE", ""))
    key = (service, region, str(attempts), *env)
    c = _clients.get(key)
    if c is None:
        with _clients_lock:
            c = _clients.get(key)
            if c is None:
                c = _session(env).client(service, config=_config(region, attempts))  # type: ignore[call-overload]  # service is any name
                c.meta.events.register("before-call", _count_call)
                c.meta.events.register_first("needs-retry", _retry_unreachable)
                _clients[key] = c
    return c


def fleet_client(region: str) -> Any:
    """EC2 client for CreateFleet (retries: see the module docstring)."""
    return client("ec2", region, attempts=FLEET_MAX_ATTEMPTS)


NOT_FOUND_CODES = frozenset({
    "ResourceNotFoundException", "ParameterNotFound", "InvalidInstanceID.NotFound",
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
    "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound",
    "InvalidAMIID.NotFound", "InvalidAMIID.Malformed",
})
ALREADY_EXISTS_CODES = frozenset({"ResourceInUseException", "QueueAlreadyExists", "QueueNameExists"})
CONDITION_FAILED_CODES = frozenset({"ConditionalCheckFailedException", "TransactionCanceledException"})


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def wrap(exc: BaseException, doing: str, hint: str = "") -> AwsError:
    """Map a botocore error once into a typed :class:`AwsError`, keeping AWS's code."""
    code = error_code(exc)
    if isinstance(exc, ClientError):
        msg = exc.response.get("Error", {}).get("Message", "") or str(exc)
        text = f"{doing} failed: {code}: {msg}"
        if code in CONDITION_FAILED_CODES:
            item = exc.response.get("Item")             # ReturnValuesOnConditionCheckFailure=ALL_OLD
            return ConditionFailed(text, code=code, hint=hint, item=dict(item) if isinstance(item, dict) else None)
        kind = (NotFound if code in NOT_FOUND_CODES else AlreadyExists if code in ALREADY_EXISTS_CODES
                else Throttled if code in THROTTLING_CODES else AwsError)
        return kind(text, code=code, hint=hint)
    if isinstance(exc, BotoCoreError):
        return Unreachable(f"{doing} failed: {exc}", str(exc), code=type(exc).__name__,
                           hint=hint or "check AWS_ENDPOINT_URL / network / credentials")
    return AwsError(f"{doing} failed: {exc}", hint=hint)


def unreachable(exc: BaseException) -> Unreachable | None:
    """``exc`` as :class:`Unreachable` when it is the SDK failing to talk to AWS (mapped or raw), else None."""
    if isinstance(exc, Unreachable):
        return exc
    if isinstance(exc, BotoCoreError):
        return Unreachable(f"AWS call failed: {exc}", str(exc), code=type(exc).__name__)
    return None


@contextmanager
def mapped(doing: str, hint: str = "") -> Iterator[None]:
    """Run AWS calls, turning botocore's errors into the typed ones of :mod:`controlplane.errors`.

    ``doing`` names the call for the message (``dynamodb:GetItem pool config``);
    the botocore error stays chained for a debug run.
    """
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise wrap(exc, doing, hint) from exc


def found(doing: str, call: Callable[[], object]) -> bool:
    """Make one call; False when AWS answers that its resource does not exist (:class:`NotFound`)."""
    try:
        with mapped(doing):
            call()
    except NotFound:
        return False
    return True


def conditional_update(region: str, *, doing: str, **request: Any) -> dict[str, Any]:
    """One DynamoDB UpdateItem that returns the new row; :class:`ConditionFailed` carries the old one."""
    with mapped(doing):
        resp = client("dynamodb", region).update_item(
            **request, ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
    return dict(resp["Attributes"])


TRANSACTION_MAX = 100        # actions in one TransactWriteItems


def transact_updates(region: str, updates: list[dict[str, Any]], *, doing: str) -> bool:
    """One DynamoDB TransactWriteItems of conditional Updates (at most :data:`TRANSACTION_MAX`):
    True when all landed, False when the transaction was cancelled and none did.

    Only Updates, so IAM authorizes it as ``dynamodb:UpdateItem`` on the table (AWS authorizes
    each action of a transaction as its single call; there is no TransactWriteItems permission).
    botocore fills ``ClientRequestToken``, so a resend after a lost answer is not applied twice.
    """
    if not 0 < len(updates) <= TRANSACTION_MAX:
        raise ValueError(f"a transaction holds 1 to {TRANSACTION_MAX} actions, not {len(updates)}")
    try:
        with mapped(doing):
            client("dynamodb", region).transact_write_items(TransactItems=[{"Update": u} for u in updates])
    except ConditionFailed:
        return False
    return True


def parallel(fn: Callable[[T], R], items: Iterable[T], max_workers: int = 16) -> list[R]:
    """Map ``fn`` over ``items`` in threads, keeping order and the call counter.

    Exceptions propagate (the first one raised, after all calls finished).
    """
    items = list(items)
    if not items:
        return []
    if len(items) == 1:
        return [fn(items[0])]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, item) for item in items]
        return [f.result() for f in futures]


def chunks(seq: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL")


def account_and_partition(region: str) -> tuple[str, str]:
    """Account id and partition of the caller (one STS call)."""
    with mapped("sts:GetCallerIdentity", "set AWS credentials (or run `runner-pool local start`)"):
        arn = client("sts", region).get_caller_identity()["Arn"]
    parts = arn.split(":")
    return parts[4], parts[1]
