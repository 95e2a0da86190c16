"""Drive ``python -m pulumi.dynamic`` over gRPC the way the Pulumi engine does.

What ``pulumi up`` does to a dynamic resource, without the CLI
(``notes/pulumi.md`` §3b):

* the program serializes the provider exactly as ``dynamic.Resource.__init__``
  does (:func:`serialize`) and sends it as the ``__provider`` input;
* the engine starts the provider host (``python -u -m pulumi.dynamic``) in the
  project directory, reads its port from the first stdout line, calls
  ``Configure`` with the stack config, then ``Check``/``Create``/``Diff``/
  ``Update``/``Read``/``Delete``;
* every property crosses the wire as a protobuf ``Struct``, so numbers come
  back as floats, and ``Diff``/``Update``/``Delete`` get the previous
  *outputs* -- here the very ``Struct`` the host returned.

:class:`ProviderHost` is that host; :class:`Dyn` is one resource's view of it.
Errors come back as :class:`ProviderCallError` carrying the gRPC details (the
provider's traceback and message).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import struct_pb2
from pulumi.dynamic.dynamic import ResourceProvider, serialize_provider
from pulumi.runtime import rpc
from pulumi.runtime._serialization import _serialize
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "runner-pool"
STACK = "engine-test"
START_TIMEOUT_S = 30
CALL_TIMEOUT_S = 240.0          # a RunnerFleet create waits for validation (bounded by the pool's timeouts)


class ProviderCallError(Exception):
    """A provider call failed; ``details`` is what the engine would print."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} failed ({code.name}): {details}")
        self.method = method
        self.code = code
        self.details = details


def serialize(provider: ResourceProvider) -> str:
    """The ``__provider`` string, exactly as ``pulumi.dynamic.Resource.__init__`` makes it."""
    value, _contains_secrets = _serialize(True, serialize_provider, provider)
    return str(value)


def to_struct(props: dict[str, Any]) -> struct_pb2.Struct:
    # A private loop, as the provider host does: asyncio.run() would leave the thread without
    # a current loop, which the pulumi runtime (e.g. set_mocks in another test) expects.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(rpc.serialize_properties(props, {}))
    finally:
        loop.close()


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return dict(rpc.deserialize_properties(struct))


@dataclass
class Check:
    inputs: struct_pb2.Struct
    failures: list[tuple[str, str]]

    @property
    def props(self) -> dict[str, Any]:
        return from_struct(self.inputs)


@dataclass
class Diff:
    changes: bool | None
    replaces: list[str]
    delete_before_replace: bool


@dataclass
class State:
    """What the engine keeps after Create/Update/Read: id, outputs ``Struct``, inputs ``Struct``."""

    id: str
    properties: struct_pb2.Struct
    inputs: struct_pb2.Struct
    outs: dict[str, Any] = field(default_factory=dict)


class ProviderHost:
    """One ``python -m pulumi.dynamic`` process, as the engine starts it (cwd: the project root)."""

    def __init__(self, stderr_path: Path, config: dict[str, Any] | None = None, cwd: Path = ROOT) -> None:
        env = {**os.environ, "PULUMI_PROJECT": PROJECT, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)          # the engine gives none: imports must work from the cwd alone
        self.stderr_path = stderr_path
        self._stderr: IO[bytes] = open(stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "pulumi.dynamic"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()            # blocks until the host prints its port (or dies)
        if not line.strip():
            self.close()
            raise RuntimeError(f"provider host did not start: {self.stderr()}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{int(line)}")
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT_S)
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)
        self.configure(config or {f"{PROJECT}:kind": "pool"})

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise ProviderCallError(method, exc.code(), exc.details() or "") from None

    def configure(self, config: dict[str, Any]) -> provider_pb2.ConfigureResponse:
        resp: provider_pb2.ConfigureResponse = self._call(
            "Configure", provider_pb2.ConfigureRequest(args=to_struct(config)))
        return resp

    def close(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()                      # the host waits forever otherwise
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


class Dyn:
    """One dynamic resource (type token + name + serialized provider) on a host."""

    def __init__(self, host: ProviderHost, provider: ResourceProvider, type_name: str, name: str) -> None:
        self.host = host
        self.provider = serialize(provider)
        self.urn = f"urn:pulumi:{STACK}::{PROJECT}::pulumi-python:dynamic/runnerpool:{type_name}::{name}"

    def _props(self, inputs: dict[str, Any]) -> struct_pb2.Struct:
        return to_struct({**inputs, "__provider": self.provider})

    def check(self, news: dict[str, Any], olds: State | None = None) -> Check:
        resp = self.host._call("Check", provider_pb2.CheckRequest(
            urn=self.urn, olds=olds.inputs if olds else to_struct({}), news=self._props(news)))
        return Check(resp.inputs, [(f.property, f.reason) for f in resp.failures])

    def checked(self, news: dict[str, Any], olds: State | None = None) -> struct_pb2.Struct:
        """Check, asserting no failures; returns the inputs the engine would pass on."""
        chk = self.check(news, olds)
        assert not chk.failures, chk.failures
        return chk.inputs

    def create(self, news: dict[str, Any]) -> State:
        inputs = self.checked(news)
        resp = self.host._call("Create", provider_pb2.CreateRequest(urn=self.urn, properties=inputs))
        return State(resp.id, resp.properties, inputs, from_struct(resp.properties))

    def diff(self, old: State, news: dict[str, Any]) -> Diff:
        resp = self.host._call("Diff", provider_pb2.DiffRequest(
            id=old.id, urn=self.urn, olds=old.properties, news=self._props(news), old_inputs=old.inputs))
        changes = {provider_pb2.DiffResponse.DIFF_SOME: True, provider_pb2.DiffResponse.DIFF_NONE: False}.get(
            resp.changes)
        return Diff(changes, list(resp.replaces), bool(resp.deleteBeforeReplace))

    def update(self, old: State, news: dict[str, Any]) -> State:
        inputs = self.checked(news, old)
        resp = self.host._call("Update", provider_pb2.UpdateRequest(
            id=old.id, urn=self.urn, olds=old.properties, news=inputs, old_inputs=old.inputs))
        return State(old.id, resp.properties, inputs, from_struct(resp.properties))

    def read(self, old: State) -> State:
        resp = self.host._call("Read", provider_pb2.ReadRequest(
            id=old.id, urn=self.urn, properties=old.properties, inputs=old.inputs))
        return State(resp.id, resp.properties, old.inputs, from_struct(resp.properties))

    def delete(self, old: State) -> None:
        self.host._call("Delete", provider_pb2.DeleteRequest(
            id=old.id, urn=self.urn, properties=old.properties, old_inputs=old.inputs))
