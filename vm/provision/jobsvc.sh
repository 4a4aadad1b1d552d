#!/bin/bash
# Install jobsvc in the guest from the host-built wheelhouse (the guest has no network), create a
# dev PKI, run `jobsvc serve` as a systemd service from the shipped unit file
# (contrib/systemd/jobsvc.service, synced to /vagrant) and put a `jobctl` on PATH that talks to it.
# Idempotent: `vagrant provision` re-installs the project and restarts the service.
# JOBSVC_CGROUP (v1 | v2, set by the Vagrantfile) is the hierarchy the guest must have booted with.
set -euo pipefail

WHEELHOUSE=/var/cache/jobsvc-wheelhouse
VENV=/opt/jobsvc/venv
PKI=/etc/jobsvc/pki
LISTEN=127.0.0.1:50051
CLIENT_USER=vagrant
UNIT=/vagrant/contrib/systemd/jobsvc.service
CGROUP=${JOBSVC_CGROUP:-v1}

fail() { echo "provision: $*" >&2; exit 1; }

fstype=$(stat -f -c %T /sys/fs/cgroup)
case "$CGROUP" in
v1)
    grep -q 'systemd.unified_cgroup_hierarchy=0' /proc/cmdline \
        || fail "the guest is not booted with cgroup v1 (kernel cmdline: $(cat /proc/cmdline))"
    [ "$fstype" = tmpfs ] || fail "cgroup v1 requested, but /sys/fs/cgroup is $fstype"
    ;;
v2)
    family=$(cat /sys/class/dmi/id/product_family 2>/dev/null || true)
    [ "$fstype" = cgroup2fs ] || fail "cgroup v2 requested, but /sys/fs/cgroup is $fstype (SMBIOS system family" \
        "'$family', which grub reads to pick the v2 entry; kernel cmdline: $(cat /proc/cmdline))"
    controllers=$(cat /sys/fs/cgroup/cgroup.controllers)
    for c in cpu memory io pids; do
        [[ " $controllers " == *" $c "* ]] || fail "cgroup v2: controller $c missing from /sys/fs/cgroup (has: $controllers)"
    done
    ;;
*) fail "JOBSVC_CGROUP=$CGROUP: want v1 or v2" ;;
esac
echo "provision: booted with cgroup $CGROUP (/sys/fs/cgroup is $fstype)"
[ -f "$UNIT" ] || fail "no unit file at $UNIT: is the repo synced to /vagrant?"
for want in "$VENV/bin/jobsvc serve" "--listen $LISTEN" "$PKI/ca.pem" "Delegate=yes"; do
    grep -qF -- "$want" "$UNIT" || fail "$UNIT does not have '$want': this script and the unit file disagree"
done
[ -f "$WHEELHOUSE/requirements.txt" ] \
    || fail "no wheelhouse at $WHEELHOUSE: run the harness (make vm-test) or set JOBSVC_WHEELHOUSE"

echo "provision: installing jobsvc into $VENV from the wheelhouse"
# Under TCG, ensurepip costs ~30 s and byte-compiling every installed module ~30 s more: make
# the venv without pip, run pip straight from its wheel, and leave compiling to first import.
pip_whl=$(ls "$WHEELHOUSE"/pip-*.whl | sort -V | tail -n 1)
reprovision=0
if [ -x "$VENV/bin/python" ]; then reprovision=1; else python3 -m venv --without-pip "$VENV"; fi
pip=("$VENV/bin/python" "$pip_whl/pip" install --quiet --disable-pip-version-check --no-index
     --no-compile --find-links "$WHEELHOUSE")
"${pip[@]}" pip -r "$WHEELHOUSE/requirements.txt"
if [ "$reprovision" = 1 ]; then
    # The project's version does not change with every edit: take the freshly built wheel.
    "${pip[@]}" --force-reinstall --no-deps "$WHEELHOUSE"/jobsvc-*.whl
fi

echo "provision: dev PKI in $PKI"
if [ ! -f "$PKI/ca.pem" ]; then
    rm -rf "$PKI.tmp"
    "$VENV/bin/jobsvc" pki init "$PKI.tmp" --user "$CLIENT_USER" --user alice --user bob
    mv "$PKI.tmp" "$PKI"
fi
chown -R root:root "$PKI"
chmod 0755 "$PKI"
chmod 0644 "$PKI"/*.pem
chmod 0600 "$PKI"/*-key.pem

# The client identity of the vagrant user, readable by it alone.
home=$(getent passwd "$CLIENT_USER" | cut -d: -f6)
conf="$home/.config/jobctl"
install -d -m 0700 -o "$CLIENT_USER" -g "$CLIENT_USER" "$home/.config" "$conf"
install -m 0644 -o "$CLIENT_USER" -g "$CLIENT_USER" "$PKI/ca.pem" "$conf/ca.pem"
install -m 0644 -o "$CLIENT_USER" -g "$CLIENT_USER" "$PKI/$CLIENT_USER.pem" "$conf/client.pem"
install -m 0600 -o "$CLIENT_USER" -g "$CLIENT_USER" "$PKI/$CLIENT_USER-key.pem" "$conf/client-key.pem"

cat > /usr/local/bin/jobctl <<WRAPPER
#!/bin/sh
# jobctl pointed at this VM's jobsvc service with the calling user's dev certificate. Only
# defaults: JOBCTL_* variables and command-line options still win.
conf="\${JOBCTL_CONFIG_DIR:-\$HOME/.config/jobctl}"
export JOBCTL_TARGET="\${JOBCTL_TARGET:-$LISTEN}"
export JOBCTL_CA_CERT="\${JOBCTL_CA_CERT:-\$conf/ca.pem}"
export JOBCTL_CLIENT_CERT="\${JOBCTL_CLIENT_CERT:-\$conf/client.pem}"
export JOBCTL_CLIENT_KEY="\${JOBCTL_CLIENT_KEY:-\$conf/client-key.pem}"
exec $VENV/bin/jobctl "\$@"
WRAPPER
chmod 0755 /usr/local/bin/jobctl

echo "provision: installing $UNIT as jobsvc.service"
install -m 0644 "$UNIT" /etc/systemd/system/jobsvc.service

systemctl daemon-reload
systemctl enable --quiet jobsvc.service
systemctl restart jobsvc.service

echo "provision: waiting for jobsvc on $LISTEN"
port=${LISTEN##*:}
for _ in $(seq 1 120); do
    if ss -Hltn "sport = :$port" | grep -q LISTEN; then
        echo "provision: jobsvc is listening on $LISTEN"
        exit 0
    fi
    systemctl is-failed --quiet jobsvc.service && break
    sleep 1
done
systemctl status --no-pager jobsvc.service || true
journalctl -u jobsvc.service --no-pager -n 50 || true
fail "jobsvc did not start listening on $LISTEN"
