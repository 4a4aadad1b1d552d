#!/bin/sh
# For a public box (JOBSVC_BOX): bring the packages the local box bakes in and, for cgroup v1
# (JOBSVC_CGROUP, set by the Vagrantfile), put v1 on the kernel command line. Vagrant reboots the
# guest after this script for v1 (reboot: in the Vagrantfile); public boxes boot cgroup v2 as they are.
set -eu
cgroup=${JOBSVC_CGROUP:-v1}
args="systemd.unified_cgroup_hierarchy=0 systemd.legacy_systemd_cgroup_controller=1"
if [ "$cgroup" = v1 ] && ! grep -q 'systemd.unified_cgroup_hierarchy=0' /etc/default/grub; then
    sed -i "s/^GRUB_CMDLINE_LINUX=\"\(.*\)\"/GRUB_CMDLINE_LINUX=\"\1 $args\"/" /etc/default/grub
    update-grub
fi
missing=""
for pkg in python3-venv rsync make cgroup-tools; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -q --no-install-recommends $missing
fi
