#!/usr/bin/env bash
# Installs what the demo needs on Debian 12 or 13, then runs it: a Linux
# guest in QEMU whose NIC is served by pyvhost, pinging and running iperf3.
# Usage: bash scripts/demo.sh [pyvhost demo args...]   (needs root, or sudo)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

apt_install "${GUEST_PACKAGES[@]}"
python_env '.'

exec $SUDO .venv/bin/pyvhost demo "$@"
