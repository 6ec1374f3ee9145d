#!/usr/bin/env bash
# Runs the README's two commands in a fresh Debian chroot, as a newcomer on
# that release would: a clean clone, nothing installed but Debian's minbase.
#
# Usage: bash scripts/chroot.sh RELEASE [readme|demo|test|shell] [args...]
#   RELEASE   trixie (Debian 13) or bookworm (Debian 12)
#   readme    both README commands, one after the other (CI runs this)
#   demo      bash scripts/demo.sh ARGS   inside the chroot
#   test      bash scripts/test.sh ARGS   inside the chroot (the default)
#   shell     an interactive shell there
#   keep DIR  leave a fresh chroot with QEMU installed at DIR, unmounted (for
#             bench/msix.py, which runs that release's QEMU); rm -rf DIR after
# Environment:
#   PYVHOST_CHROOT_DIR  where chroots are kept (default /var/tmp/pyvhost-chroots)
#   PYVHOST_CHROOT_FRESH=1  debootstrap anew even if a cached chroot exists
#
# The chroot is made once with debootstrap (minbase) and kept as a tarball; each
# run unpacks that tarball, so every run starts from Debian's minbase. It
# shares the host's kernel, /dev, /proc and /sys (TAPs, namespaces, hugepages
# and QEMU work as on the host) and the host's CA certificates, which pip needs
# here as in any chroot. Needs root. Everything mounted is unmounted at exit,
# also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

release=${1:?usage: bash scripts/chroot.sh trixie|bookworm [readme|demo|test|shell] [args...]}
shift
what=${1:-test}
[ $# -gt 0 ] && shift
case "$release" in
    trixie|bookworm) ;;
    *) echo "scripts/chroot.sh: release '$release': use trixie (Debian 13) or bookworm (Debian 12)" >&2
       exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "scripts/chroot.sh: needs root (debootstrap, mounts)" >&2; exit 2; }

store=${PYVHOST_CHROOT_DIR:-/var/tmp/pyvhost-chroots}
tarball="$store/$release-minbase.tar"
mkdir -p "$store"

if ! command -v debootstrap >/dev/null; then
    echo "==> installing debootstrap"
    apt-get install -y -q --no-install-recommends debootstrap >/dev/null \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends debootstrap; }
fi

if [ ! -f "$tarball" ] || [ "${PYVHOST_CHROOT_FRESH:-0}" = 1 ]; then
    echo "==> debootstrap $release (minbase) from deb.debian.org"
    build=$(mktemp -d "$store/build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    debootstrap --variant=minbase "$release" "$build" http://deb.debian.org/debian >"$store/debootstrap-$release.log" 2>&1 \
        || { tail -20 "$store/debootstrap-$release.log"; exit 1; }
    tar -C "$build" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$build"
    trap - EXIT
fi

if [ "$what" = keep ]; then
    root=${1:?usage: bash scripts/chroot.sh RELEASE keep DIR}
    [ -e "$root" ] && { echo "scripts/chroot.sh: $root exists; remove it or choose another" >&2; exit 2; }
    mkdir -p "$root"
    tar -C "$root" -xf "$tarball"
    chmod 755 "$root"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mount -t proc proc "$root/proc"
    trap 'umount "$root/proc"' EXIT
    echo "==> installing qemu-system-x86 in $root"
    chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        bash -c 'apt-get update -q && apt-get install -y -q --no-install-recommends qemu-system-x86' \
        >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
    echo "==> kept: $root ($(chroot "$root" qemu-system-x86_64 --version | head -1)); rm -rf $root when done"
    exit 0
fi

root=$(mktemp -d "$store/run-$release.XXXXXX")
mounted=()
cleanup() {
    local status=$?
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -R -l "${mounted[$i]}" 2>/dev/null || true
    done
    rm -rf --one-file-system "$root"
    exit $status
}
trap cleanup EXIT INT TERM

echo "==> unpacking a fresh $release chroot in $root"
tar -C "$root" -xf "$tarball"
chmod 755 "$root"  # mktemp made it 0700; as "/" it must be searchable by all
mnt() { mount "$@"; mounted+=("${!#}"); }
# "/" must be a mount point in there: ip netns exec remounts it rslave.
mnt --bind "$root" "$root"
mnt -t proc proc "$root/proc"
mnt --rbind /sys "$root/sys"
mnt --make-rslave "$root/sys"
mnt --rbind /dev "$root/dev"
mnt --make-rslave "$root/dev"
mnt -t tmpfs tmpfs "$root/run"
mnt -t tmpfs tmpfs "$root/tmp"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This workplace's egress presents its own CA: the host trusts it, so must pip here.
mkdir -p "$root/usr/local/share/ca-certificates"
cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-bundle.crt"

echo "==> a clean clone of this checkout in /src/pyvhost"
git clone -q . "$root/src/pyvhost"

case "$what" in
    readme) cmd=(bash -c 'bash scripts/demo.sh && bash scripts/test.sh "$@"' bash "$@") ;;
    demo) cmd=(bash scripts/demo.sh "$@") ;;
    test) cmd=(bash scripts/test.sh "$@") ;;
    shell) cmd=(bash -l) ;;
    *) echo "scripts/chroot.sh: '$what': use readme, demo, test or shell" >&2; exit 2 ;;
esac
echo "==> in Debian $release: ${cmd[*]}"
chroot "$root" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    TERM="${TERM:-dumb}" LANG=C.UTF-8 PIP_CERT=/usr/local/share/ca-certificates/host-bundle.crt \
    bash -c 'cd /src/pyvhost && "$@"' bash "${cmd[@]}"
