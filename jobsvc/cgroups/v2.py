"""cgroup v2: one unified tree, controllers enabled through cgroup.subtree_control.

Layout beneath the group the server was started in (its delegated group, systemd's Delegate=yes):

    <own>/                     no processes of ours: controllers are enabled here for the children
      jobsvc/
        supervisor/            the server and its spawn helper (a leaf: "no internal processes")
        <instance>/
          <job id>/            one job, its limits in cpu.max, memory.max, io.max, pids.max

A group that has processes cannot give controllers to its children, so the server moves itself into the
supervisor leaf before it enables anything, and never leaves its own subtree [systemd: Control Group APIs and
Delegation]. Several jobsvc processes started in one group share the leaf; each keeps to its own instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from jobsvc.cgroups.base import CgroupSetupError
from jobsvc.cgroups.fs import (
    read_file,
    read_key,
    read_pids,
    read_pids_tree,
    remove_dir,
    remove_tree,
    write_file,
)
from jobsvc.cgroups.kill import freeze_kill_thaw, kill_until_empty, remove_with_retry, signal_pids
from jobsvc.errors import InvalidArgumentError
from jobsvc.model import Limits, Usage

REQUIRED = ("cpu", "memory", "io", "pids")
CPU_PERIOD_US = 100_000
SUPERVISOR = "supervisor"
_IO_KEYS = (("read_bps", "rbps"), ("write_bps", "wbps"), ("read_iops", "riops"), ("write_iops", "wiops"))
_DELEGATION_HINT = (
    "run jobsvc in a cgroup of its own with the controllers delegated: a systemd service with Delegate=yes "
    "(contrib/systemd/jobsvc.service), or `systemd-run --scope -p Delegate=yes jobsvc serve ...`"
)


def find_unified(proc: Path = Path("/proc/self")) -> Path | None:
    """The directory of this process's group in the cgroup2 tree, or None when no cgroup2 is mounted."""
    try:
        mountinfo = read_file(proc / "mountinfo")
        own_cgroups = read_file(proc / "cgroup")
    except OSError:
        return None
    mount: tuple[Path, str] | None = None
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if sep and tail and tail[0] == "cgroup2":
            mount = (Path(fields[4].replace("\\040", " ")), fields[3])
            break
    own = next((line[3:] for line in own_cgroups.splitlines() if line.startswith("0::")), None)
    if mount is None or own is None:
        return None
    mount_dir, mount_root = mount
    rel = os.path.relpath(own, mount_root)
    return (mount_dir / rel).resolve() if rel != "." else mount_dir.resolve()


def started_in(current: Path) -> Path:
    """The group a jobsvc process was started in: its current group, unless that is already a supervisor leaf
    (moved there by itself or by the jobsvc process that started it), whose grandparent it then is."""
    if current.name == SUPERVISOR and current.parent.name == "jobsvc":
        return current.parent.parent
    return current


def _controllers(group: Path, file: str = "cgroup.controllers") -> set[str]:
    try:
        return set(read_file(group / file).split())
    except FileNotFoundError:
        return set()


def _enable(group: Path, controllers: Sequence[str]) -> None:
    """Give the children of group the controllers (idempotent)."""
    missing = [c for c in controllers if c not in _controllers(group, "cgroup.subtree_control")]
    if not missing:
        return
    try:
        write_file(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
    except OSError as e:
        if e.errno == errno.EBUSY:
            others = read_pids(group / "cgroup.procs")
            raise CgroupSetupError(
                f"cannot enable {', '.join(missing)} for the groups beneath {group}: it holds processes "
                f"({', '.join(map(str, others[:5])) or 'none listed'}), which cgroup v2 forbids beside delegated "
                f"controllers; {_DELEGATION_HINT}"
            ) from None
        raise CgroupSetupError(f"cannot enable {', '.join(missing)} in {group}: {e.strerror}") from None


def _is_root(group: Path) -> bool:
    # The root group has no cgroup.type (nor cgroup.events): it alone may hold processes and delegate.
    return not (group / "cgroup.type").exists()


def claim(own: Path, pid: int) -> Path:
    """Move process pid into own/jobsvc/supervisor and give own/jobsvc the controllers; returns own/jobsvc.

    Refuses before it changes anything when own holds processes that are not jobsvc's (a refusal by the kernel
    after the move leaves this process in the leaf): cgroup v2 would then refuse the
    controllers, and moving someone else's processes is not ours to do.
    """
    available = _controllers(own)
    missing = [c for c in REQUIRED if c not in available]
    if missing:
        raise CgroupSetupError(
            f"cgroup v2 controllers not available to {own}: {', '.join(missing)} (its parent must enable them in "
            f"cgroup.subtree_control); {_DELEGATION_HINT}"
        )
    if not _is_root(own):
        others = [p for p in read_pids(own / "cgroup.procs") if p != pid]
        if others:
            raise CgroupSetupError(
                f"the cgroup jobsvc was started in ({own}) also holds other processes "
                f"({', '.join(map(str, others[:5]))}), so cgroup v2 cannot delegate controllers from it; "
                f"{_DELEGATION_HINT}"
            )
    jobsvc_dir = own / "jobsvc"
    leaf = jobsvc_dir / SUPERVISOR
    with _setup_errors(own):
        leaf.mkdir(parents=True, exist_ok=True)
        write_file(leaf / "cgroup.procs", str(pid))
        _enable(own, REQUIRED)
        _enable(jobsvc_dir, REQUIRED)
    return jobsvc_dir


@contextlib.contextmanager
def _setup_errors(where: Path) -> Iterator[None]:
    try:
        yield
    except PermissionError as e:
        raise CgroupSetupError(f"cannot set up cgroup {e.filename}: {e.strerror} (jobsvc must run as root)") from e
    except OSError as e:
        raise CgroupSetupError(f"cannot set up cgroup {e.filename or where}: {e.strerror}") from e


def prepare(own: Path, instance: str, pid: int) -> Path:
    """claim() the leaf, then make the instance's group with the controllers for its jobs; returns that group."""
    base = claim(own, pid) / instance
    with _setup_errors(base):
        base.mkdir(exist_ok=True)
        _enable(base, REQUIRED)
    return base


def _write_limit(path: Path, value: str, what: str) -> None:
    try:
        write_file(path, value)
    except OSError as e:
        raise InvalidArgumentError(f"{what}: the kernel refused {value.strip()!r} ({e.strerror})") from None


def apply(group: Path, limits: Limits) -> None:
    """Write only the limits that are set, in the v2 files; the kernel's refusal names the field."""
    if limits.cpu is not None:
        _write_limit(group / "cpu.max", f"{round(limits.cpu * CPU_PERIOD_US)} {CPU_PERIOD_US}", "cpu")
    if limits.memory_bytes is not None:
        _write_limit(group / "memory.max", str(limits.memory_bytes), "memory")
        if (group.parent / "memory.swap.max").exists():  # swap accounting is on (then every group has one)
            _write_limit(group / "memory.swap.max", "0", "memory")  # as v1's memsw: swap cannot dodge the limit
    for io in limits.io:
        keys = [f"{key}={getattr(io, name)}" for name, key in _IO_KEYS if getattr(io, name) is not None]
        if keys:
            _write_limit(group / "io.max", f"{io.device} {' '.join(keys)}", f"io for {io.device}")
    if limits.pids is not None:
        _write_limit(group / "pids.max", str(limits.pids), "pids")


def _flat(text: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in text.splitlines() if " " in line)


class V2Group:
    """A job's group: one directory in the unified tree."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._dir = str(path)
        self._join = (f"{path}/cgroup.procs",)

    @property
    def join_files(self) -> Sequence[str]:
        return self._join

    @property
    def dirs(self) -> Sequence[Path]:
        return (self._path,)

    def pids(self) -> list[int]:
        return read_pids_tree(self._path)

    def signal(self, sig: int) -> int:
        return signal_pids(self.pids(), sig)

    def populated(self) -> bool:
        """Whether any process is left in the group or beneath it (cgroup.events, one read)."""
        try:
            return _flat(read_file(f"{self._dir}/cgroup.events")).get("populated", "0").strip() != "0"
        except FileNotFoundError:
            return False

    # freeze/is_frozen/thaw: the fallback for kernels before 5.14, which have no cgroup.kill
    def freeze(self) -> None:
        write_file(self._path / "cgroup.freeze", "1")

    def is_frozen(self) -> bool:
        try:
            return _flat(read_file(f"{self._dir}/cgroup.events")).get("frozen", "0").strip() == "1"
        except FileNotFoundError:
            return True

    def thaw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            write_file(self._path / "cgroup.freeze", "0")

    async def kill(self) -> bool:
        kill_file = self._path / "cgroup.kill"
        if not kill_file.exists():
            return await freeze_kill_thaw(self)
        if not self.populated():
            return True
        # One write SIGKILLs the group and every group beneath it, and no fork can slip past it (kernel 5.14+).
        try:
            write_file(kill_file, "1")
        except FileNotFoundError:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        delay = 0.0005
        while self.populated() and loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return await kill_until_empty(self.pids)

    def oom_kills(self) -> int:
        # memory.events counts the groups beneath too (unless mounted with memory_localevents)
        return read_key(self._path / "memory.events", "oom_kill")

    def pids_limit_hits(self) -> int:
        return read_key(self._path / "pids.events", "max")

    def usage(self) -> Usage:
        d = self._dir
        try:
            cpu = _flat(read_file(f"{d}/cpu.stat"))
        except FileNotFoundError:
            cpu = {}
        usec = cpu.get("usage_usec")
        read = write = 0
        with contextlib.suppress(FileNotFoundError):
            for line in read_file(f"{d}/io.stat").splitlines():
                for item in line.split()[1:]:
                    key, _, value = item.partition("=")
                    if key == "rbytes":
                        read += int(value)
                    elif key == "wbytes":
                        write += int(value)
        try:
            # memory.peak came with kernel 5.19; before it v2 keeps no peak, and none is reported
            peak: int | None = int(read_file(f"{d}/memory.peak"))
        except FileNotFoundError:
            peak = None
        return Usage(
            cpu_seconds=None if usec is None else int(usec) / 1e6,
            cpu_throttled_periods=int(cpu.get("nr_throttled", 0)),
            memory_peak_bytes=peak,
            io_read_bytes=read,
            io_write_bytes=write,
        )

    async def destroy(self) -> bool:
        return await remove_with_retry(lambda: remove_tree(self._path))


class V2Driver:
    """Job groups at <own group>/jobsvc/<instance>/<job id> in the unified tree."""

    name = "cgroup v2"

    def __init__(self, base: Path) -> None:
        self._base = base

    @classmethod
    def for_host(cls, instance: str, current: Path, pid: int | None = None) -> V2Driver:
        """Take the leaf and the controllers beneath the group this process was started in."""
        return cls(prepare(started_in(current), instance, os.getpid() if pid is None else pid))

    @property
    def base_dirs(self) -> Sequence[Path]:
        return (self._base,)

    def _dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith(".") or job_id.startswith("cgroup."):
            raise ValueError(f"bad job id for a cgroup name: {job_id!r}")
        return self._base / job_id

    def create(self, job_id: str, limits: Limits) -> V2Group:
        path = self._dir(job_id)
        path.mkdir(mode=0o755)
        try:
            apply(path, limits)
        except BaseException:
            remove_dir(path)
            raise
        return V2Group(path)

    def open(self, job_id: str) -> V2Group:
        return V2Group(self._dir(job_id))

    def existing(self) -> list[str]:
        try:
            return sorted(p.name for p in self._base.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def remove_instance(self) -> bool:
        # <own>/jobsvc and the supervisor leaf stay: this process is in the leaf until it exits (systemd removes
        # a unit's whole tree when it stops).
        return remove_dir(self._base)
