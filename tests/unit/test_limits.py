from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobsvc.errors import InvalidArgumentError
from jobsvc.limits import LimitPolicy, merge_io, parse_cpu, parse_size, resolve_device, validate
from jobsvc.model import IoLimit, Limits

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("64K", 64 << 10),
        ("64M", 64 * MiB),
        ("64m", 64 * MiB),
        ("1.5G", 3 << 29),
        ("2GiB", 2 << 30),
        ("10MB", 10 * MiB),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5M", "0", "5X", "1e9", "M", "0.1"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="memory"):
        parse_size(text, "memory")


def test_parse_cpu() -> None:
    assert parse_cpu("0.25") == 0.25
    with pytest.raises(InvalidArgumentError, match="cpu"):
        parse_cpu("lots")


POLICY = LimitPolicy(cpu_count=2)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (Limits(cpu=0), "cpu"),
        (Limits(cpu=-1), "cpu"),
        (Limits(cpu=float("nan")), "cpu"),
        (Limits(cpu=3), "cpu"),
        (Limits(cpu=0.001), "cpu"),
        (Limits(memory_bytes=0), "memory"),
        (Limits(memory_bytes=-1), "memory"),
        (Limits(memory_bytes=MiB), "memory"),
        (Limits(memory_bytes=1 << 70), "memory"),
        (Limits(pids=0), "pids"),
        (Limits(pids=-3), "pids"),
        (Limits(pids=1 << 40), "pids"),
        (Limits(io=(IoLimit("8:0", read_bps=0),)), "read_bps"),
        (Limits(io=(IoLimit("8:0", write_iops=-1),)), "write_iops"),
        (Limits(io=(IoLimit("sda", write_iops=1),)), "io device"),
        (Limits(io=tuple(IoLimit(f"8:{i}", read_bps=1) for i in range(17))), "io"),
        (Limits(io=(IoLimit("8:0", read_bps=1), IoLimit("8:0", write_bps=1))), "twice"),
    ],
)
def test_validate_refuses_naming_the_field(limits: Limits, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        validate(limits, POLICY)


def test_defaults_fill_unset_fields_and_maxima_refuse() -> None:
    policy = LimitPolicy(
        defaults=Limits(memory_bytes=256 * MiB, pids=100),
        maxima=Limits(cpu=1.0, memory_bytes=512 * MiB, pids=500),
        cpu_count=2,
    )
    assert validate(Limits(pids=7), policy) == Limits(memory_bytes=256 * MiB, pids=7)
    with pytest.raises(InvalidArgumentError, match=r"maximum of 1\.0"):
        validate(Limits(cpu=1.5), policy)
    with pytest.raises(InvalidArgumentError, match="maximum of 536870912"):
        validate(Limits(memory_bytes=1024 * MiB), policy)
    with pytest.raises(InvalidArgumentError, match="maximum of 500"):
        validate(Limits(pids=501), policy)


def test_merge_io_groups_by_device() -> None:
    merged = merge_io([("8:0", "read_bps", 5), ("8:16", "write_iops", 3), ("8:0", "write_bps", 7)])
    assert merged == (IoLimit("8:0", read_bps=5, write_bps=7), IoLimit("8:16", write_iops=3))
    with pytest.raises(InvalidArgumentError, match="twice"):
        merge_io([("8:0", "read_bps", 5), ("8:0", "read_bps", 6)])


def test_resolve_device_maps_partitions_to_their_disk(tmp_path: Path) -> None:
    # A fake /sys/dev/block: 8:1 is a partition of the disk 8:0.
    disk = tmp_path / "devices" / "sda"
    part = disk / "sda1"
    part.mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (part / "dev").write_text("8:1\n")
    (part / "partition").write_text("1\n")
    sysfs = tmp_path / "dev-block"
    sysfs.mkdir()
    os.symlink(disk, sysfs / "8:0")
    os.symlink(part, sysfs / "8:1")
    assert resolve_device("8:0", sysfs) == "8:0"
    assert resolve_device("8:1", sysfs) == "8:0"
    with pytest.raises(InvalidArgumentError, match="not a block device"):
        resolve_device("9:9", sysfs)
    with pytest.raises(InvalidArgumentError, match="not a block device"):
        resolve_device(str(tmp_path / "devices" / "sda" / "dev"), sysfs)
    with pytest.raises(InvalidArgumentError, match="No such file"):
        resolve_device("/dev/does-not-exist", sysfs)


def test_memory_above_the_hosts_is_refused() -> None:
    policy = LimitPolicy(cpu_count=2, memory_total=8 << 30)
    assert validate(Limits(memory_bytes=8 << 30), policy).memory_bytes == 8 << 30
    with pytest.raises(InvalidArgumentError, match=r"memory 8\.0 GiB is more than this host's 8\.0 GiB") as e:
        validate(Limits(memory_bytes=(8 << 30) + 1), policy)
    assert "memory" in e.value.message
    assert LimitPolicy().memory_total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("1m30s", 90), ("2m", 120), ("1.5m", 90), ("250ms", 0.25), ("1h 30m", 5400)],
)
def test_durations_read_alike(text: str, seconds: float) -> None:
    from jobsvc.limits import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1m30", "m5", "-1", "0", "1e400", "nan", "1x"])
def test_bad_durations(text: str) -> None:
    from jobsvc.limits import parse_duration

    with pytest.raises(InvalidArgumentError, match="timeout"):
        parse_duration(text, "timeout")


def test_counts_are_bounded() -> None:
    from jobsvc.limits import parse_count

    assert parse_count("3", "iops") == 3
    for text in ("-3", "0", str(2**63)):
        with pytest.raises(InvalidArgumentError, match=r"iops: .* out of range"):
            parse_count(text, "iops")
