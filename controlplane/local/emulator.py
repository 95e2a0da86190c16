"""The local AWS emulator: moto's server on 127.0.0.1 with fixes.

moto is the AWS the embedded default runs against, over HTTP, with the same
boto3 code that talks to real AWS. Stock moto has gaps that would make our
tests lie, so this module wraps it (see ../shared/notes/moto.md for the
probes behind each fix):

1. **Atomic conditional writes.** moto's threaded server handles each request
   in its own thread and ``update_item`` checks then writes with no lock, so two
   concurrent claims of one idle row could both win. A WSGI middleware holds
   one lock around every request (except SQS long polls, which would stall
   everything).
2. **CreateFleet with InstanceRequirements.** moto ignores attribute-based
   selection (and fails without an InstanceType). The fleet shim resolves each
   override's requirements to the smallest current-generation type moto knows
   that fits, honours capacity faults per type/subnet/lifecycle, spreads the
   capacity over overrides in priority order and returns per-override
   ``Errors`` as EC2 does (also for an override that ran out part-way).
3. **Comparisons of mixed types.** In a condition or filter expression DynamoDB
   evaluates ``a <= b`` over values of different types (a string against a
   number) as false; moto raises ``TypeError`` and answers 500, so one junk
   attribute in one row would fail every query that filters on it
   (:func:`install_comparison_fix`).
4. **A transaction backs each table up once.** Before a TransactWriteItems
   moto deep-copies every table it touches, to roll back on a cancelled
   condition, but does it once per *action*: a commit of 50 rows copied the
   table 50 times, so the emulator made transactions slower than the single
   writes they replace (:func:`install_transaction_fix` copies each table once
   per call; what a transaction does is unchanged).
5. **Fault injection**, switchable at run time through ``/_emulator/*``
   endpoints: AWS-shaped error responses (throttling, 5xx) per operation by
   count or probability, latency per operation, and EC2 capacity shortfalls.

It also counts requests per ``service.Operation``, in all and per access key
(``GET /_emulator/requests``), which tests use to prove that bad input changed
nothing in AWS. moto accepts any access key and serves an unknown one from
the default account, so a process with its own ``AWS_ACCESS_KEY_ID`` sees the
same resources while its requests are counted apart from everyone else's
(the simulated agents sign with ``testing``, as the control plane does by
default).

Control endpoints (JSON bodies):

* ``POST /_emulator/faults`` ``{"op", "service"?, "access_key"?, "contains"?, "code",
  "status"?, "message"?, "count"? | "prob"? "seed"?}``: answer matching requests
  with an AWS-shaped error. ``op`` is the operation name or ``"*"``;
  ``service`` is the signing name from the SigV4 credential scope
  (``dynamodb``, ``sqs``, ``ec2``, ``ssm``, ``sts``...), so ``{"op": "*",
  "service": "sqs"}`` hits every SQS call; ``access_key`` only requests signed
  with that key; ``contains`` only requests whose body holds that text.
  ``prob`` draws from the rule's own random generator, seeded with ``seed``
  when one is given (the same requests in the same order meet the same
  faults). ``GET`` lists the rules with the ``hits`` each served; ``DELETE``
  clears faults, latency and capacity rules.
* ``POST /_emulator/latency`` ``{"op", "seconds", "service"?, "access_key"?,
  "contains"?}``: sleep before serving matching requests (outside the backend
  lock, so other requests go on; the newest matching rule wins). Each rule
  counts in ``hits`` the requests it has started to delay (listed by ``GET
  /_emulator/faults``), so a test can wait until a request is in flight.
* ``POST /_emulator/capacity`` ``{"instance_types"?, "subnets"?, "lifecycle"?,
  "available", "count"?}``: what CreateFleet can launch per type/subnet/lifecycle.
* ``POST /_emulator/restart`` ``{"down_s": 3}``: answer 202, then restart the
  HTTP server in the background **keeping every backend's state** (moto's
  models live in this process): stop accepting, drop open connections (in-
  flight requests may or may not have been applied, as with a real endpoint
  blip), refuse connections for ``down_s`` seconds, serve again on the same
  port. A restart while one is under way answers 409. ``GET /_emulator/health``
  reports ``restarts`` (completed so far). Moto losing its state is not an AWS
  failure mode, so there is no restart that forgets.
* ``GET``/``DELETE /_emulator/requests``: request counts by ``service.Operation``
  (``{"counts", "total", "mutations"}``); ``GET
  /_emulator/requests?access_key=KEY`` counts only the requests signed with
  ``KEY``.

**IAM enforcement** (:func:`enforce_iam`, ``runner-pool local start --enforce-iam``):
moto checks every request's signature and authorizes its action against the
signer's IAM policies. Stock moto authorizes only IAM, STS and SQS against the
resource a request touches and everything else against ``"*"`` -- so a policy
naming a table ARN would be refused even for that table. In enforcing mode the
emulator tells moto the resource of DynamoDB, SSM, EC2 and SQS requests too
(:func:`request_resource`: the table or index, the parameter, the instance,
launch template or fleet, the queue), so a policy is evaluated with its
``Resource`` elements as written, and SQS's batch calls are authorized as the
single calls they batch (as IAM does; :data:`IAM_ACTION_OF`). moto still ignores ``Condition`` elements;
those are evaluated offline (tests/security). Every 403 is counted per
``service.Operation`` and access key (``denied`` in ``GET /_emulator/requests``).

CreateFleet honours ``ClientToken`` as EC2 does: a second call with a token
already used returns the first call's fleet and instances instead of launching
again, so a client retrying a request whose answer was lost (a dropped
connection) cannot leak a second fleet.
"""
from __future__ import annotations

import argparse
import fnmatch
import io
import json
import logging
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

MUTATING_PREFIXES = (
    "Create", "Put", "Update", "Delete", "Terminate", "Run", "Send", "Modify", "BatchWrite", "TransactWrite",
    "Change", "Purge", "Set", "Tag", "Untag", "Attach", "Add", "Remove", "Associate", "Request", "Stop", "Start",
)
# SigV4: Authorization: AWS4-HMAC-SHA256 Credential=<access key>/<date>/<region>/<service>/aws4_request, ...
_CRED_SCOPE = re.compile(r"Credential=([^/]+)/\d{8}/[^/]+/([^/]+)/aws4_request")
MAX_DOWN_S = 60.0                 # a restart refuses connections at most this long
REBIND_TIMEOUT_S = 10.0           # the port may linger a moment after close


class Faults:
    """Error rules ``{"op", "service"?, "access_key"?, "contains"?, "status", "code", "message"?,
    "count"? | "prob"? "seed"?}``, latency rules ``{"op", "seconds", "service"?, "access_key"?,
    "contains"?}`` and capacity rules.

    ``contains`` narrows a rule to requests whose body holds that text (for
    example ``"running"``: only the transitions to ``running``, not the
    agents' heartbeats, which share the operation); ``access_key`` to one
    client's requests. Each error rule counts the requests it answered in
    ``hits``, each latency rule the requests it delayed.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []
        self.latency: list[dict[str, Any]] = []
        self.capacity: list[dict[str, Any]] = []

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.latency.clear()
            self.capacity.clear()

    def add_rule(self, rule: dict[str, Any]) -> int:
        """Add an error rule; a ``seed`` gives it its own random generator. Returns how many there are."""
        seed = rule.get("seed")
        if seed is not None and not isinstance(seed, (int, str)):
            raise ValueError("seed must be an integer or a string")
        rng = {"_rng": random.Random(seed)} if seed is not None else {}
        with self.lock:
            self.rules.append({**rule, "hits": 0, **rng})
            return len(self.rules)

    def add_latency(self, rule: dict[str, Any]) -> int:
        with self.lock:
            self.latency.append({**rule, "hits": 0})
            return len(self.latency)

    @staticmethod
    def _applies(r: dict[str, Any], service: str, op: str, body: bytes, access_key: str) -> bool:
        if r.get("op") not in (op, "*") or r.get("service", service) != service:
            return False
        if r.get("access_key", access_key) != access_key:
            return False
        return not r.get("contains") or str(r["contains"]).encode() in body

    def match(self, service: str, op: str, body: bytes = b"", access_key: str = "") -> dict[str, Any] | None:
        with self.lock:
            for r in self.rules:
                if not self._applies(r, service, op, body, access_key):
                    continue
                if "count" in r and r["count"] is not None:
                    if r["count"] <= 0:
                        continue
                    r["count"] -= 1
                elif r.get("_rng", random).random() >= float(r.get("prob", 1.0)):
                    continue
                r["hits"] = r.get("hits", 0) + 1
                return dict(r)
        return None

    def delay_for(self, service: str, op: str, body: bytes = b"", access_key: str = "") -> float:
        """Seconds to sleep before serving: the newest latency rule that applies (counted in its hits)."""
        with self.lock:
            for r in reversed(self.latency):
                if self._applies(r, service, op, body, access_key):
                    r["hits"] = r.get("hits", 0) + 1
                    return float(r.get("seconds", 0))
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"rules": [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.rules],
                    "latency": [dict(r) for r in self.latency], "capacity": [dict(r) for r in self.capacity]}


FAULTS = Faults()


class Requests:
    """Requests by ``service.Operation``: in all, and per access key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.by_key: dict[str, Counter[str]] = {}
        self.denied: dict[str, Counter[str]] = {}        # 403s, by access key

    def add(self, key: str, access_key: str = "") -> None:
        with self.lock:
            self.counts[key] += 1
            self.by_key.setdefault(access_key, Counter())[key] += 1

    def add_denied(self, key: str, access_key: str = "") -> None:
        with self.lock:
            self.denied.setdefault(access_key, Counter())[key] += 1

    def snapshot(self, access_key: str | None = None) -> dict[str, Any]:
        with self.lock:
            counts = dict(self.counts if access_key is None else self.by_key.get(access_key, Counter()))
            denied: Counter[str] = Counter()
            for k, c in self.denied.items():
                if access_key is None or k == access_key:
                    denied.update(c)
        mutations = sum(n for k, n in counts.items() if k.split(".", 1)[-1].startswith(MUTATING_PREFIXES))
        return {"counts": counts, "total": sum(counts.values()), "mutations": mutations, "denied": dict(denied)}

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.by_key.clear()
            self.denied.clear()


REQUESTS = Requests()
# Held around every moto request; the simulator takes it too when it reads moto's models.
BACKEND_LOCK = threading.RLock()

# Extra control endpoints other parts of the embedded default hang here (the simulator's):
# (METHOD, path) -> handler(json body) -> (http status, json payload).
CONTROL_HOOKS: dict[tuple[str, str], Any] = {}


def _json_response(start_response: Any, status: str, payload: Any) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _noting_denials(start_response: Any, key: str, access_key: str) -> Any:
    def wrapped(status: str, headers: Any, *exc_info: Any) -> Any:
        if status.startswith("403"):
            REQUESTS.add_denied(key, access_key)
        return start_response(status, headers, *exc_info)
    return wrapped


class Middleware:
    """Lock, faults, latency and request counting in front of moto's WSGI app."""

    def __init__(self, app: Any, emulator: Emulator | None = None) -> None:
        self.app = app
        self.emulator = emulator              # the server, for /_emulator/restart

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_emulator/"):
            return self._control(environ, start_response, path)
        target = environ.get("HTTP_X_AMZ_TARGET") or ""
        n = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(n) if n else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if target:
            op = target.split(".")[-1]
        else:
            try:
                op = (parse_qs(body.decode()).get("Action") or [""])[0]
            except UnicodeDecodeError:
                op = ""
            if not op:
                op = (parse_qs(environ.get("QUERY_STRING", "")).get("Action") or [""])[0]
        m = _CRED_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        access_key, service = (m.group(1), m.group(2)) if m else ("", "")
        if op:
            REQUESTS.add(f"{service}.{op}", access_key)
            delay = FAULTS.delay_for(service, op, body, access_key)
            if delay:
                time.sleep(delay)
            rule = FAULTS.match(service, op, body, access_key)
            if rule:
                return self._fault(start_response, rule, json_protocol=bool(target))
        if op:
            start_response = _noting_denials(start_response, f"{service}.{op}", access_key)
        if op == "ReceiveMessage":           # never hold the lock across an SQS long poll
            return self.app(environ, start_response)
        with BACKEND_LOCK:
            return [b"".join(self.app(environ, start_response))]

    @staticmethod
    def _fault(start_response: Any, r: dict[str, Any], json_protocol: bool) -> list[bytes]:
        code, msg = r["code"], r.get("message", r["code"])
        if json_protocol:
            payload = json.dumps({"__type": code, "message": msg}).encode()
            headers = [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-query-error", f"{code};Sender")]
        else:
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                       f"<Message>{msg}</Message></Error></Errors><RequestID>emulator-fault</RequestID></Response>"
                       ).encode()
            headers = [("Content-Type", "text/xml")]
        start_response(f"{int(r.get('status', 400))} Fault", headers + [("Content-Length", str(len(payload)))])
        return [payload]

    def _control(self, environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        n = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(n) if n else b""
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            return _json_response(start_response, "400 Bad Request", {"error": "body must be JSON"})
        if path == "/_emulator/faults" and method == "POST":
            if "op" not in data or "code" not in data:
                return _json_response(start_response, "400 Bad Request", {"error": "need op and code"})
            try:
                count = FAULTS.add_rule(data)
            except ValueError as exc:
                return _json_response(start_response, "400 Bad Request", {"error": str(exc)})
            return _json_response(start_response, "200 OK", {"rules": count})
        if path == "/_emulator/faults" and method == "DELETE":
            FAULTS.clear()
            return _json_response(start_response, "200 OK", {"cleared": True})
        if path == "/_emulator/faults" and method == "GET":
            return _json_response(start_response, "200 OK", FAULTS.snapshot())
        if path == "/_emulator/latency" and method == "POST":
            try:
                rule = {**data, "op": data.get("op", "*"), "seconds": float(data.get("seconds", 0))}
            except (TypeError, ValueError):
                return _json_response(start_response, "400 Bad Request", {"error": "seconds must be a number"})
            return _json_response(start_response, "200 OK", {"latency_rules": FAULTS.add_latency(rule)})
        if path == "/_emulator/capacity" and method == "POST":
            with FAULTS.lock:
                FAULTS.capacity.append(data)
            return _json_response(start_response, "200 OK", {"capacity_rules": len(FAULTS.capacity)})
        if path == "/_emulator/requests" and method == "GET":
            key = (parse_qs(environ.get("QUERY_STRING", "")).get("access_key") or [None])[0]
            return _json_response(start_response, "200 OK", REQUESTS.snapshot(key))
        if path == "/_emulator/requests" and method == "DELETE":
            REQUESTS.reset()
            return _json_response(start_response, "200 OK", {"reset": True})
        hook = CONTROL_HOOKS.get((method, path))
        if hook is not None:
            try:
                status, payload = hook(data)
            except Exception as exc:  # noqa: BLE001 - a control call must answer, whatever went wrong
                status, payload = 500, {"error": f"{type(exc).__name__}: {exc}"}
            return _json_response(start_response, f"{status} X", payload)
        if path == "/_emulator/restart" and method == "POST":
            if self.emulator is None:
                return _json_response(start_response, "404 Not Found", {"error": "no server to restart"})
            try:
                down_s = float(data.get("down_s", 3))
            except (TypeError, ValueError):
                return _json_response(start_response, "400 Bad Request", {"error": "down_s must be a number"})
            if not 0 <= down_s <= MAX_DOWN_S:
                return _json_response(start_response, "400 Bad Request",
                                      {"error": f"down_s must be between 0 and {MAX_DOWN_S}"})
            if not self.emulator.restart_in_background(down_s, keep=environ.get("werkzeug.socket")):
                return _json_response(start_response, "409 Conflict", {"error": "a restart is under way"})
            return _json_response(start_response, "202 Accepted", {"restarting": True, "down_s": down_s})
        if path == "/_emulator/health":
            restarts = self.emulator.restarts if self.emulator is not None else 0
            return _json_response(start_response, "200 OK", {"ok": True, "restarts": restarts})
        return _json_response(start_response, "404 Not Found", {"error": f"no control endpoint {method} {path}"})


# ---------------------------------------------------------------- CreateFleet shim

def _types_for(req: dict[str, Any], architecture: str = "x86_64") -> list[str]:
    """Instance types moto knows that satisfy InstanceRequirements and can run an AMI of
    ``architecture`` (EC2 Fleet launches only types that can boot the template's image), best first."""
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    allow = req.get("AllowedInstanceTypes") or ["*"]
    excl = req.get("ExcludedInstanceTypes") or []
    vcpu, mem = req.get("VCpuCount") or {}, req.get("MemoryMiB") or {}
    acc = req.get("AcceleratorCount")
    burst = req.get("BurstablePerformance", "excluded")
    found = []
    for name, spec in INSTANCE_TYPES.items():
        if not any(fnmatch.fnmatch(name, p) for p in allow) or any(fnmatch.fnmatch(name, p) for p in excl):
            continue
        if architecture not in (spec.get("ProcessorInfo") or {}).get("SupportedArchitectures", ["x86_64"]):
            continue
        cpus = spec["VCpuInfo"]["DefaultVCpus"]
        mib = spec["MemoryInfo"]["SizeInMiB"]
        if not (int(vcpu.get("Min", 0)) <= cpus <= int(vcpu.get("Max", 10**6))):
            continue
        if not (int(mem.get("Min", 0)) <= mib <= int(mem.get("Max", 10**9))):
            continue
        if burst == "excluded" and spec.get("BurstablePerformanceSupported"):
            continue
        if burst == "required" and not spec.get("BurstablePerformanceSupported"):
            continue
        gpus = sum(g.get("Count", 0) for g in (spec.get("GpuInfo") or {}).get("Gpus", []))
        if acc is not None and not (int(acc.get("Min", 0)) <= gpus <= int(acc.get("Max", 10**6))):
            continue
        if acc is None and gpus:
            continue
        found.append((not spec.get("CurrentGeneration", True), cpus, mib, name))
    return [n for *_, n in sorted(found)]


def _template_architecture(backend: Any, spec: dict[str, Any]) -> str:
    """The architecture of the image a fleet's launch template (its default version) names; x86_64 when
    the image is not one moto knows (AMI validation is off, so any id launches)."""
    try:
        if spec.get("LaunchTemplateId"):
            template = backend.get_launch_template(spec["LaunchTemplateId"])
        else:
            template = backend.get_launch_template_by_name(spec.get("LaunchTemplateName", ""))
        lt_version = template.get_version(str(spec.get("Version") or "$Default"))
        image = backend.amis.get(lt_version.image_id)
    except Exception:                                # noqa: BLE001 - moto raises its own types; unknown = default
        return "x86_64"
    return str(getattr(image, "architecture", None) or "x86_64")


def _capacity_for(instance_type: str, subnet: str | None, lifecycle: str) -> float:
    """How many instances a (type, subnet, lifecycle) can supply under the capacity rules."""
    cap = float("inf")
    with FAULTS.lock:
        for rule in FAULTS.capacity:
            if rule.get("count") is not None and rule["count"] <= 0:
                continue
            if rule.get("instance_types") and not any(fnmatch.fnmatch(instance_type, p) for p in rule["instance_types"]):
                continue
            if rule.get("subnets") and subnet not in rule["subnets"]:
                continue
            if rule.get("lifecycle") and rule["lifecycle"] != lifecycle:
                continue
            cap = min(cap, float(rule.get("available", 0)))
    return cap


def _consume_capacity_rules() -> None:
    with FAULTS.lock:
        for rule in FAULTS.capacity:
            if rule.get("count") is not None and rule["count"] > 0:
                rule["count"] -= 1


def _fleet_error(spec: dict[str, Any], overrides: dict[str, Any], lifecycle: str, code: str,
                 message: str) -> dict[str, Any]:
    """One entry of CreateFleet's ``Errors``: the override that could not launch (all or some of) its share."""
    return {"LaunchTemplateAndOverrides": {"LaunchTemplateSpecification": spec, "Overrides": overrides},
            "Lifecycle": lifecycle, "ErrorCode": code, "ErrorMessage": message}


_tls = threading.local()
_FLEET_TOKENS: dict[tuple[str, str, str], Any] = {}     # (account, region, ClientToken) -> first result


def install_fleet_shim() -> None:
    from moto.ec2.models import fleets as fm
    from moto.ec2.responses import fleets as fr

    if getattr(fm.FleetsBackend.create_fleet, "_runner_pool_shim", False):
        return
    original_create = fm.FleetsBackend.create_fleet
    original_response = fr.Fleets.create_fleet

    def create_fleet(self: Any, on_demand_options: Any, spot_options: Any, target_capacity_specification: Any,
                     launch_template_configs: Any, *args: Any, **kwargs: Any) -> Any:
        tcs = dict(target_capacity_specification or {})
        lifecycle = tcs.get("DefaultTargetCapacityType") or "on-demand"
        need = int(tcs.get("TotalTargetCapacity", 0))
        if spot_options and "AllocationStrategy" not in spot_options:
            spot_options = {**spot_options, "AllocationStrategy": "lowest-price"}
        configs = [dict(c) for c in (launch_template_configs or [])]
        plan: list[tuple[int, int]] = []          # (launch spec index, count)
        errors: list[dict[str, Any]] = []
        index = 0
        for cfg in configs:
            overrides = [dict(o) for o in (cfg.get("Overrides") or [{}])]
            for o in overrides:
                chosen, why = None, "UnfulfillableCapacity"
                req = o.get("InstanceRequirements")
                arch = _template_architecture(self, cfg.get("LaunchTemplateSpecification") or {})
                candidates = _types_for(req, arch) if req else ([o["InstanceType"]] if "InstanceType" in o else [])
                cap = 0.0
                for t in candidates:
                    c = _capacity_for(t, o.get("SubnetId"), lifecycle)
                    if c > 0:
                        chosen, cap = t, c
                        break
                    why = "InsufficientInstanceCapacity"
                o["InstanceType"] = chosen or (candidates[0] if candidates else "m5.large")
                spec = cfg.get("LaunchTemplateSpecification", {})
                if need > 0:
                    if chosen is None:
                        errors.append(_fleet_error(
                            spec, {k: v for k, v in o.items() if k != "InstanceType"} if req else o, lifecycle, why,
                            "There is no capacity for the requested instance requirements in this subnet "
                            "(emulator fault)." if why == "InsufficientInstanceCapacity"
                            else "No instance type matches the instance requirements."))
                    else:
                        take = int(min(need, cap))
                        plan.append((index, take))
                        need -= take
                        if need > 0:
                            # The pool ran out part-way: EC2 lists the instances it could not launch there
                            # as an error of that override, and goes on to the next one.
                            errors.append(_fleet_error(
                                spec, dict(o), lifecycle, "InsufficientInstanceCapacity",
                                f"There is not enough {chosen} capacity in this subnet for {need} more "
                                "instance(s) (emulator fault)."))
                index += 1
            cfg["Overrides"] = overrides
        _consume_capacity_rules()
        empty = {**tcs, "TotalTargetCapacity": 0, "OnDemandTargetCapacity": 0, "SpotTargetCapacity": 0}
        fleet = original_create(self, on_demand_options, spot_options, empty, configs, *args, **kwargs)
        specs = list(fleet.launch_specs)
        for spec_index, count in plan:
            if count <= 0:
                continue
            fleet.launch_specs = [specs[spec_index]]
            if lifecycle == "spot":
                fleet.create_spot_requests(count)
            else:
                fleet.create_on_demand_requests(count)
        fleet.launch_specs = specs
        fleet.target_capacity = int(tcs.get("TotalTargetCapacity", 0))
        _tls.errors = errors
        return fleet

    def create_fleet_response(self: Any) -> Any:
        # Idempotency (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html):
        # a ClientToken already used answers with the first call's result. The middleware holds
        # BACKEND_LOCK around the request, so the check and the launch are one step.
        token = self._get_param("ClientToken")
        key = (self.current_account, self.region, token)
        if token and key in _FLEET_TOKENS:
            return _FLEET_TOKENS[key]
        _tls.errors = []
        result = original_response(self)
        if getattr(_tls, "errors", None):
            result.result["Errors"] = _tls.errors
        # EC2 groups instances of one type/override/lifecycle into one entry; moto lists one per
        # instance. Both shapes are valid to a client that flattens, which ours does.
        if token:
            _FLEET_TOKENS[key] = result
        return result

    create_fleet._runner_pool_shim = True
    fm.FleetsBackend.create_fleet = create_fleet
    fr.Fleets.create_fleet = create_fleet_response


def install_comparison_fix() -> None:
    """``<``, ``<=``, ``>``, ``>=`` over values of different types are false, as in DynamoDB."""
    from moto.dynamodb import comparisons

    for name in ("OpLessThan", "OpLessThanOrEqual", "OpGreaterThan", "OpGreaterThanOrEqual"):
        op = getattr(comparisons, name)
        if getattr(op.expr, "runner_pool_fixed", False):
            continue
        stock = op.expr

        def expr(self: Any, item: Any, _stock: Any = stock) -> bool:
            try:
                return bool(_stock(self, item))
            except TypeError:
                return False

        expr.runner_pool_fixed = True
        op.expr = expr


class _TablesCopiedOnce:
    """Stands in for the ``copy`` module inside moto's transact_write_items for one call: a table
    asked for twice is deep-copied once (every other use goes to :mod:`copy`)."""

    def __init__(self) -> None:
        self.copies: dict[int, Any] = {}

    def deepcopy(self, obj: Any, memo: Any = None) -> Any:
        import copy

        from moto.dynamodb.models.table import Table

        if not isinstance(obj, Table):
            return copy.deepcopy(obj, memo)
        if id(obj) not in self.copies:
            self.copies[id(obj)] = copy.deepcopy(obj)
        return self.copies[id(obj)]

    def __getattr__(self, name: str) -> Any:
        import copy

        return getattr(copy, name)


def install_transaction_fix() -> None:
    """TransactWriteItems backs up each table it touches once, not once per action (module docstring, 4)."""
    import copy

    from moto.dynamodb import models

    stock = models.DynamoDBBackend.transact_write_items
    if getattr(stock, "runner_pool_fixed", False):
        return

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        with BACKEND_LOCK:                        # held by the request already; the swap is never seen by another
            models.copy = _TablesCopiedOnce()     # type: ignore[assignment]
            try:
                stock(self, transact_items)
            finally:
                models.copy = copy

    transact_write_items.runner_pool_fixed = True
    models.DynamoDBBackend.transact_write_items = transact_write_items


# ---------------------------------------------------------------- IAM enforcement

_EC2_RESOURCE_PREFIXES = {"i-": "instance", "lt-": "launch-template", "fleet-": "fleet", "vol-": "volume",
                          "subnet-": "subnet", "sg-": "security-group", "eni-": "network-interface"}


def _ec2_arn(region: str, account: str, resource_id: str) -> str:
    for prefix, kind in _EC2_RESOURCE_PREFIXES.items():
        if resource_id.startswith(prefix):
            return f"arn:aws:ec2:{region}:{account}:{kind}/{resource_id}"
    return "*"


def _launch_template_id(handler: Any) -> str | None:
    """The id of the template a launch-template request names (by id or by name), if it exists."""
    from moto.ec2.models import ec2_backends

    lt_id = handler._get_param("LaunchTemplateId")
    if lt_id:
        return str(lt_id)
    name = handler._get_param("LaunchTemplateName")
    if not name:
        return None
    try:
        return str(ec2_backends[handler.current_account][handler.region].get_launch_template_by_name(name).id)
    except Exception:  # noqa: BLE001 - an unknown name: the request itself will say so
        return None


def request_resource(service: str, handler: Any) -> str:
    """The ARN moto should authorize a request against ("*" where AWS has no resource-level permission).

    One resource per request, as moto evaluates one: the table (or index), the
    parameter, the queue, the instance being terminated, the launch template
    being changed; for creations a new ARN of the kind being created
    (``fleet/new``, ``launch-template/new``).
    """
    region, account = handler.region, handler.current_account
    if service == "dynamodb":
        body = getattr(handler, "body", None) or {}
        table = (body.get("TableName") or next(iter(body.get("RequestItems") or {}), None)
                 or _transaction_table(body))
        if not table:
            return "*"
        arn = f"arn:aws:dynamodb:{region}:{account}:table/{table}"
        return f"{arn}/index/{body['IndexName']}" if body.get("IndexName") else arn
    if service == "ssm":
        name = handler._get_param("Name")
        return f"arn:aws:ssm:{region}:{account}:parameter/{str(name).lstrip('/')}" if name else "*"
    if service == "sqs":
        name = handler._get_param("QueueName")
        return f"arn:aws:sqs:{region}:{account}:{name}" if name else "*"
    if service == "ec2":
        action = handler._get_action()
        if action == "TerminateInstances":
            ids = handler._get_param("InstanceIds") or []
            return _ec2_arn(region, account, ids[0]) if ids else "*"
        if action == "CreateFleet":
            return f"arn:aws:ec2:{region}:{account}:fleet/new"
        if action == "CreateLaunchTemplate":
            return f"arn:aws:ec2:{region}:{account}:launch-template/new"
        if "LaunchTemplate" in action and not action.startswith("Describe"):
            lt = _launch_template_id(handler)
            return f"arn:aws:ec2:{region}:{account}:launch-template/{lt}" if lt else "*"
        if action in ("CreateTags", "DeleteTags"):            # the first resource (cost tags: instances)
            ids = handler._get_param("Resources") or []
            return _ec2_arn(region, account, ids[0]) if ids else "*"
        return "*"
    return "*"


TRANSACTION_ACTIONS = {"Update": "UpdateItem", "Put": "PutItem", "Delete": "DeleteItem",
                       "ConditionCheck": "ConditionCheckItem"}


def _transaction_actions(body: dict[str, Any]) -> set[str]:
    return {TRANSACTION_ACTIONS.get(kind, kind) for item in body.get("TransactItems") or [] for kind in item}


def _transaction_table(body: dict[str, Any]) -> str | None:
    """The one table a TransactWriteItems writes (None if it names several: moto checks one resource)."""
    tables = {a.get("TableName") for item in body.get("TransactItems") or [] for a in item.values()}
    return tables.pop() if len(tables) == 1 else None


def iam_action(action: str, body: bytes | str | None) -> str:
    """The IAM action moto should check for a request: a batch call's single call (:data:`IAM_ACTION_OF`);
    a DynamoDB transaction's one kind of action (AWS authorizes each action of a transaction as its
    single call: https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis-iam.html).
    A transaction mixing kinds keeps its own name, which no policy grants: moto evaluates one action
    per request, so it is refused rather than half-checked."""
    if action == "dynamodb:TransactWriteItems":
        try:
            kinds = _transaction_actions(json.loads(body or b"{}"))
        except (ValueError, AttributeError):
            return action
        return f"dynamodb:{kinds.pop()}" if len(kinds) == 1 else action
    return IAM_ACTION_OF.get(action, action)


# Operations IAM authorizes under another action's name: SQS's batch calls need the single call's
# permission (there is no sqs:SendMessageBatch action;
# https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-api-permissions-reference.html),
# where moto checks the operation name.
IAM_ACTION_OF = {"sqs:SendMessageBatch": "sqs:SendMessage", "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
                 "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility"}


def enforce_iam() -> None:
    """From the next request on, moto checks signatures and the signer's policies, resources included."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.dynamodb.responses import DynamoHandler
    from moto.ec2.responses import EC2Response
    from moto.iam.access_control import IAMRequestBase
    from moto.sqs.responses import SQSResponse
    from moto.ssm.responses import SimpleSystemManagerResponse

    DynamoHandler._determine_resource = lambda self: request_resource("dynamodb", self)
    SimpleSystemManagerResponse._determine_resource = lambda self: request_resource("ssm", self)
    EC2Response._determine_resource = lambda self: request_resource("ec2", self)
    stock_sqs = SQSResponse._determine_resource

    def sqs_resource(self: Any) -> str:
        # moto knows a queue's ARN once it exists; CreateQueue (and a lookup of a missing queue) names one.
        found = stock_sqs(self)
        return found if found != "*" else request_resource("sqs", self)

    SQSResponse._determine_resource = sqs_resource
    stock_init = IAMRequestBase.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        self._action = iam_action(self._action, self._body)

    IAMRequestBase.__init__ = init
    with BACKEND_LOCK:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0


# ---------------------------------------------------------------- server

def _tracking_server(host: str, port: int, app: Any) -> Any:
    """A threaded werkzeug server that knows its open connections, so a restart can drop them.

    Werkzeug's threaded server speaks HTTP/1.1 with keep-alive, and a handler
    thread keeps serving its connection after ``shutdown()``: without
    dropping them, a "restarted" server would still answer every client that
    had a pooled connection.
    """
    from werkzeug.serving import ThreadedWSGIServer

    class Server(ThreadedWSGIServer):
        def __init__(self) -> None:
            super().__init__(host, port, app)
            self.open_lock = threading.Lock()
            self.open: set[socket.socket] = set()

        def process_request(self, request: Any, client_address: Any) -> None:
            with self.open_lock:
                self.open.add(request)
            super().process_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            with self.open_lock:
                self.open.discard(request)
            super().shutdown_request(request)

        def drop_connections(self, keep: Any = None) -> int:
            with self.open_lock:
                doomed = [c for c in self.open if c is not keep]
            for conn in doomed:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return len(doomed)

    return Server()


class Emulator:
    """moto's server with the fixes above, on 127.0.0.1 in a thread of this process."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.restarts = 0
        self._app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._restarting = threading.Lock()

    def start(self) -> Emulator:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        install_fleet_shim()
        install_comparison_fix()
        install_transaction_fix()
        self._app = Middleware(DomainDispatcherApplication(create_backend_app), emulator=self)
        self._serve()
        return self

    def _serve(self) -> None:
        deadline = time.monotonic() + REBIND_TIMEOUT_S
        while True:
            try:
                self._server = _tracking_server("127.0.0.1", self.port, self._app)
                break
            except OSError:
                if self.port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="aws-emulator", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart(self, down_s: float, keep: Any = None) -> None:
        """Stop serving, drop connections (but ``keep``), refuse connections ``down_s``, serve again.

        The WSGI app and moto's backends are untouched: the state survives.
        """
        server = self._server
        if server is None:
            return
        server.shutdown()
        server.server_close()                 # the listening socket is gone: connections are refused
        dropped = server.drop_connections(keep)
        self._server = None
        logging.getLogger("runner_pool.emulator").warning(
            "emulator down for %.1f s (%d connection(s) dropped)", down_s, dropped)
        time.sleep(down_s)
        self._serve()
        self.restarts += 1

    def restart_in_background(self, down_s: float, keep: Any = None) -> bool:
        """Start :meth:`restart` in a thread; False if a restart is already under way."""
        if not self._restarting.acquire(blocking=False):
            return False

        def run() -> None:
            try:
                self.restart(down_s, keep)
            finally:
                self._restarting.release()

        threading.Thread(target=run, name="aws-emulator-restart", daemon=True).start()
        return True

    def stop(self) -> None:
        with self._restarting:                # never stop half-way through a restart
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlplane.local.emulator")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    emu = Emulator(args.port).start()
    print(json.dumps({"url": emu.url}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
