"""The resource-control interface the engine sees, and detect(): the only place that asks "v1 or v2?"."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from jobsvc.model import Limits, Usage


class CgroupSetupError(RuntimeError):
    """The host cannot give jobsvc the groups it needs (missing controller, no permission)."""


class JobGroup(Protocol):
    """The groups of one job, in every hierarchy the driver uses."""

    @property
    def join_files(self) -> Sequence[str]:
        """Files the new process writes "0" to, to enter each of its groups before exec."""
        ...

    @property
    def dirs(self) -> Sequence[Path]:
        """The job's group directories (one per hierarchy on v1, one on v2)."""
        ...

    def pids(self) -> list[int]:
        """Every process now in the job, in groups the job made beneath its own too."""
        ...

    def signal(self, sig: int) -> int:
        """Send sig to every process of the job; returns how many got it."""
        ...

    async def kill(self) -> bool:
        """SIGKILL every process of the job, so that none can fork meanwhile; True once none is left."""
        ...

    def oom_kills(self) -> int:
        """How many processes of this job the kernel has OOM-killed so far."""
        ...

    def pids_limit_hits(self) -> int:
        """How many times a fork or clone of this job was refused at its pids limit."""
        ...

    def usage(self) -> Usage:
        """What the job has consumed so far."""
        ...

    async def destroy(self) -> bool:
        """Remove the job's groups and any the job made beneath them; False if the kernel kept them busy."""
        ...


class EndedGroup:
    """The groups of a job that ended before this server started: long gone, so there is nothing to act on."""

    join_files: Sequence[str] = ()
    dirs: Sequence[Path] = ()

    def pids(self) -> list[int]:
        return []

    def signal(self, sig: int) -> int:
        return 0

    async def kill(self) -> bool:
        return True

    def oom_kills(self) -> int:
        return 0

    def pids_limit_hits(self) -> int:
        return 0

    def usage(self) -> Usage:
        return Usage()

    async def destroy(self) -> bool:
        return True


ENDED = EndedGroup()


class CgroupDriver(Protocol):
    """Makes and finds job groups beneath the server's own group."""

    name: str  # "cgroup v1" or "cgroup v2", for the log

    def create(self, job_id: str, limits: Limits) -> JobGroup:
        """Make the job's groups with its limits written; raises InvalidArgumentError (cleaning up) if refused."""
        ...

    def existing(self) -> list[str]:
        """Job ids that have groups under this instance (for reconciliation after a restart)."""
        ...

    def open(self, job_id: str) -> JobGroup:
        """The groups of an existing job."""
        ...

    def remove_instance(self) -> bool:
        """Remove this instance's (empty) parent groups."""
        ...

    @property
    def base_dirs(self) -> Sequence[Path]:
        """This instance's parent group in each hierarchy."""
        ...


_HOW_TO_GET_ONE = (
    "boot with the unified hierarchy (Debian 11+, Ubuntu 21.10+, Fedora 31+ and RHEL 9 do by default; "
    "systemd.unified_cgroup_hierarchy=1 on the kernel command line) or with the cgroup v1 controllers mounted"
)


def detect(instance: str, proc: Path = Path("/proc/self")) -> CgroupDriver:
    """The driver for this host: v1 when its controllers are mounted (hybrid hosts too), else v2, else an error.

    v1 wins on a hybrid host: there the unified tree holds no controllers (they are bound to v1).
    """
    from jobsvc.cgroups import v1, v2

    mounts = v1.find_hierarchies(proc)
    if mounts:
        return v1.V1Driver.for_host(instance, mounts)
    unified = v2.find_unified(proc)
    if unified is not None:
        return v2.V2Driver.for_host(instance, unified)
    raise CgroupSetupError(
        "no cgroup hierarchy found: neither cgroup v1 controllers (cpu, cpuacct, memory, blkio, pids, freezer) "
        f"nor a cgroup2 filesystem are mounted; {_HOW_TO_GET_ONE}"
    )


def locate(instance: str, proc: Path) -> list[Path]:
    """Where the process at proc (a server) keeps the instance's parent groups, creating nothing (for tests)."""
    from jobsvc.cgroups import v1, v2

    mounts = v1.find_hierarchies(proc)
    if mounts:
        return list(dict.fromkeys(mounts[c] / "jobsvc" / instance for c in v1.REQUIRED))
    unified = v2.find_unified(proc)
    if unified is None:
        return []
    return [v2.started_in(unified) / "jobsvc" / instance]
