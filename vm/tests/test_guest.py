"""What a VM made by vm/harness.py must be: cgroup v1, jobsvc running as a service, jobctl usable."""

from __future__ import annotations

import json
import re
import shlex

import pytest

CONTROLLERS = ["cpu", "cpuacct", "memory", "blkio", "pids", "freezer"]
PKI = "/etc/jobsvc/pki"
CLIENT_CONF = "/home/vagrant/.config/jobctl"
LISTEN = "127.0.0.1:50051"


def jobctl(host, args: str, check: bool = True):
    """Run jobctl in the guest as the vagrant user, the way `vagrant ssh -c 'jobctl ...'` does."""
    cmd = host.run(f"sudo -u vagrant -H -- /usr/local/bin/jobctl {args}")
    if check:
        assert cmd.rc == 0, f"jobctl {args}: exit {cmd.rc}\n{cmd.stdout}\n{cmd.stderr}"
    return cmd


def cgroups_of(host, pid) -> dict[str, str]:
    """controller list (as in /proc/PID/cgroup, e.g. "cpu,cpuacct") -> group path."""
    lines = host.file(f"/proc/{pid}/cgroup").content_string.splitlines()
    return {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}


def test_kernel_cmdline_selects_cgroup_v1(host):
    cmdline = host.file("/proc/cmdline").content_string.split()
    assert "systemd.unified_cgroup_hierarchy=0" in cmdline
    assert "systemd.legacy_systemd_cgroup_controller=1" in cmdline


def test_no_unified_hierarchy_at_the_root(host):
    fstype = host.check_output("stat -f -c %T /sys/fs/cgroup")
    assert fstype == "tmpfs", f"/sys/fs/cgroup is {fstype}: the guest booted with cgroup v2"


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_v1_controller_mounted(host, controller):
    # cpu and cpuacct are symlinks to a joint cpu,cpuacct mount in a Debian guest: resolve first.
    path = host.check_output(f"readlink -f /sys/fs/cgroup/{controller}")
    line = host.check_output(f"findmnt -n -o FSTYPE,OPTIONS --mountpoint {shlex.quote(path)}")
    fstype, options = line.split()
    assert fstype == "cgroup", f"{path} is {fstype}"
    assert controller in options.split(","), f"{controller} not among {options}"


def test_jobsvc_service_active_and_listening(host):
    svc = host.service("jobsvc")
    assert svc.is_enabled
    assert svc.is_running, host.run("journalctl -u jobsvc --no-pager -n 30").stdout
    # grpc binds 127.0.0.1 on a dual-stack socket (ss shows [::ffff:127.0.0.1]): ask ss directly.
    port = LISTEN.rsplit(":", 1)[1]
    listening = host.check_output(f"ss -Hltn 'sport = :{port}'")
    assert re.search(rf"127\.0\.0\.1\]?:{port}\b", listening), f"nothing listens on {LISTEN}: {listening!r}"
    assert host.check_output("systemctl show -P Delegate jobsvc") == "yes"


def test_private_keys_are_0600(host):
    keys = host.check_output(f"ls {PKI}/*-key.pem").split()
    assert f"{PKI}/server-key.pem" in keys
    for key in keys:
        f = host.file(key)
        assert f.mode == 0o600, f"{key} has mode {oct(f.mode)}"
        assert f.user == "root"
    client_key = host.file(f"{CLIENT_CONF}/client-key.pem")
    assert client_key.mode == 0o600
    assert client_key.user == "vagrant"


def test_jobctl_round_trip(host):
    out = jobctl(host, "run -- echo hello-from-the-vm")
    assert out.stdout.strip() == "hello-from-the-vm"
    listed = json.loads(jobctl(host, "list --json").stdout)
    assert any(r["command"] == ["echo", "hello-from-the-vm"] and r["exit_code"] == 0 for r in listed)


def test_job_started_with_jobctl_lands_in_its_cgroup(host):
    record = json.loads(jobctl(host, "start --json --memory 64M --pids 16 -- sleep 300").stdout)
    job_id, pid = record["id"], record["pid"]
    mem_dir = ""
    try:
        assert pid, record
        groups = cgroups_of(host, pid)
        # Beneath the server's own group in each hierarchy (systemd places the service in
        # memory, pids, blkio and cpu,cpuacct; freezer it leaves at the root).
        main_pid = host.check_output("systemctl show -P MainPID jobsvc")
        server = cgroups_of(host, main_pid)
        for controller in ("memory", "pids", "freezer", "blkio", "cpu,cpuacct"):
            path = groups.get(controller, "")
            base = server.get(controller, "?").rstrip("/")
            assert path.endswith(f"/{job_id}"), f"{controller}: pid {pid} is in {path!r}"
            assert path.startswith(f"{base}/jobsvc/"), (
                f"{controller}: {path!r} is not beneath the server's group {base or '/'!r}"
            )
        mem_dir = host.check_output("readlink -f /sys/fs/cgroup/memory") + groups["memory"]
        assert int(host.check_output(f"cat {mem_dir}/memory.limit_in_bytes")) == 64 * 1024 * 1024
        pids_dir = host.check_output("readlink -f /sys/fs/cgroup/pids") + groups["pids"]
        assert host.check_output(f"cat {pids_dir}/pids.max") == "16"
    finally:
        stopped = json.loads(jobctl(host, f"stop --id {job_id} --grace 1 --json").stdout)
    assert stopped["status"] != "running", stopped
    assert not host.file(f"/proc/{pid}").exists, f"job {job_id}: pid {pid} outlived stop"
    assert mem_dir and not host.file(mem_dir).exists, f"job {job_id}: {mem_dir} left behind"
