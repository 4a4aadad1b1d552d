"""The v2 driver and detect() against a fake cgroupfs in tmp_path (the real kernel: tests/system, in a v2 guest)."""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path

import pytest

from jobsvc.cgroups import base, fs, v1, v2
from jobsvc.cgroups.base import CgroupSetupError, detect, locate
from jobsvc.cgroups.kill import freeze_kill_thaw
from jobsvc.cgroups.v2 import V2Driver, find_unified, started_in
from jobsvc.errors import InvalidArgumentError
from jobsvc.model import IoLimit, Limits
from tests.unit import cgroupfs

MY_PID = 4242


@pytest.fixture(autouse=True)
def cgroupfs_rmdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs, "remove_dir", cgroupfs.remove_dir)
    monkeypatch.setattr(v2, "remove_dir", cgroupfs.remove_dir)


def make_own(tmp_path: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc", procs: str = "") -> Path:
    """A delegated group as systemd makes one: its controllers available, no subtree enabled yet."""
    own = tmp_path / "cg" / "system.slice" / "jobsvc.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.type").write_text("domain\n")
    (own / "cgroup.procs").write_text(procs or f"{MY_PID}\n")
    return own


def make_proc(
    tmp_path: Path, unified: bool = True, v1_mounts: bool = False, own: str = "/system.slice/jobsvc.service"
) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    lines = ["24 30 0:22 / /sys rw - sysfs sysfs rw"]
    cgroup = []
    if v1_mounts:
        for i, c in enumerate(v1.REQUIRED):
            lines.append(f"{40 + i} 31 0:{40 + i} / {tmp_path}/v1/{c} rw - cgroup cgroup rw,{c}")
            cgroup.append(f"{i + 1}:{c}:/")
    if unified:
        lines.append(f"31 24 0:27 / {tmp_path}/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate")
    cgroup.append(f"0::{own}")
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    (proc / "cgroup").write_text("\n".join(cgroup) + "\n")
    return proc


def test_find_unified_is_the_own_group_relative_to_the_mount_root(tmp_path: Path) -> None:
    proc = make_proc(tmp_path)
    assert find_unified(proc) == (tmp_path / "cg" / "system.slice" / "jobsvc.service").resolve()
    (proc / "mountinfo").write_text(f"31 24 0:27 /system.slice {tmp_path}/cg rw - cgroup2 cgroup2 rw\n")
    assert find_unified(proc) == (tmp_path / "cg" / "jobsvc.service").resolve()  # a container's view
    (proc / "mountinfo").write_text("24 30 0:22 / /sys rw - sysfs sysfs rw\n")
    assert find_unified(proc) is None


def test_a_supervisor_leaf_counts_as_the_group_above_it(tmp_path: Path) -> None:
    own = tmp_path / "svc"
    assert started_in(own) == own
    assert started_in(own / "jobsvc" / "supervisor") == own
    assert started_in(own / "other" / "supervisor") == own / "other" / "supervisor"


def test_setup_moves_the_server_into_a_leaf_and_enables_controllers_down_to_the_instance(tmp_path: Path) -> None:
    own = make_own(tmp_path)
    driver = V2Driver.for_host("inst1", own, pid=MY_PID)
    assert list(driver.base_dirs) == [own / "jobsvc" / "inst1"]
    assert (own / "jobsvc" / "supervisor" / "cgroup.procs").read_text() == str(MY_PID)
    for group in (own, own / "jobsvc", own / "jobsvc" / "inst1"):
        assert (group / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids", group
    # a second instance in the same process (or a server it started) shares the leaf and keeps to its own group
    (own / "cgroup.procs").write_text("")
    second = V2Driver.for_host("inst2", own / "jobsvc" / "supervisor", pid=MY_PID + 1)
    assert list(second.base_dirs) == [own / "jobsvc" / "inst2"]


def test_a_group_shared_with_other_processes_is_refused_and_left_untouched(tmp_path: Path) -> None:
    own = make_own(tmp_path, procs=f"{MY_PID}\n17\n18\n")
    with pytest.raises(CgroupSetupError, match=r"also holds other processes \(17, 18\).*Delegate=yes"):
        V2Driver.for_host("inst1", own, pid=MY_PID)
    assert not (own / "jobsvc").exists()
    assert (own / "cgroup.subtree_control").read_text() == "\n"


def test_the_root_group_may_hold_other_processes(tmp_path: Path) -> None:
    own = make_own(tmp_path, procs="1\n2\n")
    (own / "cgroup.type").unlink()  # only the root group has no cgroup.type
    driver = V2Driver.for_host("inst1", own, pid=MY_PID)
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert driver.existing() == []


def test_missing_controllers_are_named_with_how_to_delegate_them(tmp_path: Path) -> None:
    own = make_own(tmp_path, controllers="memory pids")
    with pytest.raises(CgroupSetupError, match=r"not available to .*: cpu, io .*Delegate=yes"):
        V2Driver.for_host("inst1", own, pid=MY_PID)
    assert not (own / "jobsvc").exists()


def test_a_busy_group_that_refuses_controllers_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = make_own(tmp_path)
    real_write = fs.write_file  # the one v2 writes through

    def kernel(path: Path | str, value: str) -> None:
        if str(path) == str(own / "cgroup.subtree_control"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_write(path, value)

    monkeypatch.setattr(v2, "write_file", kernel)
    with pytest.raises(CgroupSetupError, match="cgroup v2 forbids"):
        V2Driver.for_host("inst1", own, pid=MY_PID)


def driver_for(tmp_path: Path) -> tuple[V2Driver, Path]:
    own = make_own(tmp_path)
    driver = V2Driver.for_host("inst1", own, pid=MY_PID)
    return driver, own / "jobsvc" / "inst1"


def test_create_writes_only_the_limits_that_are_set_in_the_v2_files(tmp_path: Path) -> None:
    driver, instance = driver_for(tmp_path)
    group = driver.create("job1", Limits(memory_bytes=64 << 20, pids=20))
    job = instance / "job1"
    assert (job / "memory.max").read_text() == str(64 << 20)
    assert (job / "pids.max").read_text() == "20"
    assert sorted(p.name for p in job.iterdir()) == ["memory.max", "pids.max"]  # no swap accounting here
    assert list(group.join_files) == [str(job / "cgroup.procs")]
    assert list(group.dirs) == [job]
    assert driver.existing() == ["job1"]


def test_cpu_swap_and_io_limits(tmp_path: Path) -> None:
    driver, instance = driver_for(tmp_path)
    (instance / "memory.swap.max").write_text("max\n")  # swap accounting on
    driver.create(
        "j",
        Limits(cpu=0.25, memory_bytes=1 << 30, io=(IoLimit("254:0", read_bps=1 << 20, write_iops=50),)),
    )
    job = instance / "j"
    assert (job / "cpu.max").read_text() == "25000 100000"
    assert (job / "memory.swap.max").read_text() == "0"  # swap counts too, as memsw on v1
    assert (job / "io.max").exists()  # what each write says: the next test


def test_io_max_names_every_set_key_for_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, _ = driver_for(tmp_path)
    writes: list[tuple[str, str]] = []
    real_write = fs.write_file  # the one v2 writes through

    def recording(path: Path | str, value: str) -> None:
        writes.append((Path(path).name, value))
        real_write(path, value)

    monkeypatch.setattr(v2, "write_file", recording)
    driver.create("j", Limits(io=(IoLimit("254:0", 1, 2, 3, 4), IoLimit("7:0", read_iops=9))))
    assert writes == [("io.max", "254:0 rbps=1 wbps=2 riops=3 wiops=4"), ("io.max", "7:0 riops=9")]


def test_a_refused_limit_fails_naming_the_field_and_removes_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, _ = driver_for(tmp_path)
    real_write = fs.write_file  # the one v2 writes through

    def refusing_kernel(path: Path | str, value: str) -> None:
        if str(path).endswith("io.max"):
            raise OSError(errno.ENODEV, "No such device")
        real_write(path, value)

    monkeypatch.setattr(v2, "write_file", refusing_kernel)
    with pytest.raises(InvalidArgumentError, match=r"io for 9:9: the kernel refused '9:9 wbps=1' \(No such device\)"):
        driver.create("bad", Limits(memory_bytes=64 << 20, io=(IoLimit("9:9", write_bps=1),)))
    assert driver.existing() == []


def test_usage_oom_and_pids_events_are_parsed(tmp_path: Path) -> None:
    driver, instance = driver_for(tmp_path)
    group = driver.create("j", Limits())
    job = instance / "j"
    (job / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 30\nnr_throttled 29\nthrottled_usec 5\n"
    )
    (job / "memory.peak").write_text("4096\n")
    (job / "io.stat").write_text(
        "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
        "7:0 rbytes=5 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n"
    )
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    (job / "pids.events").write_text("max 3\n")
    usage = group.usage()
    assert usage.cpu_seconds == 1.5
    assert usage.cpu_throttled_periods == 29
    assert usage.memory_peak_bytes == 4096
    assert (usage.io_read_bytes, usage.io_write_bytes) == (105, 200)
    assert group.oom_kills() == 2
    assert group.pids_limit_hits() == 3
    (job / "memory.peak").unlink()  # kernels before 5.19 keep no peak: none is reported, not a made-up one
    assert group.usage().memory_peak_bytes is None


def test_processes_in_groups_the_job_made_count_and_destroy_removes_those_groups(tmp_path: Path) -> None:
    driver, instance = driver_for(tmp_path)
    group = driver.create("j", Limits())
    job = instance / "j"
    (job / "cgroup.procs").write_text("10\n")
    (job / "a" / "b").mkdir(parents=True)
    (job / "a" / "cgroup.procs").write_text("11\n")
    (job / "a" / "b" / "cgroup.procs").write_text("12\n13\n")
    assert sorted(group.pids()) == [10, 11, 12, 13]
    (job / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert group.populated()


async def test_destroy_removes_nested_groups_and_the_instance_goes_last(tmp_path: Path) -> None:
    driver, instance = driver_for(tmp_path)
    group = driver.create("j", Limits())
    (instance / "j" / "a" / "b").mkdir(parents=True)
    assert await group.destroy()
    assert driver.existing() == []
    assert driver.remove_instance()
    assert not instance.exists()


async def test_freeze_kill_thaw_kills_every_process_and_always_thaws() -> None:
    procs = [subprocess.Popen(["sleep", "100"]) for _ in range(3)]
    calls: list[str] = []

    class Group:
        def pids(self) -> list[int]:
            return [p.pid for p in procs if p.poll() is None]

        def freeze(self) -> None:
            calls.append("freeze")

        def is_frozen(self) -> bool:
            return True

        def thaw(self) -> None:
            calls.append("thaw")

    try:
        assert await freeze_kill_thaw(Group())
        assert calls == ["freeze", "thaw"]
        assert [p.wait(5) for p in procs] == [-signal.SIGKILL] * 3
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_detect_prefers_v1_on_a_hybrid_host_then_v2_then_explains(tmp_path: Path) -> None:
    hybrid = make_proc(tmp_path / "h", unified=True, v1_mounts=True)
    for c in v1.REQUIRED:
        (tmp_path / "h" / "v1" / c).mkdir(parents=True)
    assert detect("inst1", hybrid).name == "cgroup v1"
    assert locate("inst1", hybrid)[0] == (tmp_path / "h" / "v1" / "cpu" / "jobsvc" / "inst1").resolve()

    pure = make_proc(tmp_path / "p", own="/")
    root = tmp_path / "p" / "cg"
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    driver = detect("inst1", pure)
    assert driver.name == "cgroup v2"
    assert list(driver.base_dirs) == [root.resolve() / "jobsvc" / "inst1"]
    assert locate("inst1", pure) == [root.resolve() / "jobsvc" / "inst1"]

    none = make_proc(tmp_path / "n", unified=False)
    with pytest.raises(CgroupSetupError, match=r"neither cgroup v1 controllers .* nor a cgroup2 filesystem"):
        detect("inst1", none)
    assert base.locate("inst1", none) == []
