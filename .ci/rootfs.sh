#!/usr/bin/env bash
# CI: what the rootfs kind of simulated instance needs (tests/rootfs): debootstrap, iptables, nsenter and
# dpkg-scanpackages from Debian's registry, then the cached Debian root (controlplane/local/rootfs.py),
# built once per recipe into ~/.cache/runner-pool (about a minute; later runs find it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "rootfs: not root here: tests/rootfs will be skipped"; exit 0; fi
missing=""
for tool in debootstrap iptables nsenter dpkg-scanpackages; do command -v "$tool" >/dev/null || missing=1; done
if [ -n "$missing" ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap iptables util-linux dpkg-dev
fi
if ! python -m controlplane.local.rootfs check; then
  echo "rootfs: instances cannot run here: tests/rootfs fail under CI=true and skip elsewhere"; exit 0
fi
python -m controlplane.local.rootfs build
