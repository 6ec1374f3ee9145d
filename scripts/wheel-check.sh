#!/usr/bin/env bash
# The package as users install it: build the wheel, install it into a fresh
# virtualenv (not editable, no source tree on the path), import every module and
# find every data file in the installed copy, then run the tests that depend on
# how it is installed: entry points, `python -m` subprocesses (workers, the CLI,
# the control socket), and the guest's init script. The rest of the quick suite
# tests the same code the host suite just ran. Needs what scripts/test.sh
# installs; run as root.
# Usage: bash scripts/wheel-check.sh [pytest args...]   (e.g. -m "not e2e" for the whole quick suite)
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
import importlib, importlib.resources, pkgutil, pyvhost
assert "site-packages" in pyvhost.__file__, f"imported from {pyvhost.__file__}, not the wheel"
print(f"==> pyvhost {pyvhost.__version__} from {pyvhost.__file__}")
modules = [m.name for m in pkgutil.walk_packages(pyvhost.__path__, "pyvhost.")]
modules = [m for m in modules if not m.endswith(".__main__")]  # that one runs the CLI
for name in modules:
    importlib.import_module(name)
root = importlib.resources.files("pyvhost")
data = ["guest/init.sh", "systemd/pyvhost-net@.service", "systemd/pyvhost-net@.socket"]
missing = [d for d in data if not root.joinpath(d).is_file()]
assert not missing, f"the wheel lacks {missing}"
print(f"==> {len(modules)} modules import, {len(data)} data files present")
PY
"$work/venv/bin/pyvhost" --version
"$work/venv/bin/pyvhost-net" --print-capabilities >/dev/null
echo "==> the tests that depend on the installed package"
if [ $# -eq 0 ]; then
    set -- tests/net/test_cli.py tests/net/test_conventions.py tests/net/test_workers.py \
        tests/net/test_observe.py tests/switch/test_switch.py tests/guest tests/test_readme.py
fi
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
