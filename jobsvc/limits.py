"""Parse and validate resource limits: sizes, rates, CPU fractions, block devices. Pure except device lookup."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from jobsvc.errors import InvalidArgumentError
from jobsvc.model import IoLimit, Limits

MIN_MEMORY_BYTES = 4 * 1024 * 1024  # below this not even a shell starts
MAX_IO_DEVICES = 16
MAX_PIDS = 4 * 1024 * 1024  # the kernel's PID_MAX_LIMIT
_MAX_INT64 = 2**63 - 1

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?[bB])?\s*$")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from '512', '64K', '64M', '1.5G', '2GiB' (binary units); positive."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgumentError(f"{what}: cannot parse {text!r} (want a number with optional K, M, G or T)")
    value = float(m.group(1)) * (1 << _SHIFT[m.group(2).lower()])
    if not math.isfinite(value) or value < 1 or value > _MAX_INT64:
        raise InvalidArgumentError(f"{what}: {text!r} is out of range")
    return int(value)


def parse_cpu(text: str) -> float:
    """CPUs as a decimal: '0.25' is a quarter of one CPU."""
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(f"cpu: cannot parse {text!r} (want CPUs as a decimal, e.g. 0.5)") from None
    return value


def parse_count(text: str, what: str, minimum: int = 1, maximum: int = _MAX_INT64) -> int:
    """A whole number from minimum to maximum (by default a positive one that fits the API's integers)."""
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgumentError(f"{what}: cannot parse {text!r} (want a whole number)") from None
    if not minimum <= value <= maximum:
        raise InvalidArgumentError(f"{what}: {text} is out of range (want {minimum} to {maximum})")
    return value


def split_device_value(text: str, what: str) -> tuple[str, str]:
    """'DEV=VALUE' -> (DEV, VALUE)."""
    dev, sep, value = text.rpartition("=")
    if not sep or not dev or not value:
        raise InvalidArgumentError(f"{what}: want DEV=VALUE (e.g. /dev/vda=1M), got {text!r}")
    return dev, value


def resolve_device(text: str, sysfs: Path = Path("/sys/dev/block")) -> str:
    """A block device path or MAJ:MIN -> 'MAJ:MIN' of the whole disk (the kernel throttles disks, not partitions)."""
    if re.fullmatch(r"\d+:\d+", text):
        majmin = text
    else:
        try:
            st = os.stat(text)
        except OSError as e:
            raise InvalidArgumentError(f"io device {text!r}: {e.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise InvalidArgumentError(f"io device {text!r} is not a block device")
        majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    node = sysfs / majmin
    if not node.exists():
        raise InvalidArgumentError(f"io device {text!r} is not a block device on this host")
    if (node / "partition").exists():
        # /sys/dev/block/MAJ:MIN links to .../block/<disk>/<partition>; the disk is the parent.
        disk_dev = node.resolve().parent / "dev"
        majmin = disk_dev.read_text().strip()
    return majmin


def host_memory_bytes() -> int:
    """Physical memory of this host (a limit above it limits nothing and is refused like --cpu above the CPUs)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return _MAX_INT64


@dataclass(frozen=True)
class LimitPolicy:
    """What a server allows: defaults for unset limits and maxima a request may not exceed."""

    defaults: Limits = dataclasses.field(default_factory=Limits)
    maxima: Limits = dataclasses.field(default_factory=Limits)
    cpu_count: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    memory_total: int = dataclasses.field(default_factory=lambda: host_memory_bytes())
    min_memory_bytes: int = MIN_MEMORY_BYTES
    max_io_devices: int = MAX_IO_DEVICES


def _check_positive(value: float | int | None, what: str) -> None:
    if value is not None and not (value > 0):
        raise InvalidArgumentError(f"{what} must be positive, got {value}")


def validate(limits: Limits, policy: LimitPolicy) -> Limits:
    """Apply the policy's defaults and check every field; raise InvalidArgumentError naming the field."""
    d, mx = policy.defaults, policy.maxima
    merged = Limits(
        cpu=limits.cpu if limits.cpu is not None else d.cpu,
        memory_bytes=limits.memory_bytes if limits.memory_bytes is not None else d.memory_bytes,
        pids=limits.pids if limits.pids is not None else d.pids,
        io=limits.io or d.io,
    )
    if merged.cpu is not None:
        if not math.isfinite(merged.cpu) or merged.cpu <= 0:
            raise InvalidArgumentError(f"cpu must be a positive number of CPUs, got {merged.cpu}")
        if merged.cpu > policy.cpu_count:
            raise InvalidArgumentError(f"cpu {merged.cpu} is more than this host's {policy.cpu_count} CPUs")
        if merged.cpu * 100_000 < 1000:
            raise InvalidArgumentError(f"cpu {merged.cpu} is below the minimum of 0.01 CPU")
        if mx.cpu is not None and merged.cpu > mx.cpu:
            raise InvalidArgumentError(f"cpu {merged.cpu} exceeds the server's maximum of {mx.cpu}")
    if merged.memory_bytes is not None:
        _check_positive(merged.memory_bytes, "memory")
        if merged.memory_bytes < policy.min_memory_bytes:
            raise InvalidArgumentError(
                f"memory {merged.memory_bytes} bytes is below the minimum of {policy.min_memory_bytes} bytes"
            )
        if merged.memory_bytes > _MAX_INT64:
            raise InvalidArgumentError("memory is out of range")
        if merged.memory_bytes > policy.memory_total:
            raise InvalidArgumentError(
                f"memory {_human(merged.memory_bytes)} is more than this host's {_human(policy.memory_total)}"
            )
        if mx.memory_bytes is not None and merged.memory_bytes > mx.memory_bytes:
            raise InvalidArgumentError(
                f"memory {merged.memory_bytes} bytes exceeds the server's maximum of {mx.memory_bytes} bytes"
            )
    if merged.pids is not None:
        _check_positive(merged.pids, "pids")
        if merged.pids > MAX_PIDS:
            raise InvalidArgumentError(f"pids {merged.pids} is above the kernel's limit of {MAX_PIDS}")
        if mx.pids is not None and merged.pids > mx.pids:
            raise InvalidArgumentError(f"pids {merged.pids} exceeds the server's maximum of {mx.pids}")
    if len(merged.io) > policy.max_io_devices:
        raise InvalidArgumentError(f"io: {len(merged.io)} devices given, at most {policy.max_io_devices} allowed")
    seen: set[str] = set()
    for io in merged.io:
        if not re.fullmatch(r"\d+:\d+", io.device):
            raise InvalidArgumentError(f"io device {io.device!r} must be MAJ:MIN")
        if io.device in seen:
            raise InvalidArgumentError(f"io device {io.device} given twice")
        seen.add(io.device)
        for name in ("read_bps", "write_bps", "read_iops", "write_iops"):
            value = getattr(io, name)
            _check_positive(value, f"io {name} for {io.device}")
            if value is not None and value > _MAX_INT64:
                raise InvalidArgumentError(f"io {name} for {io.device} is out of range")
    return merged


def _human(n: int) -> str:
    """Bytes in the largest binary unit that keeps one decimal (for messages)."""
    value, unit = float(n), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def merge_io(entries: list[tuple[str, str, int]]) -> tuple[IoLimit, ...]:
    """[(device MAJ:MIN, field, value)] -> one IoLimit per device, in first-seen order."""
    by_dev: dict[str, dict[str, int]] = {}
    for dev, name, value in entries:
        fields = by_dev.setdefault(dev, {})
        if name in fields:
            raise InvalidArgumentError(f"io {name} for {dev} given twice")
        fields[name] = value
    return tuple(IoLimit(device=dev, **fields) for dev, fields in by_dev.items())


def resolve_devices(limits: Limits) -> Limits:
    """Each io entry's device (path or MAJ:MIN) as MAJ:MIN of its whole disk."""
    if not limits.io:
        return limits
    if len(limits.io) > MAX_IO_DEVICES:
        raise InvalidArgumentError(f"io: {len(limits.io)} devices given, at most {MAX_IO_DEVICES} allowed")
    return dataclasses.replace(
        limits, io=tuple(dataclasses.replace(io, device=resolve_device(io.device)) for io in limits.io)
    )


_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}|(?:{_NUMBER}\s*(?:ms|s|m|h|d)\s*)+)")
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d)")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION = 10 * 365 * 86400.0


def parse_duration(text: str, what: str = "duration", allow_zero: bool = False) -> float:
    """Seconds from '90', '90s', '1.5m', '1m30s', '2h', '7d', '250ms'; positive (or zero when allowed)."""
    s = text.strip()
    if not _DURATION_RE.fullmatch(s):
        raise InvalidArgumentError(f"{what}: cannot parse {text!r} (want seconds or e.g. 90s, 1m30s, 5m, 2h, 7d)")
    if re.fullmatch(_NUMBER, s):
        seconds = float(s)
    else:
        seconds = sum(float(n) * _DURATION_UNIT[unit] for n, unit in _DURATION_PART.findall(s))
    if not (seconds >= 0 if allow_zero else seconds > 0) or seconds >= MAX_DURATION:
        raise InvalidArgumentError(f"{what}: {text!r} is out of range")
    return seconds
