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
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
if [ -n "$IP" ]; then
    ip addr add "$IP" dev eth0
fi
ip link set eth0 up
stty -echo -icanon -F /dev/console 2>/dev/null || stty -echo
echo "PYVHOST-READY $(cut -d' ' -f1 /proc/uptime)"
while read -r line; do
    sh -c "$line"
    echo "PYVHOST-DONE $?"
done
echo "PYVHOST-EOF"
poweroff -f
