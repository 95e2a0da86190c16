"""Run the real ``pulumi`` CLI on this project through the Automation API's inline-program path.

    python -m tests.engine.inline up --yes --stack pool-a        # any pulumi command line

The Python language host (``pulumi-language-python``) is a Go module the Go
module proxy does not serve, so the CLI built by ``.ci/build-pulumi`` has
none. This does what ``pulumi.automation`` does for an inline program: it
serves the program (``__main__.py`` of the current directory, run with
``runpy`` as ``__main__`` exactly like ``pulumi-language-python-exec`` does)
with the SDK's ``LanguageServer`` on 127.0.0.1, and starts the CLI with
``--client=127.0.0.1:<port> --exec-kind auto.inline``. Everything else is
the real engine: the project file, the stack's config and its schema check,
the backend, locks, the provider host (``pulumi-resource-pulumi-python``
next to ``pulumi``), step ordering, outputs.

Commands that do not run the program (``stack``, ``config``, ``cancel``,
``destroy``, ``refresh``, ...) are passed to the CLI unchanged.

SIGINT and SIGTERM are forwarded to the CLI, so a signal sent to this
process reaches ``pulumi`` as if the step had ``exec``ed it; the exit code is
the CLI's (``128 + n`` when a signal ``n`` ended it).
"""
from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

_STARTED = time.time()

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / ".ci" / "build-pulumi"
BUILD_HINT = "bash .ci/build-pulumi"
RUNS_PROGRAM = ("up", "update", "preview")


def mark(name: str, at: float | None = None) -> None:
    """With ``$RUNNER_POOL_INLINE_TIMING`` set (bench/pulumi_engine.py), append ``{mark, t}`` to that file."""
    path = os.environ.get("RUNNER_POOL_INLINE_TIMING")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"mark": name, "t": time.time() if at is None else at}) + "\n")


def cli_version() -> str:
    """The CLI version ``.ci/build-pulumi`` builds (its default)."""
    m = re.search(r'PULUMI_CLI_VERSION="\$\{PULUMI_CLI_VERSION:-([0-9.]+)\}"', BUILD_SCRIPT.read_text())
    assert m, f"no PULUMI_CLI_VERSION default in {BUILD_SCRIPT}"
    return m.group(1)


def cache_bin() -> Path:
    root = os.environ.get("RUNNER_POOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "runner-pool")
    return Path(root) / f"pulumi-{cli_version()}" / "bin"


def find_tool(name: str) -> str | None:
    """``name`` from ``$RUNNER_POOL_PULUMI_BIN``, else the build cache, else PATH."""
    pinned = os.environ.get("RUNNER_POOL_PULUMI_BIN")
    if pinned:
        return str(Path(pinned) / name) if (Path(pinned) / name).is_file() else None
    cached = cache_bin() / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which(name)


def find_pulumi() -> str | None:
    """A ``pulumi`` with ``pulumi-resource-pulumi-python`` beside it (the engine looks there first)."""
    path = find_tool("pulumi")
    if path is None:
        return None
    beside = Path(path).parent / "pulumi-resource-pulumi-python"
    return path if beside.exists() or shutil.which("pulumi-resource-pulumi-python") else None


def serve_program(program_file: Path) -> tuple[object, int]:
    """The SDK's inline ``LanguageServer`` running ``program_file``; returns (server, port)."""
    import grpc
    from pulumi.automation._server import LanguageServer
    from pulumi.runtime.proto import language_pb2_grpc

    def program() -> None:
        mark("program_start")
        runpy.run_path(str(program_file), run_name="__main__")
        mark("program_end")

    class TimedLanguageServer(LanguageServer):
        def Run(self, request: Any, context: Any) -> Any:
            try:
                return super().Run(request, context)
            finally:
                mark("run_end")          # every registration resolved: the engine has its steps' results

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 400 * 1024 * 1024)])
    language_pb2_grpc.add_LanguageRuntimeServicer_to_server(TimedLanguageServer(program), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main(argv: list[str]) -> int:
    pulumi = find_pulumi()
    if pulumi is None:
        print(f"error: pulumi: not found in {cache_bin()} or on PATH (build it: {BUILD_HINT})", file=sys.stderr)
        return 2
    cmd = [pulumi, *argv]
    server = None
    if argv and argv[0] in RUNS_PROGRAM:
        sys.path.insert(0, os.getcwd())             # as the language host: the project dir is importable
        server, port = serve_program(Path.cwd() / "__main__.py")
        cmd += [f"--client=127.0.0.1:{port}", "--exec-kind", "auto.inline"]
    mark("wrapper_start", _STARTED)
    mark("cli_spawn")
    proc = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
        mark("cli_exit")
    finally:
        if server is not None:
            server.stop(0)          # type: ignore[attr-defined]
    sys.stdout.flush()
    sys.stderr.flush()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))     # no interpreter teardown: the program's threads may still be parked
