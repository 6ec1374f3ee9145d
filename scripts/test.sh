#!/usr/bin/env bash
# Installs what the test suite needs on Debian 12 or 13, then runs all of it
# (unit, socket, TAP, DPDK interop and QEMU end-to-end tests).
# Usage: bash scripts/test.sh [pytest args...]   (e.g. -m "not e2e" for the quick ones)
# Needs root (or sudo): apt-get, TAP devices, network namespaces, hugepages.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

apt_install "${GUEST_PACKAGES[@]}" dpdk dpdk-dev tcpdump \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients  # testpmd is in dpdk-dev; tcpdump reads captures; libvirt for its e2e test
python_env '.[test]'

echo "==> ruff"
.venv/bin/ruff check src tests bench examples
.venv/bin/ruff format --check src tests bench examples

echo "==> pytest"
exec $SUDO .venv/bin/python -m pytest "$@"
