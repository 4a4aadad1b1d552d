"""cgroup v1: one small class per controller, and the driver that makes a job's groups in every hierarchy."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from jobsvc.cgroups.base import CgroupSetupError
from jobsvc.cgroups.fs import read_file, read_int, read_key, read_pids_tree, remove_dir, remove_tree, write_file
from jobsvc.cgroups.kill import freeze_kill_thaw, remove_with_retry, signal_pids
from jobsvc.errors import InvalidArgumentError
from jobsvc.model import Limits, Usage

REQUIRED = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
CFS_PERIOD_US = 100_000


def find_hierarchies(proc: Path = Path("/proc/self")) -> dict[str, Path]:
    """Controller -> the directory of this process's own group in that controller's v1 hierarchy."""
    mounts: dict[str, tuple[Path, str]] = {}
    try:
        mountinfo = read_file(proc / "mountinfo")
        own_cgroups = read_file(proc / "cgroup")
    except OSError:
        return {}
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(tail) < 3 or tail[0] != "cgroup":
            continue
        root, mount_point = fields[3], fields[4].replace("\\040", " ")
        for opt in tail[2].split(","):
            if opt in REQUIRED and opt not in mounts:
                mounts[opt] = (Path(mount_point), root)
    own: dict[str, str] = {}
    for line in own_cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            own[c] = path
    result: dict[str, Path] = {}
    for controller, (mount_dir, mount_root) in mounts.items():
        own_path = own.get(controller)
        if own_path is None:
            continue
        # The mount may show a sub-tree (a container's view): our path is relative to the mount's root.
        rel = os.path.relpath(own_path, mount_root)
        result[controller] = (mount_dir / rel).resolve() if rel != "." else mount_dir.resolve()
    return result


class Controller:
    """One v1 controller: writes the limits it owns and reads its share of the usage."""

    name = ""

    def apply(self, group: Path, limits: Limits) -> None:
        """Write only the limits that are set; OSError propagates (the caller names the field)."""

    def usage(self, group: str) -> dict[str, int | float | None]:
        """The usage figures this controller owns, read from the group directory `group` (a str: Get pays for
        every path join)."""
        return {}


def _write_limit(path: Path, value: str, what: str) -> None:
    try:
        write_file(path, value)
    except OSError as e:
        raise InvalidArgumentError(f"{what}: the kernel refused {value.strip()!r} ({e.strerror})") from None


class Cpu(Controller):
    name = "cpu"

    def apply(self, group: Path, limits: Limits) -> None:
        if limits.cpu is not None:
            _write_limit(group / "cpu.cfs_period_us", str(CFS_PERIOD_US), "cpu")
            _write_limit(group / "cpu.cfs_quota_us", str(round(limits.cpu * CFS_PERIOD_US)), "cpu")

    def usage(self, group: str) -> dict[str, int | float | None]:
        try:
            stat = dict(line.split() for line in read_file(f"{group}/cpu.stat").splitlines())
        except OSError:
            return {}
        return {"cpu_throttled_periods": int(stat.get("nr_throttled", 0))}


class Cpuacct(Controller):
    name = "cpuacct"

    def usage(self, group: str) -> dict[str, int | float | None]:
        ns = read_int(f"{group}/cpuacct.usage")
        return {"cpu_seconds": None if ns is None else ns / 1e9}


class Memory(Controller):
    name = "memory"

    def apply(self, group: Path, limits: Limits) -> None:
        if limits.memory_bytes is not None:
            value = str(limits.memory_bytes)
            _write_limit(group / "memory.limit_in_bytes", value, "memory")
            memsw = group / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # only with swap accounting; then swap cannot dodge the limit
                _write_limit(memsw, value, "memory")

    def usage(self, group: str) -> dict[str, int | float | None]:
        return {"memory_peak_bytes": read_int(f"{group}/memory.max_usage_in_bytes")}

    @staticmethod
    def oom_kills(group: Path) -> int:
        return read_key(group / "memory.oom_control", "oom_kill")  # v1 has no memory.events


class Blkio(Controller):
    name = "blkio"
    _FILES = {
        "read_bps": "blkio.throttle.read_bps_device",
        "write_bps": "blkio.throttle.write_bps_device",
        "read_iops": "blkio.throttle.read_iops_device",
        "write_iops": "blkio.throttle.write_iops_device",
    }

    def apply(self, group: Path, limits: Limits) -> None:
        for io in limits.io:
            for name, file in self._FILES.items():
                value = getattr(io, name)
                if value is not None:
                    _write_limit(group / file, f"{io.device} {value}", f"io {name} for {io.device}")

    def usage(self, group: str) -> dict[str, int | float | None]:
        try:
            text = read_file(f"{group}/blkio.throttle.io_service_bytes")
        except OSError:
            return {}
        read = write = 0
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and ":" in parts[0]:
                if parts[1] == "Read":
                    read += int(parts[2])
                elif parts[1] == "Write":
                    write += int(parts[2])
        return {"io_read_bytes": read, "io_write_bytes": write}


class Pids(Controller):
    name = "pids"

    def apply(self, group: Path, limits: Limits) -> None:
        if limits.pids is not None:
            _write_limit(group / "pids.max", str(limits.pids), "pids")

    @staticmethod
    def limit_hits(group: Path) -> int:
        return read_key(group / "pids.events", "max")


class Freezer(Controller):
    name = "freezer"


CONTROLLERS: tuple[Controller, ...] = (Cpu(), Cpuacct(), Memory(), Blkio(), Pids(), Freezer())


class V1Group:
    """A job's groups: one directory per hierarchy (cpu and cpuacct may share one)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self._dirs = dirs
        self._unique = list(dict.fromkeys(dirs.values()))
        self._join = tuple(str(d / "cgroup.procs") for d in self._unique)
        self._usage_dirs = [(c, str(dirs[c.name])) for c in CONTROLLERS if type(c).usage is not Controller.usage]
        self._freezer = dirs["freezer"]

    @property
    def join_files(self) -> Sequence[str]:
        return self._join

    @property
    def dirs(self) -> Sequence[Path]:
        return self._unique

    def apply(self, limits: Limits) -> None:
        for c in CONTROLLERS:
            c.apply(self._dirs[c.name], limits)

    def pids(self) -> list[int]:
        # Every process of the job is somewhere in its freezer tree, also in groups a root job made itself.
        return read_pids_tree(self._freezer)

    def signal(self, sig: int) -> int:
        return signal_pids(self.pids(), sig)

    def freeze(self) -> None:
        write_file(self._freezer / "freezer.state", "FROZEN")  # freezes the groups beneath it too

    def is_frozen(self) -> bool:
        try:
            return read_file(self._freezer / "freezer.state").strip() == "FROZEN"
        except FileNotFoundError:
            return True

    def thaw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            write_file(self._freezer / "freezer.state", "THAWED")

    async def kill(self) -> bool:
        return await freeze_kill_thaw(self)

    def oom_kills(self) -> int:
        return Memory.oom_kills(self._dirs["memory"])

    def pids_limit_hits(self) -> int:
        return Pids.limit_hits(self._dirs["pids"])

    def usage(self) -> Usage:
        fields: dict[str, int | float | None] = {}
        for c, d in self._usage_dirs:
            fields.update(c.usage(d))
        return Usage(**fields)  # type: ignore[arg-type]

    def _remove(self) -> bool:
        done = True
        for d in self._unique:
            done = remove_tree(d) and done
        return done

    async def destroy(self) -> bool:
        return await remove_with_retry(self._remove)


class V1Driver:
    """Job groups at <own group>/jobsvc/<instance>/<job id> in each v1 hierarchy."""

    name = "cgroup v1"

    def __init__(self, roots: dict[str, Path]) -> None:
        missing = [c for c in REQUIRED if c not in roots]
        if missing:
            raise CgroupSetupError(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        self._roots = roots

    @classmethod
    def for_host(cls, instance: str, own: dict[str, Path]) -> V1Driver:
        """Make this instance's parent groups beneath the groups the server was started in."""
        missing = [c for c in REQUIRED if c not in own]
        if missing:
            raise CgroupSetupError(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        roots = {c: own[c] / "jobsvc" / instance for c in REQUIRED}
        for d in dict.fromkeys(roots.values()):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CgroupSetupError(f"cannot create cgroup {d}: {e.strerror} (jobsvc must run as root)") from e
        return cls(roots)

    @property
    def base_dirs(self) -> Sequence[Path]:
        return list(dict.fromkeys(self._roots.values()))

    def _dirs(self, job_id: str) -> dict[str, Path]:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"bad job id for a cgroup name: {job_id!r}")
        return {c: root / job_id for c, root in self._roots.items()}

    def create(self, job_id: str, limits: Limits) -> V1Group:
        dirs = self._dirs(job_id)
        group = V1Group(dirs)
        made: list[Path] = []
        try:
            for d in dict.fromkeys(dirs.values()):
                d.mkdir(mode=0o755)
                made.append(d)
            group.apply(limits)
        except BaseException:
            for d in reversed(made):
                remove_dir(d)
            raise
        return group

    def open(self, job_id: str) -> V1Group:
        return V1Group(self._dirs(job_id))

    def existing(self) -> list[str]:
        root = self._roots["freezer"]
        try:
            return sorted(p.name for p in root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def remove_instance(self) -> bool:
        done = True
        for d in self.base_dirs:
            done = remove_dir(d) and done
            done = remove_dir(d.parent) and done if _is_empty_dir(d.parent) else done
        return done


def _is_empty_dir(path: Path) -> bool:
    try:
        return not any(p.is_dir() for p in path.iterdir())
    except FileNotFoundError:
        return False
