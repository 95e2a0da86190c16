"""Benchmark: how long a command takes from process start to its first AWS call.

Everything a command does before it talks to AWS is start-up: the
interpreter, imports, building a client. This script measures only that, so
the figure does not depend on how busy an emulator is: it points
``AWS_ENDPOINT_URL`` at a local socket that accepts connections and closes
them, runs the command with the same audit hook as
``bench/command_latency.py`` (the first ``socket.connect`` to that port is
the first AWS call), and stops the command once the connection came (or
after ``--timeout``). ``--help`` is timed to exit as well.

    PYTHONPATH=. python bench/command_start.py [--repeats 10] [--tree NAME=PATH ...] [--out command_start]

Each ``--tree`` is a checkout whose code the commands run (``PYTHONPATH``);
the trees take turns, sample by sample, so a busy machine slows them alike
and their ratio holds. Without ``--tree`` it measures the code it is run with.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from command_latency import WRAPPER

COMMANDS = {
    "provision": ["provision", "--pool", "demo", "--region", "us-east-1", "--run-id", "run-1",
                  "--resource-class", "small", "--count", "10"],
    "release": ["release", "--pool", "demo", "--region", "us-east-1", "--run-id", "run-1"],
    "status": ["status", "--pool", "demo", "--region", "us-east-1"],
    "reconcile": ["reconcile", "--pool", "demo", "--region", "us-east-1", "--dry-run"],
}


def sink() -> tuple[socket.socket, int]:
    """A listening socket that accepts and closes every connection (the 'AWS endpoint')."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def first_call_s(args: list[str], port: int, timeout_s: float, tree: str | None) -> float | None:
    env = {**os.environ, **({"PYTHONPATH": tree} if tree else {}), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIDSTART",
           "AWS_SECRET_ACCESS_KEY": "x", "RUNNER_POOL_GITHUB_TOKEN": "x", "AWS_MAX_ATTEMPTS": "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    found = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith("@@connect ") and int(line.split()[1]) == port:
            found = float(line.split()[2]) - t0
            break
    proc.kill()
    proc.wait()
    return found


def help_s(tree: str | None) -> float:
    env = {**os.environ, **({"PYTHONPATH": tree} if tree else {})}
    t0 = time.time()
    subprocess.run([sys.executable, "-c", WRAPPER, "--help"], capture_output=True, check=True, env=env)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--out", default="command_start")
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of a checkout to measure (repeatable)")
    args = ap.parse_args(argv)
    trees: list[tuple[str, str | None]] = [(t.split("=", 1)[0], t.split("=", 1)[1]) for t in args.tree] or [
        ("this", None)]
    srv, port = sink()
    samples: dict[str, dict[str, list[float]]] = {n: {c: [] for c in [*COMMANDS, "--help"]} for n, _ in trees}
    load = [os.getloadavg()[0]]
    try:
        for i in range(args.repeats):
            for name, cmd in COMMANDS.items():
                for tree, path in trees:
                    got = first_call_s(cmd, port, args.timeout, path)
                    if got is not None:
                        samples[tree][name].append(got)
            for tree, path in trees:
                samples[tree]["--help"].append(help_s(path))
            load.append(os.getloadavg()[0])
            print(f"  round {i + 1}/{args.repeats}: " + ", ".join(
                f"{t} provision {samples[t]['provision'][-1]:.3f} s" for t, _ in trees if samples[t]["provision"]),
                file=sys.stderr)
    finally:
        srv.close()
    result = {t: {c: h.summary(v) for c, v in per.items()} for t, per in samples.items()}
    path = h.write_result(args.out, {"repeats": args.repeats, "trees": dict(trees), "load_1min": load,
                                     "result": result})
    rows = [[t, c, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{v['p95']:.3f}"]
            for t, per in result.items() for c, v in per.items()]
    print(h.table(["tree", "command", "to first AWS call (--help: to exit), median s", "min s", "p95 s"], rows))
    print(f"\nresults: {path.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
