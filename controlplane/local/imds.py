"""A local stand-in for EC2's instance metadata service (IMDSv2 only).

One HTTP server on 127.0.0.1 serves many simulated instances, each under its
own path prefix: the agent of instance ``X`` gets
``RUNNER_POOL_IMDS_ENDPOINT=http://127.0.0.1:PORT/X`` and asks for
``.../X/latest/api/token`` exactly as it would ask ``169.254.169.254``.

It enforces what the launch template enforces on EC2 (``HttpTokens:
required``): a session token comes from ``PUT /latest/api/token`` with an
``X-aws-ec2-metadata-token-ttl-seconds`` header of 1..21600, a token works only
for the instance that asked for it and only until its TTL, and every GET
without a valid token is 401. A PUT carrying ``X-Forwarded-For`` is refused
(403), as IMDS refuses requests that went through a proxy.

Served paths (under ``/<instance-id>``): ``latest/dynamic/instance-identity/
document``, ``latest/meta-data/`` {``instance-id``, ``instance-type``,
``ami-id``, ``placement/availability-zone``, ``placement/region``,
``services/partition``, ``services/domain``, ``tags/instance``,
``tags/instance/<key>``, ``iam/security-credentials/<role>``}, and
``latest/user-data``.

Rootfs instances (``controlplane/local/rootfs.py``) reach it as EC2's do, at
``http://169.254.169.254/latest/...`` with no prefix: :meth:`ImdsStandIn.serve_on`
adds a server on a socket in the simulator's hub namespace, and that server
tells instances apart by the source address of the connection (each instance
has its own link-local address), as EC2 does. There it also serves the
instance role's credentials, which is how boto3 on a rootfs instance gets
them (the process kind passes them in the environment instead).

Routing is werkzeug's: ``_ROUTES`` at the bottom is the table of GET paths,
one ``Rule`` per path with a handler as its endpoint. Adding a path (say
``latest/meta-data/spot/instance-action``) is one ``Rule`` there plus its
handler method; the token check, the instance lookup and the 404 for a
handler's ``None`` apply to every route without further code. Serving is
:class:`controlplane.local.wsgi.Served` (werkzeug's threaded server).
"""
from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from controlplane.local.wsgi import Served

TOKEN_TTL_MAX_S = 21600
TOKEN_PATH = "/latest/api/token"
SERVER_VERSION = "EC2ws"                             # the Server header EC2's IMDS sends

# A GET route's endpoint: (standin, instance, **path parameters) -> body, Response, or None (404).
_ImdsHandler = Callable[..., "bytes | Response | None"]


@dataclass(frozen=True)
class ImdsInstance:
    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    account: str
    user_data: bytes = b""
    tags: dict[str, str] = field(default_factory=dict)
    image_id: str = "ami-00000000"
    partition: str = "aws"
    pending_time: float = 0.0
    role: str = ""                                   # instance profile role served under iam/security-credentials
    credentials: dict[str, str] = field(default_factory=dict)   # AccessKeyId, SecretAccessKey, Token

    def identity_document(self) -> dict[str, Any]:
        pending = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.pending_time or time.time()))
        return {
            "accountId": self.account, "architecture": "x86_64", "availabilityZone": self.availability_zone,
            "billingProducts": None, "devpayProductCodes": None, "marketplaceProductCodes": None,
            "imageId": self.image_id, "instanceId": self.instance_id, "instanceType": self.instance_type,
            "kernelId": None, "pendingTime": pending, "privateIp": "10.0.0.1", "ramdiskId": None,
            "region": self.region, "version": "2017-09-30",
        }


class ImdsStandIn:
    """IMDSv2 for many simulated instances on one local port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, ImdsInstance] = {}
        self._tokens: dict[str, tuple[str, float]] = {}      # token -> (instance id, expires monotonic)
        self._served: Served | None = None
        self._extra: list[Served] = []                      # serve_on() sockets, instances known by address
        self._addresses: dict[str, str] = {}              # source address -> instance id
        self.port = 0

    def start(self) -> ImdsStandIn:
        if self._served is not None:
            raise RuntimeError("the IMDS stand-in is already running")
        self._served = Served(self._by_prefix, name="imds-standin", server_version=SERVER_VERSION)
        self.port = self._served.port
        return self

    def serve_on(self, sock: socket.socket) -> None:
        """Also answer on ``sock`` (a listening socket), knowing instances by their source address."""
        served = Served(self._by_source, sock=sock, name="imds-standin-hub", server_version=SERVER_VERSION)
        with self._lock:
            self._extra.append(served)

    def stop(self) -> None:
        served, self._served = self._served, None
        with self._lock:
            extra, self._extra = self._extra, []
        for each in ([served] if served is not None else []) + extra:
            each.stop()

    def by_address(self, address: str) -> str:
        """The instance that has ``address`` ('-' if none: every request then gets 404)."""
        with self._lock:
            return self._addresses.get(address, "-")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, instance_id: str) -> str:
        """What the agent of ``instance_id`` uses as ``RUNNER_POOL_IMDS_ENDPOINT``."""
        return f"{self.url}/{instance_id}"

    def register(self, instance_id: str, instance_type: str, az: str, region: str, account: str,
                 user_data: bytes | str = b"", tags: dict[str, str] | None = None, *,
                 image_id: str = "ami-00000000", partition: str = "aws", pending_time: float = 0.0,
                 address: str | None = None, role: str = "", credentials: dict[str, str] | None = None) -> None:
        """Serve ``instance_id``; with ``address``, to connections from that address on :meth:`serve_on` sockets."""
        data = user_data.encode() if isinstance(user_data, str) else bytes(user_data)
        inst = ImdsInstance(instance_id, instance_type, az, region, account, data, dict(tags or {}),
                            image_id, partition, pending_time or time.time(), role, dict(credentials or {}))
        with self._lock:
            self._instances[instance_id] = inst
            self._addresses = {a: i for a, i in self._addresses.items() if i != instance_id}
            if address:
                self._addresses[address] = instance_id

    def unregister(self, instance_id: str) -> None:
        with self._lock:
            self._instances.pop(instance_id, None)
            self._tokens = {t: v for t, v in self._tokens.items() if v[0] != instance_id}
            self._addresses = {a: i for a, i in self._addresses.items() if i != instance_id}

    def instances(self) -> list[str]:
        with self._lock:
            return sorted(self._instances)

    # -- request handling ---------------------------------------------------------

    def _by_prefix(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI app of the 127.0.0.1 port: ``/<instance-id>/latest/...``."""
        request = Request(environ)
        instance_id, _, rest = request.path.lstrip("/").partition("/")
        return self._answer(request, instance_id, "/" + rest)(environ, start_response)

    def _by_source(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI app of a :meth:`serve_on` socket: ``/latest/...``, the instance is the client's address."""
        request = Request(environ)
        instance_id = self.by_address(request.remote_addr or "")
        return self._answer(request, instance_id, request.path)(environ, start_response)

    def _answer(self, request: Request, instance_id: str, path: str) -> Response:
        with self._lock:
            inst = self._instances.get(instance_id)
        if inst is None:
            return _text(404, "Not Found")
        if path == TOKEN_PATH and request.method == "PUT":
            return self._token(request, instance_id)
        if request.method != "GET":
            return _text(405, "Method Not Allowed")
        with self._lock:
            grant = self._tokens.get(request.headers.get("X-aws-ec2-metadata-token") or "")
        if grant is None or grant[0] != instance_id or grant[1] <= time.monotonic():
            return _text(401, "Unauthorized")
        try:
            handler, params = _ROUTES.bind("imds").match(path.rstrip("/") or "/", "GET")
        except HTTPException:
            return _text(404, "Not Found")
        reply = handler(self, inst, **params)
        if reply is None:
            return _text(404, "Not Found")
        return reply if isinstance(reply, Response) else Response(reply, 200, content_type="text/plain")

    def _token(self, request: Request, instance_id: str) -> Response:
        """``PUT /latest/api/token``: a session token for this instance, valid its TTL."""
        if request.headers.get("X-Forwarded-For"):
            return _text(403, "Forbidden")
        try:
            ttl = int(request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            return _text(400, "Missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
        if not 1 <= ttl <= TOKEN_TTL_MAX_S:
            return _text(400, "X-aws-ec2-metadata-token-ttl-seconds must be 1..21600")
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (instance_id, now + ttl)
        return _text(200, token)

    # -- GET handlers: (instance, path parameters) -> body (text/plain), a Response, or None (404) ---------

    def _meta_data_index(self, inst: ImdsInstance) -> bytes:
        return b"ami-id\n" + (b"iam/\n" if inst.role else b"") + b"instance-id\ninstance-type\nplacement/\nservices/\ntags/"

    def _identity_document(self, inst: ImdsInstance) -> Response:
        return Response(json.dumps(inst.identity_document(), indent=2), 200, content_type="application/json")

    def _user_data(self, inst: ImdsInstance) -> bytes | None:
        return inst.user_data or None

    def _tag_keys(self, inst: ImdsInstance) -> bytes:
        return "\n".join(sorted(inst.tags)).encode()

    def _tag(self, inst: ImdsInstance, key: str) -> bytes | None:
        return inst.tags[key].encode() if key in inst.tags else None

    def _role_name(self, inst: ImdsInstance) -> bytes | None:
        return inst.role.encode() if inst.role else None

    def _role_credentials(self, inst: ImdsInstance, role: str) -> bytes | None:
        if not inst.role or role != inst.role:
            return None
        return json.dumps({
            "Code": "Success", "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "Type": "AWS-HMAC", "AccessKeyId": inst.credentials.get("AccessKeyId", ""),
            "SecretAccessKey": inst.credentials.get("SecretAccessKey", ""),
            "Token": inst.credentials.get("Token", ""),
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600)),
        }).encode()


def _text(status: int, body: str) -> Response:
    return Response(body, status, content_type="text/plain")


def _field(name: str) -> _ImdsHandler:
    """A handler answering one attribute of :class:`ImdsInstance`."""
    return lambda _standin, inst: str(getattr(inst, name)).encode()

# The GET paths, after the instance prefix and without a trailing slash (a request's is ignored).
# To serve a new path, add a Rule whose endpoint is a handler ``(standin, instance, **params)``
# returning the body (text/plain), a Response (another type or status), or None for 404, e.g.
#     Rule("/latest/meta-data/spot/instance-action", endpoint=ImdsStandIn._spot_action)
# werkzeug converters give typed parameters (``<path:key>`` may hold slashes). Every route is
# token-checked before it runs; only ``PUT /latest/api/token`` (``_token``) is not a GET route.
_MD = "/latest/meta-data"
_ROUTES = Map([
    Rule("/latest/dynamic/instance-identity/document", endpoint=ImdsStandIn._identity_document),
    Rule("/latest/user-data", endpoint=ImdsStandIn._user_data),
    Rule(_MD, endpoint=ImdsStandIn._meta_data_index),
    Rule(f"{_MD}/instance-id", endpoint=_field("instance_id")),
    Rule(f"{_MD}/instance-type", endpoint=_field("instance_type")),
    Rule(f"{_MD}/ami-id", endpoint=_field("image_id")),
    Rule(f"{_MD}/placement/availability-zone", endpoint=_field("availability_zone")),
    Rule(f"{_MD}/placement/region", endpoint=_field("region")),
    Rule(f"{_MD}/services/partition", endpoint=_field("partition")),
    Rule(f"{_MD}/services/domain", endpoint=lambda _standin, _inst: b"amazonaws.com"),
    Rule(f"{_MD}/tags/instance", endpoint=ImdsStandIn._tag_keys),
    Rule(f"{_MD}/tags/instance/<path:key>", endpoint=ImdsStandIn._tag),
    Rule(f"{_MD}/iam/security-credentials", endpoint=ImdsStandIn._role_name),
    Rule(f"{_MD}/iam/security-credentials/<role>", endpoint=ImdsStandIn._role_credentials),
], strict_slashes=False, merge_slashes=False)
