#!/bin/sh
# PID 1 of the guest: the node's filesystems, then the scenario runner, then power off (whatever happened).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1
/opt/coredump/venv/bin/python3 /project/guest/runner.py /results >/results/runner.log 2>&1 &
wait $!
echo "runner exit $?" >>/results/runner.log
sync
umount /results
echo o >/proc/sysrq-trigger
sleep 30
