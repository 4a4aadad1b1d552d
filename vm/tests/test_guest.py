"""What a VM made by vm/harness.py must be: the cgroup hierarchy asked for (JOBSVC_VM_CGROUP, v1 by
default), jobsvc running as a service from the shipped unit file, jobctl usable, and jobs in their groups
beneath the service's with their limits written. Checks marked cgroup_v1 / cgroup_v2 run only in that guest
(conftest.py)."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections.abc import Iterator

import pytest

V1_CONTROLLERS = ["cpu", "cpuacct", "memory", "blkio", "pids", "freezer"]
V2_CONTROLLERS = ["cpu", "memory", "io", "pids"]
# Kernel options that select cgroup v1 under systemd 252 (none of them may be on a v2 guest's command line).
V1_OPTIONS = ("systemd.unified_cgroup_hierarchy=", "systemd.legacy_systemd_cgroup_controller=", "cgroup_no_v1=")
PKI = "/etc/jobsvc/pki"
CLIENT_CONF = "/home/vagrant/.config/jobctl"
LISTEN = "127.0.0.1:50051"
STATE_DIR = "/var/lib/jobsvc"
SHIPPED_UNIT = "/vagrant/contrib/systemd/jobsvc.service"
# The limits every job-placement check starts its job with, and what each hierarchy must then hold.
CPU, MEMORY, PIDS = "0.5", 64 * 1024 * 1024, 16
IO = {"read_bps": 1024 * 1024, "write_bps": 2 * 1024 * 1024, "read_iops": 100, "write_iops": 200}

v1 = pytest.mark.cgroup_v1
v2 = pytest.mark.cgroup_v2


def jobctl(host, args: str, check: bool = True):
    """Run jobctl in the guest as the vagrant user, the way `vagrant ssh -c 'jobctl ...'` does."""
    cmd = host.run(f"sudo -u vagrant -H -- /usr/local/bin/jobctl {args}")
    if check:
        assert cmd.rc == 0, f"jobctl {args}: exit {cmd.rc}\n{cmd.stdout}\n{cmd.stderr}"
    return cmd


def cgroups_of(host, pid) -> dict[str, str]:
    """controller list (as in /proc/PID/cgroup, e.g. "cpu,cpuacct"; "" for the unified tree) -> group path."""
    lines = host.file(f"/proc/{pid}/cgroup").content_string.splitlines()
    return {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}


def root_disk(host) -> str:
    """The whole disk / is on (e.g. vda), as the kernel names it."""
    source = host.check_output("findmnt -n -o SOURCE /")
    return host.check_output(f"lsblk -n -d -o PKNAME {shlex.quote(source)}") or source.removeprefix("/dev/")


@contextlib.contextmanager
def job_with_limits(host) -> Iterator[tuple[dict, str]]:
    """A `sleep 300` started with jobctl and every kind of limit; yields (record, disk MAJ:MIN). Afterwards
    stops it and checks that neither its process nor its groups (the dirs the body put in `record["dirs"]`)
    outlive the stop."""
    disk = root_disk(host)
    majmin = host.check_output(f"cat /sys/class/block/{disk}/dev")
    dev = f"/dev/{disk}"
    io = (
        f"--io-read-bps {dev}={IO['read_bps']} --io-write-bps {dev}={IO['write_bps']} "
        f"--io-read-iops {dev}={IO['read_iops']} --io-write-iops {dev}={IO['write_iops']}"
    )
    record = json.loads(
        jobctl(host, f"start --json --cpu {CPU} --memory {MEMORY} --pids {PIDS} {io} -- sleep 300").stdout
    )
    record["dirs"] = []
    job_id, pid = record["id"], record["pid"]
    try:
        assert pid, record
        yield record, majmin
    finally:
        stopped = json.loads(jobctl(host, f"stop --id {job_id} --grace 1 --json").stdout)
    assert stopped["status"] != "running", stopped
    assert not host.file(f"/proc/{pid}").exists, f"job {job_id}: pid {pid} outlived stop"
    assert record["dirs"], "the check found none of the job's groups"
    for d in record["dirs"]:
        assert not host.file(d).exists, f"job {job_id}: {d} left behind"


def instance_id(host) -> str:
    """The server's instance id: the state dir's `instance` file names its subtree of groups."""
    ident = host.check_output(f"sudo cat {STATE_DIR}/instance")
    assert re.fullmatch(r"[0-9a-f]{12}", ident), f"{STATE_DIR}/instance holds {ident!r}"
    return ident


def read(host, path: str) -> str:
    return host.check_output(f"cat {shlex.quote(path)}")


# -- the hierarchy ------------------------------------------------------------------------------------------
@v1
def test_kernel_cmdline_selects_cgroup_v1(host):
    cmdline = host.file("/proc/cmdline").content_string.split()
    assert "systemd.unified_cgroup_hierarchy=0" in cmdline
    assert "systemd.legacy_systemd_cgroup_controller=1" in cmdline


@v1
def test_no_unified_hierarchy_at_the_root(host):
    fstype = host.check_output("stat -f -c %T /sys/fs/cgroup")
    assert fstype == "tmpfs", f"/sys/fs/cgroup is {fstype}: the guest booted with cgroup v2"


@v1
@pytest.mark.parametrize("controller", V1_CONTROLLERS)
def test_v1_controller_mounted(host, controller):
    # cpu and cpuacct are symlinks to a joint cpu,cpuacct mount in a Debian guest: resolve first.
    path = host.check_output(f"readlink -f /sys/fs/cgroup/{controller}")
    line = host.check_output(f"findmnt -n -o FSTYPE,OPTIONS --mountpoint {shlex.quote(path)}")
    fstype, options = line.split()
    assert fstype == "cgroup", f"{path} is {fstype}"
    assert controller in options.split(","), f"{controller} not among {options}"


@v2
def test_kernel_cmdline_has_no_cgroup_v1_options(host):
    cmdline = host.file("/proc/cmdline").content_string.split()
    assert not [o for o in cmdline if o.startswith(V1_OPTIONS)], f"v1 options on the command line: {cmdline}"


@v2
def test_unified_hierarchy_at_the_root(host):
    fstype = host.check_output("stat -f -c %T /sys/fs/cgroup")
    assert fstype == "cgroup2fs", f"/sys/fs/cgroup is {fstype}: the guest did not boot with cgroup v2"
    assert host.check_output("findmnt -n -o FSTYPE --mountpoint /sys/fs/cgroup") == "cgroup2"


@v2
def test_no_v1_hierarchy_mounted(host):
    # findmnt exits 1 when nothing matches: no cgroup (v1) filesystem anywhere, named or with controllers.
    mounted = host.run("findmnt -r -n -t cgroup -o TARGET,OPTIONS")
    assert mounted.rc == 1 and not mounted.stdout.strip(), f"cgroup v1 hierarchies mounted:\n{mounted.stdout}"
    # A process's /proc/PID/cgroup then has the unified line alone.
    assert host.file("/proc/self/cgroup").content_string.splitlines()[0].startswith("0::")
    assert len(host.file("/proc/1/cgroup").content_string.splitlines()) == 1


@v2
@pytest.mark.parametrize("controller", V2_CONTROLLERS)
def test_v2_controller_available(host, controller):
    controllers = read(host, "/sys/fs/cgroup/cgroup.controllers").split()
    assert controller in controllers, f"{controller} not in /sys/fs/cgroup/cgroup.controllers: {controllers}"


# -- the service --------------------------------------------------------------------------------------------
def test_jobsvc_service_active_and_listening(host):
    svc = host.service("jobsvc")
    assert svc.is_enabled
    assert svc.is_running, host.run("journalctl -u jobsvc --no-pager -n 30").stdout
    # grpc binds 127.0.0.1 on a dual-stack socket (ss shows [::ffff:127.0.0.1]): ask ss directly.
    port = LISTEN.rsplit(":", 1)[1]
    listening = host.check_output(f"ss -Hltn 'sport = :{port}'")
    assert re.search(rf"127\.0\.0\.1\]?:{port}\b", listening), f"nothing listens on {LISTEN}: {listening!r}"
    assert host.check_output("systemctl show -P Delegate jobsvc") == "yes"


def test_jobsvc_runs_from_the_shipped_unit_file(host):
    fragment = host.check_output("systemctl show -P FragmentPath jobsvc")
    assert fragment == "/etc/systemd/system/jobsvc.service"
    same = host.run(f"cmp {fragment} {SHIPPED_UNIT}")
    assert same.rc == 0, f"{fragment} is not the shipped {SHIPPED_UNIT}: {same.stdout}{same.stderr}"
    assert not host.file("/etc/systemd/system/jobsvc.service.d").exists, "a drop-in changes the shipped unit"


@v2
def test_v2_service_group_delegates_the_controllers(host):
    group = host.check_output("systemctl show -P ControlGroup jobsvc")
    assert group == "/system.slice/jobsvc.service"
    # The server moved itself into the supervisor leaf and gave its own group's children the controllers.
    main_pid = host.check_output("systemctl show -P MainPID jobsvc")
    assert cgroups_of(host, main_pid) == {"": f"{group}/jobsvc/supervisor"}
    for sub in ("", "/jobsvc"):
        enabled = read(host, f"/sys/fs/cgroup{group}{sub}/cgroup.subtree_control").split()
        missing = [c for c in V2_CONTROLLERS if c not in enabled]
        assert not missing, f"{group}{sub}: {missing} not in cgroup.subtree_control ({enabled})"


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


# -- a job in its groups, with its limits -------------------------------------------------------------------
@v1
def test_job_started_with_jobctl_lands_in_its_cgroup_v1(host):
    instance = instance_id(host)
    with job_with_limits(host) as (record, majmin):
        job_id, pid = record["id"], record["pid"]
        groups = cgroups_of(host, pid)
        # Beneath the server's own group in each hierarchy (systemd places the service in
        # memory, pids, blkio and cpu,cpuacct; freezer it leaves at the root).
        main_pid = host.check_output("systemctl show -P MainPID jobsvc")
        server = cgroups_of(host, main_pid)
        dirs = {}
        for controller in ("memory", "pids", "freezer", "blkio", "cpu,cpuacct"):
            path = groups.get(controller, "")
            base = server.get(controller, "?").rstrip("/")
            assert path == f"{base}/jobsvc/{instance}/{job_id}", (
                f"{controller}: pid {pid} is in {path!r}, not in its group beneath the server's {base or '/'!r}"
            )
            mount = host.check_output(f"readlink -f /sys/fs/cgroup/{controller.split(',')[0]}")
            dirs[controller] = mount + path
        record["dirs"] += dirs.values()
        cpu = dirs["cpu,cpuacct"]
        assert read(host, f"{cpu}/cpu.cfs_period_us") == "100000"
        assert read(host, f"{cpu}/cpu.cfs_quota_us") == str(round(float(CPU) * 100000))
        assert int(read(host, f"{dirs['memory']}/memory.limit_in_bytes")) == MEMORY
        assert read(host, f"{dirs['pids']}/pids.max") == str(PIDS)
        for name, value in IO.items():
            lines = read(host, f"{dirs['blkio']}/blkio.throttle.{name}_device").splitlines()
            assert f"{majmin} {value}" in lines, f"blkio.throttle.{name}_device: {lines}"


@v2
def test_job_started_with_jobctl_lands_in_its_cgroup_v2(host):
    instance = instance_id(host)
    # The service's own group as systemd made it: the server has moved itself into <group>/jobsvc/supervisor.
    service = host.check_output("systemctl show -P ControlGroup jobsvc")
    assert service.startswith("/"), service
    with job_with_limits(host) as (record, majmin):
        job_id, pid = record["id"], record["pid"]
        groups = cgroups_of(host, pid)
        assert list(groups) == [""], f"pid {pid}: not in the unified tree alone: {groups}"
        want = f"{service}/jobsvc/{instance}/{job_id}"
        assert groups[""] == want, f"pid {pid} is in {groups['']!r}, not in {want!r}"
        d = f"/sys/fs/cgroup{want}"
        record["dirs"].append(d)
        assert read(host, f"{d}/cpu.max") == f"{round(float(CPU) * 100000)} 100000"
        assert int(read(host, f"{d}/memory.max")) == MEMORY
        if host.file(f"{d}/memory.swap.max").exists:
            assert read(host, f"{d}/memory.swap.max") == "0"
        assert read(host, f"{d}/pids.max") == str(PIDS)
        keys = {"read_bps": "rbps", "write_bps": "wbps", "read_iops": "riops", "write_iops": "wiops"}
        want_io = " ".join([majmin, *(f"{key}={IO[name]}" for name, key in keys.items())])
        io_max = read(host, f"{d}/io.max").splitlines()
        assert want_io in io_max, f"io.max: {io_max}"
