"""The v1 driver against a fake cgroupfs in tmp_path (the real kernel is in tests/system)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobsvc.cgroups.base import CgroupSetupError
from jobsvc.cgroups.v1 import REQUIRED, V1Driver, find_hierarchies
from jobsvc.model import IoLimit, Limits
from tests.unit import cgroupfs

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / {root}/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 /nested {root}/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
CGROUP = """\
8:pids:/
7:blkio:/nested/svc
6:freezer:/
4:memory:/supervisor/abc
2:cpuacct:/
1:cpu:/
0::/
"""


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    root = tmp_path / "cg"
    (proc / "mountinfo").write_text(MOUNTINFO.format(root=root))
    (proc / "cgroup").write_text(CGROUP)
    return proc


def test_find_hierarchies_uses_own_group_relative_to_the_mount_root(fake_proc: Path, tmp_path: Path) -> None:
    root = tmp_path / "cg"
    own = find_hierarchies(fake_proc)
    assert own["memory"] == root / "memory" / "supervisor" / "abc"
    assert own["cpu"] == root / "cpu"
    assert own["blkio"] == root / "blkio" / "svc"  # the mount shows /nested as its root
    assert set(own) == set(REQUIRED)


def test_joint_cpu_cpuacct_mount_is_one_hierarchy(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(f"32 31 0:29 / {tmp_path}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
    (proc / "cgroup").write_text("3:cpu,cpuacct:/system.slice\n")
    own = find_hierarchies(proc)
    assert own["cpu"] == own["cpuacct"] == tmp_path / "cpu,cpuacct" / "system.slice"


@pytest.fixture(autouse=True)
def cgroupfs_rmdir(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobsvc.cgroups import fs, v1

    monkeypatch.setattr(v1, "remove_dir", cgroupfs.remove_dir)
    monkeypatch.setattr(fs, "remove_dir", cgroupfs.remove_dir)


def make_driver(tmp_path: Path, shared_cpu: bool = False) -> V1Driver:
    own: dict[str, Path] = {}
    for c in REQUIRED:
        name = "cpu,cpuacct" if shared_cpu and c in ("cpu", "cpuacct") else c
        own[c] = tmp_path / "cg" / name / "own"
    return V1Driver.for_host("inst1", own)


def test_create_writes_only_the_limits_that_are_set(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    group = driver.create("job1", Limits(memory_bytes=64 << 20, pids=20))
    base = tmp_path / "cg"
    assert (base / "memory/own/jobsvc/inst1/job1/memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (base / "pids/own/jobsvc/inst1/job1/pids.max").read_text() == "20"
    assert not (base / "cpu/own/jobsvc/inst1/job1/cpu.cfs_quota_us").exists()
    assert not list((base / "blkio/own/jobsvc/inst1/job1").iterdir())
    assert len(group.join_files) == len(REQUIRED)
    assert driver.existing() == ["job1"]


def test_cpu_and_io_limits(tmp_path: Path) -> None:
    driver = make_driver(tmp_path, shared_cpu=True)
    group = driver.create("j", Limits(cpu=0.25, io=(IoLimit("254:0", read_bps=1 << 20, write_iops=50),)))
    cpu = tmp_path / "cg/cpu,cpuacct/own/jobsvc/inst1/j"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    blkio = tmp_path / "cg/blkio/own/jobsvc/inst1/j"
    assert (blkio / "blkio.throttle.read_bps_device").read_text() == f"254:0 {1 << 20}"
    assert (blkio / "blkio.throttle.write_iops_device").read_text() == "254:0 50"
    assert len(group.join_files) == len(REQUIRED) - 1  # cpu and cpuacct share one directory


def test_usage_and_oom_counter_are_parsed(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    group = driver.create("j", Limits())
    base = tmp_path / "cg"
    (base / "cpuacct/own/jobsvc/inst1/j/cpuacct.usage").write_text("1500000000\n")
    (base / "cpu/own/jobsvc/inst1/j/cpu.stat").write_text("nr_periods 30\nnr_throttled 29\nthrottled_time 5\n")
    (base / "memory/own/jobsvc/inst1/j/memory.max_usage_in_bytes").write_text("4096\n")
    (base / "memory/own/jobsvc/inst1/j/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (base / "blkio/own/jobsvc/inst1/j/blkio.throttle.io_service_bytes").write_text(
        "254:0 Read 100\n254:0 Write 200\n254:0 Total 300\n7:0 Read 5\nTotal 305\n"
    )
    usage = group.usage()
    assert usage.cpu_seconds == 1.5
    assert usage.cpu_throttled_periods == 29
    assert usage.memory_peak_bytes == 4096
    assert (usage.io_read_bytes, usage.io_write_bytes) == (105, 200)
    assert group.oom_kills() == 2


def test_missing_controller_is_a_clear_setup_error(tmp_path: Path) -> None:
    own = {c: tmp_path / c for c in REQUIRED if c != "pids"}
    with pytest.raises(CgroupSetupError, match="pids"):
        V1Driver.for_host("x", own)


def test_a_refused_limit_fails_naming_the_field_and_removes_the_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from jobsvc.cgroups import fs, v1
    from jobsvc.errors import InvalidArgumentError

    real_write = fs.write_file  # the one v1 writes through

    def refusing_kernel(path: Path | str, value: str) -> None:
        if str(path).endswith("pids.max"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write(path, value)

    monkeypatch.setattr(v1, "write_file", refusing_kernel)
    driver = make_driver(tmp_path)
    with pytest.raises(InvalidArgumentError, match="pids: the kernel refused '20'"):
        driver.create("bad", Limits(memory_bytes=64 << 20, pids=20))
    assert driver.existing() == []
    assert not (tmp_path / "cg/memory/own/jobsvc/inst1/bad").exists()


async def test_destroy_removes_groups_a_root_job_made_beneath_its_own(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    group = driver.create("j", Limits())
    for d in group.dirs:
        (d / "sub" / "deeper").mkdir(parents=True)
    assert await group.destroy()
    assert driver.existing() == []
    assert not any(d.exists() for d in group.dirs)


def test_pids_limit_hits_and_processes_in_sub_groups_are_read(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    group = driver.create("j", Limits(pids=5))
    base = tmp_path / "cg"
    assert group.pids_limit_hits() == 0
    (base / "pids/own/jobsvc/inst1/j/pids.events").write_text("max 3\n")
    assert group.pids_limit_hits() == 3
    freezer = base / "freezer/own/jobsvc/inst1/j"
    (freezer / "cgroup.procs").write_text("10\n11\n")
    (freezer / "sub").mkdir()
    (freezer / "sub" / "cgroup.procs").write_text("12\n")
    assert sorted(group.pids()) == [10, 11, 12]


async def test_a_group_with_no_groups_beneath_is_removed_without_listing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobsvc.cgroups import fs

    driver = make_driver(tmp_path)
    group = driver.create("j", Limits())
    walked: list[Path] = []
    real_walk = fs.groups_below

    def groups_below(path: Path) -> list[Path]:
        walked.append(path)
        return real_walk(path)

    monkeypatch.setattr(fs, "groups_below", groups_below)
    assert await group.destroy()
    assert walked == []  # one rmdir per hierarchy, no walk
    assert not any(d.exists() for d in group.dirs)


def test_a_link_in_a_group_is_not_taken_for_a_group_beneath_it(tmp_path: Path) -> None:
    from jobsvc.cgroups.fs import groups_below

    group = tmp_path / "g"
    (group / "sub").mkdir(parents=True)
    (group / "cgroup.procs").write_text("")
    (group / "link").symlink_to(tmp_path)  # cgroupfs has none; a link must not lead the walk elsewhere
    assert groups_below(group) == [group / "sub"]
