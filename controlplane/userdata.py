"""The launch template's user data: the bootstrap script with the agent inside.

:func:`render_user_data` fills ``agent/bootstrap.sh`` with the pool's values
and embeds ``agent/agent.py`` (gzip + base64) and the pre-runner script
(base64). It returns the plain script; :mod:`controlplane.launch_template`
base64s it and refuses anything over EC2's 16 KB.

Invariants:

* **No secret.** Tokens live in SSM; the script holds only names and URLs.
* **Deterministic.** Same config -> byte-identical output (gzip with
  ``mtime=0``, no timestamps, no dict ordering), so the launch template only
  gets a new version when something really changed.
* **Small.** The launch template carries the script gzipped
  (:func:`user_data_bytes`; cloud-init runs gzip user data as it runs plain).
  The agent ships with comments and docstrings blanked out and
  one space per indentation level, every line kept where it was (tracebacks
  on an instance point at the right line of ``agent.py``), checked to have
  the very same syntax tree as the source. With an empty pre-runner script
  the gzipped user data is about 10 KB of EC2's 16 KB.
* **Nothing the payload contains can end a heredoc early.** Both payloads are
  base64 (alphabet ``A-Za-z0-9+/=``) and the heredoc markers contain ``_``.
* **Every baked value can be overridden** from the environment
  (``: "${RP_X:=value}"``): the simulator points the same script at local paths.
"""
from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

from controlplane.config import PoolConfig

AGENT_DIR = Path(__file__).parent / "agent"
NO_ROW_TIMEOUT_S = 600               # an instance whose row never appears powers off after this
REGISTRATION_ATTEMPTS = 3
FRESH_REGISTRATION_POLL_S = 1          # RP_RUN_POLL_S when every run registers anew
RELABEL_POLL_S = 5                     # ... when warm hits relabel (see registered_poll_s)
BASE64_LINE = 1024                   # line length of the embedded base64 (base64 -d takes any)
_PLACEHOLDER = re.compile(r"@@([A-Z0-9_]+)@@")


def slim_source(source: str) -> str:
    """Blank out comments and docstrings and indent one space per level; every line stays put."""
    lines = source.splitlines()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = node.body[0] if node.body else None
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        start, end = first.lineno - 1, (first.end_lineno or first.lineno) - 1
        indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
        for i in range(start, end + 1):
            lines[i] = ""
        if len(node.body) == 1:          # a body that was only a docstring needs a statement
            lines[start] = indent + "pass"
    text = "\n".join(lines) + "\n"
    out = [list(line) for line in text.splitlines()]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            out[row - 1] = out[row - 1][:col]
    slim = "\n".join(_one_space_indent("".join(chars).rstrip()) for chars in out).rstrip("\n") + "\n"
    if ast.dump(ast.parse(slim)) != ast.dump(ast.parse(text)):
        raise ValueError("slimming changed the agent's syntax tree")      # never ship a different program
    return slim


def _one_space_indent(line: str) -> str:
    """4 spaces of indentation -> 1 (inside brackets indentation is free; the AST check proves the rest)."""
    n = len(line) - len(line.lstrip(" "))
    return " " * (n // 4 + n % 4) + line[n:]


@lru_cache(maxsize=1)
def agent_payload() -> str:
    """``agent.py``, slimmed, gzipped (mtime 0) and base64-encoded."""
    slim = slim_source((AGENT_DIR / "agent.py").read_text()).encode()
    packed = gzip.compress(slim, compresslevel=9, mtime=0)
    return _b64_lines(packed)


def _b64_lines(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    return "\n".join(text[i:i + BASE64_LINE] for i in range(0, len(text), BASE64_LINE))


def _dq(value: object) -> str:
    """``value`` for the inside of ``"${VAR:=...}"``: escape what bash would expand or end on."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"user-data values must be one line: {text!r}")
    return re.sub(r'([\\"$`}])', r"\\\1", text)


def _prerunner(script: str) -> str:
    if not script.strip():
        return ": >prerunner.sh"
    return f"base64 -d >prerunner.sh <<'RP_PRERUNNER_EOF'\n{_b64_lines(script.encode())}\nRP_PRERUNNER_EOF"


def strip_comments(script: str) -> str:
    """Drop the template's full-line ``#`` comments (not the shebang) and indentation: EC2 needn't carry them.

    The template has no ``<<-`` heredoc and no line continued inside quotes, so indentation means nothing.
    """
    lines = script.splitlines()
    return "\n".join([lines[0]] + [ln.lstrip() for ln in lines[1:] if not ln.lstrip().startswith("#")]) + "\n"


def registered_poll_s(cfg: PoolConfig) -> float:
    """How often an agent holding a registered runner reads its state row (``RP_RUN_POLL_S``).

    With re-registration every release and claim waits for the agent, so it
    polls every second. With relabelling neither does: the control plane
    changes the runner's labels itself, and the row matters to the agent only
    for what it must act on (a release that drains a busy runner, a fallback
    registration, termination, a passed threshold), which every few seconds
    serves. An agent holding no runner keeps polling fast (``RP_IDLE_POLL_S``):
    it waits for a registration credential.
    """
    return FRESH_REGISTRATION_POLL_S if cfg.fresh_registration else RELABEL_POLL_S


def render_user_data(cfg: PoolConfig) -> str:
    """The bootstrap script for ``cfg``'s instances (plain text, not base64)."""
    values = {
        "POOL": _dq(cfg.name),
        "TABLE": _dq(cfg.table_name),
        "REGION": _dq(cfg.region),
        "TOKEN_PARAM": _dq(cfg.token_parameter),
        "GITHUB_URL": _dq(cfg.github.url.rstrip("/")),
        "GITHUB_SCOPE": _dq(cfg.github.scope),
        "POOL_LABEL": _dq(cfg.pool_label),
        "HEARTBEAT_S": str(cfg.heartbeat_interval_s),
        "LOST_CONTACT_S": str(cfg.lost_contact_s),
        "MAX_LIFETIME_S": str(cfg.max_lifetime_s),
        "NO_ROW_TIMEOUT_S": str(NO_ROW_TIMEOUT_S),
        "REGISTRATION_ATTEMPTS": str(REGISTRATION_ATTEMPTS),
        "RUN_POLL_S": str(registered_poll_s(cfg)),
        "RUNNER_VERSION": _dq(cfg.github.runner_version),
        "RUNNER_SUDO": "true" if cfg.runner_sudo else "false",
        "SHA256_X64": cfg.github.runner_sha256_x64 or "",
        "SHA256_ARM64": cfg.github.runner_sha256_arm64 or "",
        "AGENT_GZ_B64": agent_payload(),
        "PRERUNNER": _prerunner(cfg.pre_runner_script),
    }
    template = strip_comments((AGENT_DIR / "bootstrap.sh").read_text())
    unknown = set(_PLACEHOLDER.findall(template)) - set(values)
    if unknown:
        raise ValueError(f"bootstrap.sh has placeholders with no value: {sorted(unknown)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def user_data_bytes(cfg: PoolConfig) -> bytes:
    """What the launch template carries: the script gzipped (deterministic: ``mtime=0``).

    cloud-init recognises gzip user data by its magic bytes and runs the script
    inside as if it had been given plain, on Amazon Linux and Ubuntu alike
    (cloud-init docs, "User data formats: gzip compressed content"). EC2's
    16 KB limit applies to these bytes, before base64, so compression is what
    leaves room for a pre-runner script beside an agent that has grown with the
    trust model.
    """
    return gzip.compress(render_user_data(cfg).encode(), compresslevel=9, mtime=0)


def user_data_size(cfg: PoolConfig) -> int:
    """Bytes of the user data as EC2 counts them (gzipped, before base64)."""
    return len(user_data_bytes(cfg))


def pre_runner_room(cfg: PoolConfig, limit: int) -> int:
    """The longest pre-runner script (bytes) that keeps ``cfg``'s user data within ``limit``; -1 if none does.

    The script is embedded as base64 and the whole is gzipped, so its share of
    the user data is not its own length: this searches, rendering with trial
    scripts that do not compress (printable pseudo-random text, the worst case),
    so a real script of that length always fits.
    """
    def fits(n: int) -> bool:
        trial = cfg.model_copy(update={"pre_runner_script": _incompressible(n)})
        return user_data_size(trial) <= limit

    if not fits(0):
        return -1
    lo, hi = 0, max(1, len(cfg.pre_runner_script.encode()))
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:                      # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _incompressible(n: int) -> str:
    """``n`` printable characters that gzip cannot shrink much (deterministic)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;|&$-_=/.\n"
    stream = hashlib.shake_256(b"runner-pool pre-runner room").digest(n)
    return "".join(alphabet[b % len(alphabet)] for b in stream)
