#!/bin/busybox sh
# pyvhost's guest init: load virtio-net, configure eth0 from the kernel command
# line, then run commands read from the serial console, one per line, each
# followed by a marker with its exit status.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run
arg() { sed -n "s/.*pyvhost\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
# Each role's modules, in the load order found when the image was built.
for role in net $(arg modules | tr , ' '); do
    while read -r m; do
        grep -q "^$m " /proc/modules || insmod /lib/modules/$m.ko \
            || echo "PYVHOST-ERROR insmod $m"
    done < /lib/modules/$role.order
done
IP=$(arg ip)
HOSTROOT=$(arg hostroot)
ip link set lo up
if [ -n "$IP" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    ip addr add "$IP" dev eth0
    ip link set eth0 up
fi
# With pyvhost.hostroot=TAG, the host's root (virtio-9p, read-only) becomes
# this guest's: commands run chrooted in it, with the host's programs and
# this guest's kernel (vhost-net included), /proc, /sys, /dev and a tmpfs
# for scratch (TMPDIR).
RUN=""
if [ -n "$HOSTROOT" ]; then
    mkdir -p /host
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose \
        "$HOSTROOT" /host || echo "PYVHOST-ERROR mount $HOSTROOT"
    mount -t proc proc /host/proc
    mount -t sysfs sys /host/sys
    mount -t devtmpfs dev /host/dev
    mkdir -p /host/dev/shm /host/dev/pts
    mount -t tmpfs shm /host/dev/shm
    mount -t devpts devpts /host/dev/pts
    # Scratch space on a tmpfs under /run: the host's /tmp stays visible
    # (read-only), a checkout there included.
    mount -t tmpfs run /host/run
    mkdir -p /host/run/tmp
    RUN="chroot /host /usr/bin/env -i HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
        TMPDIR=/run/tmp PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
fi
stty -echo -icanon -F /dev/console 2>/dev/null || stty -echo
echo "PYVHOST-READY $(cut -d' ' -f1 /proc/uptime)"
while read -r line; do
    $RUN sh -c "$line"
    echo "PYVHOST-DONE $?"
done
echo "PYVHOST-EOF"
poweroff -f
