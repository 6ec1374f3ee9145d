#!/usr/bin/env bash
# The package as users install it: build the wheel, install it into a fresh
# virtualenv (not editable, no source tree on the path), and run the quick suite
# against the installed copy. Needs what scripts/test.sh installs; run as root.
# Usage: bash scripts/wheel-check.sh [pytest args...]   (default: -m "not e2e")
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/pyvhost-wheel-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # the socket-activation test runs the installed pyvhost-net as nobody
echo "==> building the wheel"
python3 -m venv "$work/build"
"$work/build/bin/python" -m pip install -q --upgrade pip build
"$work/build/bin/python" -m build -q --wheel --outdir "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/pyvhost-*.whl)
echo "==> $(basename "$wheel") into a fresh venv"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel[test]"
# From the source tree's root, as CI runs: the import must still be the installed copy.
"$work/venv/bin/python" - <<'PY'
import pyvhost, sys
assert "site-packages" in pyvhost.__file__, f"imported from {pyvhost.__file__}, not the wheel"
print(f"==> pyvhost {pyvhost.__version__} from {pyvhost.__file__}")
PY
"$work/venv/bin/pyvhost" --version
"$work/venv/bin/pyvhost-net" --print-capabilities >/dev/null
echo "==> quick suite against the installed package"
if [ $# -eq 0 ]; then set -- -m "not e2e"; fi
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
