"""The rootfs kind of simulated instance: a Debian bookworm root with namespaces of its own.

The process kind (``simulator.py``) runs the user data as a host process. The
rootfs kind boots the same user data in something much closer to an EC2
instance:

* **A real root.** :func:`build_root` makes one Debian bookworm root with
  ``debootstrap --variant=minbase`` from Debian's registry, once, cached
  outside the clone under a key of everything that went into it
  (``~/.cache/runner-pool/rootfs-<key>``). Python and boto3 are *not*
  installed in it: the bootstrap installs them with ``apt-get`` as it does on
  EC2. What it needs (python3, python3-boto3, iptables, sudo and their
  dependencies) waits as ``.deb`` files in a local apt repository inside the
  root (``file:/var/local/rp-debs``, the only apt source), so ``apt-get update
  && apt-get install`` works offline and fast, and the user data runs exactly
  as the launch template carries it.
* **A writable layer per instance** (overlayfs over the shared read-only
  root): instances never share state; stop keeps the layer, terminate removes
  it.
* **Namespaces per instance.** Each instance is ``unshare --mount --pid
  --fork`` inside a network namespace of its own (``ip netns``), chrooted into
  its layer, with ``/proc`` of its own PID namespace. Its only link is a veth
  pair to the simulator's *hub* namespace (also ours); addresses are
  link-local /30 pairs (``169.254.A.B``). The hub holds ``169.254.169.254`` on
  its loopback, where the IMDS stand-in answers and knows the instance by its
  source address (as EC2 does), and two relays that forward the instance's
  AWS and GitHub connections to the emulator and the GitHub stand-in on the
  host's 127.0.0.1. The hub forwards nothing (``ip_forward=0``, FORWARD
  DROP), so an instance reaches no other instance, and no host address or
  port but those three services.
* **An init like cloud-init's.** :data:`INIT_SH` is PID 1 of the instance: on
  first boot it runs the user data once as root (cloud-init's
  ``scripts-user``); on every boot it runs the scripts the bootstrap put in
  ``/var/lib/cloud/scripts/per-boot/`` (cloud-init's ``scripts-per-boot``,
  the same directory on EC2). ``shutdown``/``poweroff``/``halt`` inside the
  root end PID 1, which the simulator reads as a power-off.

Everything here needs root and a kernel that allows network namespaces and
overlayfs; :func:`available` says whether this machine does, and why not.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SUITE = "bookworm"
MIRROR = os.environ.get("RUNNER_POOL_ROOTFS_MIRROR", "http://deb.debian.org/debian")
# In the root from the start: what a Debian cloud image already has that the bootstrap uses.
BASE_PACKAGES = ("ca-certificates", "curl", "procps")
# In the local apt repository only: what the bootstrap installs on first boot.
CACHED_PACKAGES = ("python3", "python3-boto3", "iptables", "sudo")
RECIPE = 1                               # bump when build_root changes what it makes
DEB_DIR = "/var/local/rp-debs"
RUNNER_MOUNT = "/opt/rp-sim/actions-runner"     # where the actions-runner stand-in appears in an instance
BUILD_TIMEOUT_S = 1800
CMD_TIMEOUT_S = 30
CLONE_NEWNET = 0x40000000


class RootfsError(Exception):
    """The rootfs kind cannot run here, or one of its steps failed."""


# -- the root -------------------------------------------------------------------------------


def root_key() -> str:
    """A short hash of everything that goes into the root."""
    recipe = {"suite": SUITE, "mirror": MIRROR, "base": BASE_PACKAGES, "cached": CACHED_PACKAGES,
              "recipe": RECIPE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("RUNNER_POOL_ROOTFS_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "runner-pool"


def root_path() -> Path:
    return cache_dir() / f"rootfs-{root_key()}"


def _run(argv: list[str], timeout_s: float = CMD_TIMEOUT_S, check: bool = True,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False, **kw)
    except subprocess.TimeoutExpired as exc:
        if check:
            raise RootfsError(f"{' '.join(argv[:6])} did not finish within {timeout_s:.0f} s") from exc
        return subprocess.CompletedProcess(argv, -9, "", f"timed out after {timeout_s:.0f} s")
    if check and proc.returncode != 0:
        raise RootfsError(f"{' '.join(argv[:6])} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    return proc


def build_root(progress: Any = print) -> tuple[Path, bool]:
    """The cached root (building it first if needed): (path, built_now)."""
    final = root_path()
    if (final / ".rp-complete").exists():
        return final, False
    if os.geteuid() != 0:
        raise RootfsError("building the root needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed (apt-get install debootstrap)")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.build-", dir=final.parent))
    work.chmod(0o755)                        # it becomes "/": every user must be able to traverse it
    try:
        started = time.monotonic()
        progress(f"debootstrap {SUITE} (minbase + {', '.join(BASE_PACKAGES)}) into {work}")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(work), MIRROR],
             timeout_s=BUILD_TIMEOUT_S)
        progress(f"debootstrap done in {time.monotonic() - started:.0f} s; downloading the package cache")
        shutil.copy("/etc/resolv.conf", work / "etc/resolv.conf")
        chroot = ["chroot", str(work)]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        _run(chroot + ["apt-get", "update", "-q"], timeout_s=BUILD_TIMEOUT_S, env=env)
        _run(chroot + ["apt-get", "install", "-y", "-q", "--download-only", *CACHED_PACKAGES],
             timeout_s=BUILD_TIMEOUT_S, env=env)
        debs = work / DEB_DIR.lstrip("/")
        debs.mkdir(parents=True)
        for deb in (work / "var/cache/apt/archives").glob("*.deb"):
            shutil.move(str(deb), debs / deb.name)
        index = _run(["dpkg-scanpackages", "--multiversion", "."], timeout_s=120, cwd=debs).stdout
        (debs / "Packages").write_text(index)
        _finish_root(work)
        (work / ".rp-complete").write_text(json.dumps({"key": root_key(), "built_s": time.monotonic() - started,
                                                       "debs": sorted(p.name for p in debs.glob("*.deb"))}))
        if final.exists():                   # a half-made root from a build that was killed
            shutil.rmtree(final)
        os.replace(work, final)
        progress(f"root ready at {final} in {time.monotonic() - started:.0f} s")
        return final, True
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _finish_root(root: Path) -> None:
    """Offline apt, no leftover lists or archives."""
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{DEB_DIR} ./\n")
    for extra in (root / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/hostname").write_text("localhost\n")


def image_layer(path: Path, extra: dict[str, str] | None = None) -> Path:
    """The layer that makes the Debian root an "AMI" of ours: init, shutdown, cloud-init's directories.

    It sits between the cached root and each instance's writable layer, so the
    (slow) root need not be rebuilt when these few files change.
    """
    shutil.rmtree(path, ignore_errors=True)
    # bookworm's /sbin is a link to /usr/sbin: a real sbin/ here would hide it, so only usr/sbin.
    files = {"usr/sbin/rp-init": INIT_SH, "opt/rp-sim/failing-shell.sh": FAILING_SHELL_SH,
             "opt/rp-sim/prerunner.sh": "# stands in for the pool's pre-runner script\n", **(extra or {})}
    for name in ("shutdown", "poweroff", "halt", "reboot"):
        files[f"usr/sbin/{name}"] = SHUTDOWN_SH
    for rel, text in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    for rel in (RUNNER_MOUNT, "var/lib/cloud/scripts/per-boot", "var/lib/cloud/instance"):
        (path / rel.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return path


# PID 1 of an instance. cloud-init's order: per-boot scripts, then (first boot only) the user data.
INIT_SH = r"""#!/bin/bash
# rp-init: PID 1 of a simulated rootfs instance (runner-pool). Plays cloud-init's final stage.
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp 2>/dev/null
mount -t tmpfs -o mode=755 tmpfs /run 2>/dev/null
mkdir -p /run/lock /var/lib/cloud/instance/sem /var/log
ip link set lo up 2>/dev/null
trap 'echo "rp-init: power off"; kill -TERM -1 2>/dev/null; sleep 2; kill -KILL -1 2>/dev/null; exit 0' USR2
trap '' TERM INT HUP
echo "rp-init: boot $(date -u +%FT%TZ)"
for s in /var/lib/cloud/scripts/per-boot/*; do
  [ -x "$s" ] || continue
  echo "rp-init: per-boot $s"
  "$s" >>/var/log/cloud-init-output.log 2>&1 </dev/null &
done
if [ ! -e /var/lib/cloud/instance/sem/config_scripts_user ]; then
  date -u +%FT%TZ >/var/lib/cloud/instance/sem/config_scripts_user
  echo "rp-init: user data"
  bash /var/lib/cloud/instance/user-data.txt >>/var/log/cloud-init-output.log 2>&1 </dev/null &
fi
while :; do wait; sleep 1; done
"""

# shutdown/poweroff/halt inside an instance: ask PID 1 to power off.
SHUTDOWN_SH = """#!/bin/sh
# runner-pool rootfs instance: powering off ends PID 1 (the simulator reads that as EC2's shutdown).
echo "shutdown: powering off" >&2
kill -USR2 1
"""


FAILING_SHELL_SH = "#!/bin/sh\necho 'simulated pre-runner failure' >&2\nexit 3\n"


# -- availability -----------------------------------------------------------------------------


def available() -> str:
    """'' if rootfs instances can run here, else why not."""
    if sys.platform != "linux":
        return "rootfs instances need Linux"
    if os.geteuid() != 0:
        return "rootfs instances need root (namespaces, overlayfs, chroot)"
    for tool in ("ip", "unshare", "iptables", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    name = f"rp-probe-{os.getpid()}"
    probe = _run(["ip", "netns", "add", name], check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    with open("/proc/filesystems") as fh:
        if "overlay" not in fh.read():
            return "the kernel has no overlayfs"
    return ""


# -- network: the hub and one veth pair per instance ---------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(netns: str, fn: Any) -> Any:
    """Run ``fn()`` in a thread that joined ``netns`` (sockets it makes stay in that namespace)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {errno.errorcode.get(err, err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=body, name=f"setns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def listen_in(netns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host:port`` inside ``netns``."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
        return s
    return _in_netns(netns, make)  # type: ignore[no-any-return]


def slot_addresses(slot: int) -> tuple[str, str]:
    """(hub side, instance side) of the /30 for ``slot`` (1..16000), avoiding 169.254.169.0/24."""
    base = slot * 4
    third, fourth = divmod(base, 256)
    if third >= 169:
        third += 1
    if third > 254:
        raise RootfsError(f"no link-local /30 left for slot {slot}")
    return f"169.254.{third}.{fourth + 1}", f"169.254.{third}.{fourth + 2}"


class Relay:
    """Forwards TCP connections accepted on a socket in the hub to ``127.0.0.1:target`` on the host."""

    def __init__(self, listener: socket.socket, target_port: int) -> None:
        self.listener = listener
        self.target_port = target_port
        self._stop = threading.Event()
        self.listener.settimeout(0.5)
        self._thread = threading.Thread(target=self._accept, name=f"relay-{target_port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pipe_pair, args=(conn,), daemon=True).start()

    def _pipe_pair(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        t = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
        t.start()
        _pipe(conn, up)
        t.join(60)

    def close(self) -> None:
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        self._thread.join(2)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass
        try:
            src.close()
        except OSError:
            pass


class Hub:
    """The simulator's own network namespace: IMDS at 169.254.169.254, relays, and no forwarding."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.relays: list[Relay] = []

    def create(self) -> Hub:
        _run(["ip", "netns", "del", self.name], check=False)
        _run(["ip", "netns", "add", self.name])
        ex = ["ip", "netns", "exec", self.name]
        _run(ex + ["ip", "link", "set", "lo", "up"])
        _run(ex + ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"])
        _run(ex + ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        _run(ex + ["iptables", "-P", "FORWARD", "DROP"])
        return self

    def relay(self, port: int) -> None:
        """Instances reach host 127.0.0.1:``port`` at <their gateway>:``port``."""
        self.relays.append(Relay(listen_in(self.name, "0.0.0.0", port), port))

    def attach(self, netns: str, slot: int) -> tuple[str, str]:
        """A veth pair hub<->``netns`` for ``slot``: (gateway, instance address)."""
        hub_ip, inst_ip = slot_addresses(slot)
        hub_if = f"rp{slot}"
        _run(["ip", "link", "add", hub_if, "netns", self.name, "type", "veth", "peer", "name", "eth0",
              "netns", netns])
        _run(["ip", "-n", self.name, "addr", "add", f"{hub_ip}/30", "dev", hub_if])
        _run(["ip", "-n", self.name, "link", "set", hub_if, "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{inst_ip}/30", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", netns, "route", "add", "default", "via", hub_ip])
        return hub_ip, inst_ip

    def destroy(self) -> None:
        for r in self.relays:
            r.close()
        self.relays.clear()
        _run(["ip", "netns", "del", self.name], check=False)


# -- one instance's namespaces and layer ---------------------------------------------------------


def layer_paths(home: Path) -> dict[str, Path]:
    return {"upper": home / "layer" / "upper", "work": home / "layer" / "work", "root": home / "root"}


def mount_layer(home: Path, lowers: list[Path]) -> Path:
    """The instance's root: overlayfs of its own upper dir over the image layer and the shared root."""
    p = layer_paths(home)
    for key in ("upper", "work", "root"):
        p[key].mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(p["root"]):
        lower = ":".join(str(x) for x in lowers)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={lower},upperdir={p['upper']},workdir={p['work']}", str(p["root"])])
    return p["root"]


def unmount_layer(home: Path) -> None:
    root = layer_paths(home)["root"]
    for mnt in sorted(mounts_below(root), key=len, reverse=True):
        _run(["umount", "-l", mnt], check=False)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` in the host's mount namespace."""
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                out.append(mnt)
    return out


def netns_names(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))
    except OSError:
        return []


def boot_argv(netns: str, root: Path, env: dict[str, str]) -> list[str]:
    """The command that boots one instance: new mount+PID namespaces in ``netns``, chrooted into ``root``.

    (``nice`` execs ``ip``, which execs ``unshare``: the process the simulator holds is ``unshare`` and its
    one child is the instance's PID 1.)
    """
    envargs = [f"{k}={v}" for k, v in sorted(env.items())]
    # nice 10: a booting instance's apt-get (about 10 CPU seconds) yields to the host's other work -- on a
    # shared 2-core machine, the process-kind agents' heartbeats of other tests.
    return ["nice", "-n", "10", "ip", "netns", "exec", netns, "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
            "chroot", str(root), "/usr/bin/env", "-i", *envargs, "/usr/sbin/rp-init"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlplane.local.rootfs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached Debian root")
    sub.add_parser("path", help="print where the root for this recipe lives")
    sub.add_parser("check", help="say whether rootfs instances can run here")
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(root_path())
        return 0
    if args.cmd == "check":
        why = available()
        print(why or "ok")
        return 1 if why else 0
    try:
        path, built = build_root(lambda m: print(m, flush=True))
    except RootfsError as exc:
        print(f"error: rootfs: {exc}", file=sys.stderr)
        return 1
    print(f"{'built' if built else 'cached'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- the simulator's side: boot, stop, terminate, clean up ---------------------------------------


def processes_rooted_below(path: Path) -> list[int]:
    """Pids of live processes whose root directory is ``path`` or below it (chrooted instance processes)."""
    prefix = str(path)
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            root = os.readlink(f"/proc/{name}/root")
        except OSError:
            continue
        if root == prefix or root.startswith(prefix + "/"):
            pids.append(int(name))
    return pids


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def exec_in(init_pid: int, argv: list[str], user: str | None = None, timeout_s: float = 60,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside a running instance (its mount, PID and network namespaces and its root).

    With ``user``, as that user of the instance (``runuser``: no password, no
    sudo, a login environment), which is how the attack tests act as a job.
    """
    inner = ["runuser", "-u", user, "--", *argv] if user else argv
    return subprocess.run(["nsenter", "--target", str(init_pid), "--mount", "--pid", "--net", "--root", "--wd",
                           "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG=C.UTF-8",
                           *inner], capture_output=True, text=True, timeout=timeout_s, input=input_text, check=False)


def cleanup_below(state_dir: Path) -> dict[str, int]:
    """Whatever rootfs instances left under ``state_dir``: kill, unmount, delete their namespaces.

    For ``runner-pool local stop`` after a daemon that could not clean up
    itself (killed): every namespace name it made is written down below
    ``state_dir`` (``*/netns`` files) before the namespace exists.
    """
    killed = 0
    for pid in processes_rooted_below(state_dir):
        try:
            os.kill(pid, 9)
            killed += 1
        except OSError:
            pass
    names = []
    for marker in list(state_dir.glob("*/netns")) + list(state_dir.glob("*/*/netns")):
        try:
            names.append(marker.read_text().strip())
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while processes_rooted_below(state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    mounts = mounts_below(state_dir)
    for mnt in sorted(mounts, key=len, reverse=True):
        _run(["umount", "-l", mnt], check=False)
    gone = 0
    for name in names:
        if name and (Path("/run/netns") / name).exists():
            _run(["ip", "netns", "del", name], check=False)
            gone += 1
    return {"killed": killed, "unmounted": len(mounts), "netns_deleted": gone}


class RootfsHost:
    """Every rootfs instance of one simulator: the hub, the layers, the namespaces."""

    def __init__(self, work_dir: Path, imds: Any, aws_port: int, github_port: int | None) -> None:
        self.work_dir = work_dir
        self.imds = imds
        self.aws_port = aws_port
        self.github_port = github_port
        self.tag = f"{os.getpid()}{id(self) % 1000:03d}"
        self.hub = Hub(f"rp-hub-{self.tag}")
        self.lower: list[Path] = []
        self._slots: set[int] = set()
        self._lock = threading.Lock()
        self._ready = False

    def ensure(self) -> None:
        """Build (or find) the root, make the image layer and the hub; once."""
        with self._lock:
            if self._ready:
                return
            why = available()
            if why:
                raise RootfsError(why)
            root, _ = build_root(lambda m: None)
            sim = self.work_dir / "_sim"
            sim.mkdir(parents=True, exist_ok=True)
            (sim / "netns").write_text(self.hub.name)
            self.lower = [image_layer(sim / "image-layer"), root]
            self.hub.create()
            self.hub.relay(self.aws_port)
            if self.github_port:
                self.hub.relay(self.github_port)
            self.imds.serve_on(listen_in(self.hub.name, "169.254.169.254", 80))
            self._ready = True

    def slot(self) -> int:
        with self._lock:
            n = 1
            while n in self._slots:
                n += 1
            self._slots.add(n)
            return n

    def release(self, slot: int | None) -> None:
        with self._lock:
            self._slots.discard(slot or -1)

    def netns(self, instance_id: str) -> str:
        return f"rp-{self.tag}-{instance_id}"

    def boot(self, home: Path, instance_id: str, slot: int, user_data: bytes, env: dict[str, str],
             console: Any) -> tuple[subprocess.Popen[bytes], str]:
        """Mount the layer, make the namespaces, start PID 1. Returns (process, instance address)."""
        self.ensure()
        home.mkdir(parents=True, exist_ok=True)
        root = mount_layer(home, self.lower)
        ud = root / "var/lib/cloud/instance/user-data.txt"
        if not ud.exists():                               # first boot: cloud-init stores the user data
            ud.parent.mkdir(parents=True, exist_ok=True)
            ud.write_bytes(user_data)
            ud.chmod(0o600)
        runner = root / RUNNER_MOUNT.lstrip("/")
        if not os.path.ismount(runner):
            _run(["mount", "--bind", "-o", "ro", str(Path(__file__).parent / "actions_runner"), str(runner)])
        netns = self.netns(instance_id)
        (home / "netns").write_text(netns)
        _run(["ip", "netns", "del", netns], check=False)
        _run(["ip", "netns", "add", netns])
        gateway, address = self.hub.attach(netns, slot)
        full = {"AWS_ENDPOINT_URL": f"http://{gateway}:{self.aws_port}", **env}
        if self.github_port:
            full.setdefault("RP_GITHUB_URL", f"http://{gateway}:{self.github_port}")
        proc = subprocess.Popen(boot_argv(netns, root, full), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return proc, address

    def init_pid(self, proc: subprocess.Popen[bytes] | None) -> int | None:
        """PID (on the host) of the instance's PID 1: the child of ``unshare --fork``.

        None once ``proc`` has been reaped: its pid may name another process by now (and PID 1
        died with it, ``unshare`` waiting for its child).
        """
        if proc is None or proc.poll() is not None:
            return None
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as fh:
                kids = fh.read().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def agent_pid(self, home: Path) -> int | None:
        for pid in processes_rooted_below(layer_paths(home)["root"]):
            if b"/agent.py" in cmdline(pid):
                return pid
        return None

    def pids(self, home: Path) -> list[int]:
        return processes_rooted_below(layer_paths(home)["root"])

    def power_off(self, proc: subprocess.Popen[bytes] | None) -> None:
        """What EC2 does on stop/terminate: the OS shuts down (every process gets SIGTERM, then SIGKILL)."""
        pid = self.init_pid(proc)
        if pid is not None:
            try:
                os.kill(pid, 12)                          # SIGUSR2: rp-init's power-off
            except OSError:
                pass

    def halt(self, home: Path, instance_id: str, proc: subprocess.Popen[bytes] | None, *,
             remove_layer: bool) -> None:
        """Kill the PID namespace, delete the network namespace, unmount; remove the layer on terminate."""
        pid = self.init_pid(proc)
        if pid is not None:
            try:
                os.kill(pid, 9)                           # PID 1 dies: the kernel kills its namespace
            except OSError:
                pass
        for p in self.pids(home):
            try:
                os.kill(p, 9)
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        deadline = time.monotonic() + 5
        while self.pids(home) and time.monotonic() < deadline:
            time.sleep(0.05)
        _run(["ip", "netns", "del", self.netns(instance_id)], check=False)
        unmount_layer(home)
        if remove_layer:
            shutil.rmtree(home / "layer", ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            if self._ready:
                self.hub.destroy()
            self._ready = False
