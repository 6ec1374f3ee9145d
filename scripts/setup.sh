# Sourced by test.sh and demo.sh: installs what pyvhost needs on Debian 12 or 13
# (the package names below exist in both releases).
# Debian packages (only the missing ones), then pyvhost into ./.venv.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    # The guest image needs apt to know Debian's kernel package (apt-get download).
    local lists_ok=1
    apt-cache show linux-image-amd64 >/dev/null 2>&1 || lists_ok=0
    if [ ${#missing[@]} -gt 0 ] || [ "$lists_ok" -eq 0 ]; then
        echo "==> apt-get update"
        $SUDO apt-get update -q
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}"
    fi
}

python_env() {
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv"
        python3 -m venv .venv
    fi
    echo "==> installing pyvhost into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e "$1"
}

# What running a guest needs (libatomic1: pyvhost sets bits in a live
# migration's dirty log with atomic ORs).
GUEST_PACKAGES=(python3 python3-venv python3-pip iproute2 qemu-system-x86 busybox-static
                iperf3 util-linux dpkg apt ca-certificates libatomic1)
