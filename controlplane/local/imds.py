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
``latest/user-data``; once :meth:`ImdsStandIn.notify` injected one, the spot
interruption notice (``meta-data/spot/instance-action``) and the rebalance
recommendation (``meta-data/events/recommendations/rebalance``), 404 before,
as on EC2.

Rootfs instances (``controlplane/local/rootfs.py``) reach it as EC2's do, at
``http://169.254.169.254/latest/...`` with no prefix: :meth:`ImdsStandIn.serve_on`
adds a server on a socket in the simulator's hub namespace, and that server
tells instances apart by the source address of the connection (each instance
has its own link-local address), as EC2 does. There it also serves the
instance role's credentials, which is how boto3 on a rootfs instance gets
them (the process kind passes them in the environment instead).
"""
from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_TTL_MAX_S = 21600
SPOT_NOTICE_PATHS = {"instance-action": "/latest/meta-data/spot/instance-action",
                     "rebalance": "/latest/meta-data/events/recommendations/rebalance"}
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
SPOT_NOTICE_LEAD_S = 120          # EC2 gives two minutes' notice before it interrupts
STOP_JOIN_TIMEOUT_S = 5.0


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, standin: ImdsStandIn, sock: socket.socket | None = None) -> None:
        self.standin = standin
        self.by_source = sock is not None                 # the instance is the client's address, not a prefix
        if sock is None:
            super().__init__(("127.0.0.1", 0), _Handler)
            return
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "EC2ws"

    def _path(self) -> str:
        if not self.server.by_source:
            return self.path
        return "/" + self.server.standin.by_address(self.client_address[0]) + self.path

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        self._reply(*self.server.standin._put(self._path(), self.headers))

    def do_GET(self) -> None:  # noqa: N802
        self._reply(*self.server.standin._get(self._path(), self.headers))

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: the agent logs what it got."""


class ImdsStandIn:
    """IMDSv2 for many simulated instances on one local port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, ImdsInstance] = {}
        self._tokens: dict[str, tuple[str, float]] = {}      # token -> (instance id, expires monotonic)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._extra: list[tuple[_Server, threading.Thread]] = []
        self._addresses: dict[str, str] = {}              # source address -> instance id
        self._notices: dict[str, dict[str, bytes]] = {}   # instance id -> path -> body (spot notices)
        self.port = 0

    def start(self) -> ImdsStandIn:
        if self._server is not None:
            raise RuntimeError("the IMDS stand-in is already running")
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="imds-standin", daemon=True)
        self._thread.start()
        return self

    def serve_on(self, sock: socket.socket) -> None:
        """Also answer on ``sock`` (a listening socket), knowing instances by their source address."""
        server = _Server(self, sock)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="imds-standin-hub", daemon=True)
        thread.start()
        with self._lock:
            self._extra.append((server, thread))

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        with self._lock:
            extra, self._extra = self._extra, []
        for s, t in [(server, thread)] + extra:
            if s is not None:
                s.shutdown()
                s.server_close()
            if t is not None:
                t.join(STOP_JOIN_TIMEOUT_S)

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

    def notify(self, instance_id: str, kind: str, action: str = "terminate") -> dict[str, Any]:
        """Serve a spot notice to ``instance_id`` from now on: ``instance-action`` (``{"action", "time"}``,
        the time two minutes ahead) or ``rebalance`` (``{"noticeTime"}``). ValueError for a bad kind."""
        if kind not in SPOT_NOTICE_PATHS:
            raise ValueError(f"kind must be one of {sorted(SPOT_NOTICE_PATHS)}, not {kind!r}")
        if action not in SPOT_ACTIONS:
            raise ValueError(f"action must be one of {SPOT_ACTIONS}, not {action!r}")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + SPOT_NOTICE_LEAD_S))
        body: dict[str, Any] = ({"action": action, "time": stamp} if kind == "instance-action"
                                else {"noticeTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        with self._lock:
            self._notices.setdefault(instance_id, {})[SPOT_NOTICE_PATHS[kind]] = json.dumps(body).encode()
        return {"instance_id": instance_id, "path": SPOT_NOTICE_PATHS[kind], "body": body}

    def unregister(self, instance_id: str) -> None:
        with self._lock:
            self._notices.pop(instance_id, None)
            self._instances.pop(instance_id, None)
            self._tokens = {t: v for t, v in self._tokens.items() if v[0] != instance_id}
            self._addresses = {a: i for a, i in self._addresses.items() if i != instance_id}

    def instances(self) -> list[str]:
        with self._lock:
            return sorted(self._instances)

    # -- request handling ---------------------------------------------------------

    def _split(self, path: str) -> tuple[str, str]:
        path = path.split("?", 1)[0]
        parts = path.lstrip("/").split("/", 1)
        return parts[0], "/" + (parts[1] if len(parts) > 1 else "")

    def _put(self, raw_path: str, headers: Any) -> tuple[int, bytes]:
        instance_id, path = self._split(raw_path)
        with self._lock:
            known = instance_id in self._instances
        if not known:
            return 404, b"Not Found"
        if path != "/latest/api/token":
            return 405, b"Method Not Allowed"
        if headers.get("X-Forwarded-For"):
            return 403, b"Forbidden"
        try:
            ttl = int(headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            return 400, b"Missing or invalid X-aws-ec2-metadata-token-ttl-seconds"
        if not 1 <= ttl <= TOKEN_TTL_MAX_S:
            return 400, b"X-aws-ec2-metadata-token-ttl-seconds must be 1..21600"
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (instance_id, now + ttl)
        return 200, token.encode()

    def _get(self, raw_path: str, headers: Any) -> tuple[int, bytes, str]:
        instance_id, path = self._split(raw_path)
        with self._lock:
            inst = self._instances.get(instance_id)
            grant = self._tokens.get(headers.get("X-aws-ec2-metadata-token") or "")
            notice = self._notices.get(instance_id, {}).get(path.rstrip("/"))
        if inst is None:
            return 404, b"Not Found", "text/plain"
        if grant is None or grant[0] != instance_id or grant[1] <= time.monotonic():
            return 401, b"Unauthorized", "text/plain"
        if notice is not None:
            return 200, notice, "application/json"
        value = self._value(inst, path.rstrip("/") if path != "/latest/meta-data/" else path)
        if value is None:
            return 404, b"Not Found", "text/plain"
        if path.endswith("instance-identity/document"):
            return 200, value, "application/json"
        return 200, value, "text/plain"

    @staticmethod
    def _value(inst: ImdsInstance, path: str) -> bytes | None:
        md = "/latest/meta-data"
        simple = {
            md + "/instance-id": inst.instance_id,
            md + "/instance-type": inst.instance_type,
            md + "/ami-id": inst.image_id,
            md + "/placement/availability-zone": inst.availability_zone,
            md + "/placement/region": inst.region,
            md + "/services/partition": inst.partition,
            md + "/services/domain": "amazonaws.com",
            md + "/tags/instance": "\n".join(sorted(inst.tags)),
        }
        if path in simple:
            return simple[path].encode()
        creds = md + "/iam/security-credentials"
        if inst.role and path == creds:
            return inst.role.encode()
        if inst.role and path == f"{creds}/{inst.role}":
            return json.dumps({
                "Code": "Success", "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "Type": "AWS-HMAC", "AccessKeyId": inst.credentials.get("AccessKeyId", ""),
                "SecretAccessKey": inst.credentials.get("SecretAccessKey", ""),
                "Token": inst.credentials.get("Token", ""),
                "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600)),
            }).encode()
        if path == md + "/" or path == md:
            return b"ami-id\n" + (b"iam/\n" if inst.role else b"") + b"instance-id\ninstance-type\nplacement/\nservices/\ntags/"
        if path == "/latest/dynamic/instance-identity/document":
            return json.dumps(inst.identity_document(), indent=2).encode()
        if path == "/latest/user-data":
            return inst.user_data if inst.user_data else None
        prefix = md + "/tags/instance/"
        if path.startswith(prefix) and path[len(prefix):] in inst.tags:
            return inst.tags[path[len(prefix):]].encode()
        return None
