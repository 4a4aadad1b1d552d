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

    def pids(self) -> list[int]:
        """Every process now in the job (the freezer/pids view)."""
        ...

    def freeze(self) -> None:
        """Ask the kernel to freeze the job (asynchronous; poll is_frozen)."""
        ...

    def is_frozen(self) -> bool: ...

    def thaw(self) -> None: ...

    def oom_kills(self) -> int:
        """How many processes of this job the kernel has OOM-killed so far."""
        ...

    def usage(self) -> Usage:
        """What the job has consumed so far."""
        ...

    def destroy(self) -> bool:
        """Remove every group of the job; False while the kernel still reports it busy."""
        ...


class CgroupDriver(Protocol):
    """Makes and finds job groups beneath the server's own group."""

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


def detect(instance: str, proc: Path = Path("/proc/self")) -> CgroupDriver:
    """The driver for this host: cgroup v1 when its controllers are mounted, else a clear error."""
    from jobsvc.cgroups import v1

    mounts = v1.find_hierarchies(proc)
    if mounts:
        return v1.V1Driver.for_host(instance, mounts)
    raise CgroupSetupError(
        "no cgroup v1 controllers are mounted (jobsvc needs cpu, cpuacct, memory, blkio, pids and freezer); "
        "a cgroup v2-only host needs the v2 driver, which is not written yet"
    )
