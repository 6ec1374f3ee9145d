#!/usr/bin/env bash
# Installs what the test suite needs on a Debian 12 machine, then runs it.
# Usage: bash scripts/test.sh [pytest args...]
# Needs root (or sudo) for apt-get; everything Python goes into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Debian packages the tests use. Only missing ones are installed.
APT_PACKAGES=(python3 python3-venv python3-pip iproute2 dpdk util-linux)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> installing pyvhost and its test tools into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

echo "==> ruff"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench

echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
