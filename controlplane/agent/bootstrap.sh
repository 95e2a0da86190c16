#!/bin/bash
# runner-pool bootstrap for pool @@POOL@@ (rendered by controlplane/userdata.py).
# Installs the agent and actions-runner, then runs the agent. Holds no secret:
# the agent reads runner tokens from SSM. Any failure before the agent starts
# powers the instance off, so a broken bootstrap never leaves an orphan.
set -euo pipefail
if [ -n "${RUNNER_POOL_HOME:-}" ]; then RP_LOG="$RUNNER_POOL_HOME/bootstrap.log"; else RP_LOG=/var/log/runner-pool.log; fi
: "${RUNNER_POOL_HOME:=/opt/runner-pool}"
mkdir -p "$RUNNER_POOL_HOME"
chmod 700 "$RUNNER_POOL_HOME"
exec >>"$RP_LOG" 2>&1
rp_fail() {
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "runner-pool bootstrap failed (exit $rc) at line ${1:-?}: powering off"
    ${RUNNER_POOL_SHUTDOWN_CMD:-shutdown -h now} || true
  fi
}
trap 'rp_fail $LINENO' EXIT
echo "runner-pool bootstrap $(date -u +%FT%TZ)"

: "${RP_POOL:=@@POOL@@}"
: "${RP_TABLE:=@@TABLE@@}"
: "${RP_REGION:=@@REGION@@}"
: "${RP_TOKEN_PARAM:=@@TOKEN_PARAM@@}"
: "${RP_GITHUB_URL:=@@GITHUB_URL@@}"
: "${RP_GITHUB_SCOPE:=@@GITHUB_SCOPE@@}"
: "${RP_POOL_LABEL:=@@POOL_LABEL@@}"
: "${RP_HEARTBEAT_S:=@@HEARTBEAT_S@@}"
: "${RP_LOST_CONTACT_S:=@@LOST_CONTACT_S@@}"
: "${RP_MAX_LIFETIME_S:=@@MAX_LIFETIME_S@@}"
: "${RP_NO_ROW_TIMEOUT_S:=@@NO_ROW_TIMEOUT_S@@}"
: "${RP_REGISTRATION_ATTEMPTS:=@@REGISTRATION_ATTEMPTS@@}"
: "${RP_RUNNER_VERSION:=@@RUNNER_VERSION@@}"
: "${AWS_DEFAULT_REGION:=$RP_REGION}"
: "${HOME:=/root}"
export RP_POOL RP_TABLE RP_REGION RP_TOKEN_PARAM RP_GITHUB_URL RP_GITHUB_SCOPE RP_POOL_LABEL RP_HEARTBEAT_S \
  RP_LOST_CONTACT_S RP_MAX_LIFETIME_S RP_NO_ROW_TIMEOUT_S RP_REGISTRATION_ATTEMPTS RP_RUNNER_VERSION \
  AWS_DEFAULT_REGION HOME RUNNER_POOL_HOME
RP_PY="${RUNNER_POOL_PYTHON:-python3}"
cd "$RUNNER_POOL_HOME"

if ! "$RP_PY" -c 'import boto3' 2>/dev/null; then
  echo "installing python3 and boto3"
  if command -v dnf >/dev/null; then dnf install -y python3 python3-boto3
  elif command -v apt-get >/dev/null; then apt-get update -y && DEBIAN_FRONTEND=noninteractive apt-get install -y python3 python3-boto3
  else echo "no dnf or apt-get: cannot install boto3"; exit 1
  fi
fi

base64 -d <<'RP_AGENT_EOF' | gzip -dc >agent.py.tmp
@@AGENT_GZ_B64@@
RP_AGENT_EOF
mv agent.py.tmp agent.py
@@PRERUNNER@@

RP_RUNNER_DIR="$RUNNER_POOL_HOME/actions-runner"
mkdir -p "$RP_RUNNER_DIR"
if [ -n "${RUNNER_POOL_RUNNER_SOURCE:-}" ]; then
  cp -R "$RUNNER_POOL_RUNNER_SOURCE/." "$RP_RUNNER_DIR/"
elif [ ! -x "$RP_RUNNER_DIR/config.sh" ]; then
  case "$(uname -m)" in
    x86_64|amd64) RP_ARCH=x64; RP_SUM='@@SHA256_X64@@' ;;
    aarch64|arm64) RP_ARCH=arm64; RP_SUM='@@SHA256_ARM64@@' ;;
    *) echo "unsupported architecture $(uname -m)"; exit 1 ;;
  esac
  RP_TGZ="$RUNNER_POOL_HOME/actions-runner.tar.gz"
  curl -fsSL --retry 5 --retry-delay 2 --retry-all-errors --connect-timeout 10 --max-time 600 -o "$RP_TGZ" \
    "https://github.com/actions/runner/releases/download/v$RP_RUNNER_VERSION/actions-runner-linux-$RP_ARCH-$RP_RUNNER_VERSION.tar.gz"
  if [ -n "$RP_SUM" ]; then echo "$RP_SUM  $RP_TGZ" | sha256sum -c -; fi
  tar xzf "$RP_TGZ" -C "$RP_RUNNER_DIR"
  rm -f "$RP_TGZ"
  if [ -x "$RP_RUNNER_DIR/bin/installdependencies.sh" ] && ! ldconfig -p 2>/dev/null | grep -q libicu; then
    "$RP_RUNNER_DIR/bin/installdependencies.sh"
  fi
fi

shopt -s execfail
exec "$RP_PY" "$RUNNER_POOL_HOME/agent.py" || exit 1
