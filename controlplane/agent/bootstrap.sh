#!/bin/bash
# runner-pool bootstrap for pool @@POOL@@ (rendered by controlplane/userdata.py).
# Runs as root on first boot (cloud-init's user data) and, as a per-boot script, on every later boot:
# installs python3, boto3, the agent and actions-runner, creates the unprivileged runner user, blocks
# IMDS for that user, then runs the agent as root. Holds no secret. Any failure before the agent starts powers the instance off, so a broken bootstrap
# never leaves an orphan.
set -euo pipefail
umask 077
if [ -n "${RUNNER_POOL_HOME:-}" ]; then RP_LOG="$RUNNER_POOL_HOME/bootstrap.log"; else RP_LOG=/var/log/runner-pool.log; fi
: "${RUNNER_POOL_HOME:=/opt/runner-pool}"
mkdir -p "$RUNNER_POOL_HOME"
chmod 700 "$RUNNER_POOL_HOME"
exec >>"$RP_LOG" 2>&1
rp_fail() {
  rc=$?
  [ "$rc" = 0 ] || { echo "runner-pool bootstrap failed (exit $rc) at line ${1:-?}: powering off"
    ${RUNNER_POOL_SHUTDOWN_CMD:-shutdown -h now} || true; }
}
trap 'rp_fail $LINENO' EXIT
echo "runner-pool bootstrap $(date -u +%FT%TZ)"

set -a
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
: "${RP_RUN_POLL_S:=@@RUN_POLL_S@@}"
: "${RP_RUNNER_VERSION:=@@RUNNER_VERSION@@}"
: "${RP_RUNNER_SUDO:=@@RUNNER_SUDO@@}"
: "${AWS_DEFAULT_REGION:=$RP_REGION}"
: "${HOME:=/root}"
# The simulator's process kind shares the host's OS: it sets RUNNER_POOL_SKIP_OS_SETUP=1 and the
# bootstrap then creates no user, sudoers file, firewall rule or boot script (the agent runs the runner
# as root there). Everywhere else (EC2, the rootfs kind) the runner is the unprivileged user below.
RP_USER=
if [ -z "${RUNNER_POOL_SKIP_OS_SETUP:-}" ]; then RP_USER=runner RP_RUNNER_USER=runner; fi
: "${RUNNER_POOL_RUNNER_DIR:=${RP_USER:+/home/runner/actions-runner}}"
: "${RUNNER_POOL_RUNNER_DIR:=$RUNNER_POOL_HOME/actions-runner}"
set +a
export RUNNER_POOL_HOME
RP_PY="${RUNNER_POOL_PYTHON:-python3}"
cd "$RUNNER_POOL_HOME"

if ! "$RP_PY" -c 'import boto3' 2>/dev/null; then
  echo "installing python3 and boto3"
  if command -v dnf >/dev/null; then dnf install -y python3 python3-boto3 iptables-nft sudo
  elif command -v apt-get >/dev/null; then apt-get update -y && DEBIAN_FRONTEND=noninteractive apt-get install -y python3 python3-boto3 iptables sudo
  else echo "no dnf or apt-get"; exit 1
  fi
fi

base64 -d <<'RP_AGENT_EOF' | gzip -dc >agent.py
@@AGENT_GZ_B64@@
RP_AGENT_EOF
@@PRERUNNER@@

if [ -n "$RP_USER" ]; then
  id -u runner >/dev/null 2>&1 || useradd -m -U -s /bin/bash runner
  rm -f /etc/sudoers.d/runner-pool
  if [ "$RP_RUNNER_SUDO" = true ]; then echo 'runner ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/runner-pool; fi
fi
RP_RD="$RUNNER_POOL_RUNNER_DIR"
mkdir -p "$RP_RD"
if [ -n "${RUNNER_POOL_RUNNER_SOURCE:-}" ]; then
  cp -R "$RUNNER_POOL_RUNNER_SOURCE/." "$RP_RD/"
elif [ ! -x "$RP_RD/config.sh" ]; then
  case "$(uname -m)" in
    x86_64|amd64) RP_ARCH=x64; RP_SUM='@@SHA256_X64@@' ;;
    aarch64|arm64) RP_ARCH=arm64; RP_SUM='@@SHA256_ARM64@@' ;;
    *) echo "unsupported architecture $(uname -m)"; exit 1 ;;
  esac
  RP_TGZ="$RUNNER_POOL_HOME/actions-runner.tar.gz"
  curl -fsSL --retry 5 --retry-delay 2 --retry-all-errors --connect-timeout 10 --max-time 600 -o "$RP_TGZ" \
    "https://github.com/actions/runner/releases/download/v$RP_RUNNER_VERSION/actions-runner-linux-$RP_ARCH-$RP_RUNNER_VERSION.tar.gz"
  if [ -n "$RP_SUM" ]; then echo "$RP_SUM  $RP_TGZ" | sha256sum -c -; fi
  tar xzf "$RP_TGZ" -C "$RP_RD"
  rm -f "$RP_TGZ"
  if [ -x "$RP_RD/bin/installdependencies.sh" ] && ! ldconfig -p 2>/dev/null | grep -q libicu; then
    "$RP_RD/bin/installdependencies.sh"
  fi
fi
if [ -n "$RP_USER" ]; then chown -R runner:runner "$RP_RD"; fi

# Every boot runs this whole script (it is idempotent): on first boot as the user data, after a stop
# and start from the per-boot directory. The IMDS rule must be in place before the agent starts.
rp_fw() { R="OUTPUT -d $2 -m owner --uid-owner runner -j REJECT"; $1 -C $R 2>/dev/null || $1 -I $R; }
if [ -n "$RP_USER" ]; then
  rp_fw iptables 169.254.169.254
  [ ! -e /proc/net/if_inet6 ] || rp_fw ip6tables fd00:ec2::254
fi
# The stopped tier starts instances again: whatever boots them (cloud-init, or the simulator's process
# kind under RUNNER_POOL_CLOUD_DIR) runs scripts/per-boot, and so this installed copy, on every boot.
RP_CD="${RUNNER_POOL_CLOUD_DIR:-${RP_USER:+/var/lib/cloud}}"
if [ -d "$RP_CD" ] && [ ! "$0" -ef bootstrap.sh ]; then
  cp "$0" bootstrap.sh
  P="$RP_CD/scripts/per-boot"
  mkdir -p "$P"
  printf '#!/bin/sh\nexec /bin/bash %s/bootstrap.sh\n' "$RUNNER_POOL_HOME" >"$P/runner-pool.sh"
  chmod 700 "$P/runner-pool.sh"
fi

shopt -s execfail
exec "$RP_PY" "$RUNNER_POOL_HOME/agent.py" || exit 1
