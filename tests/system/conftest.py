"""System tests: root, the real kernel's cgroups (v1 or v2, whichever the host has), real processes.

Skipped elsewhere (a failure under CI=true). On a cgroup v2 host pytest itself must start alone in a delegated group
(`systemd-run --scope -p Delegate=yes pytest ...`, as `make vm-test CGROUP=v2` does): the session moves it into a
supervisor leaf first, as the server does, so that in-process engines and the servers it starts share that leaf.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobsvc.cgroups import v1, v2
from tests.system.server import bound

CGROUP_VERSION = "v1" if v1.find_hierarchies() else "v2" if v2.find_unified() else None


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root"
    if CGROUP_VERSION == "v1":
        found = v1.find_hierarchies()
        missing = [c for c in v1.REQUIRED if c not in found]
        if missing:
            return f"cgroup v1 controllers not mounted: {', '.join(missing)}"
    elif CGROUP_VERSION is None:
        return "neither cgroup v1 controllers nor cgroup2 are mounted"
    return None


@pytest.fixture(scope="session", autouse=True)
def supervisor_leaf() -> None:
    """On v2, before any engine or server starts (session scope and autouse: the first fixture of all)."""
    if CGROUP_VERSION == "v2" and _why_not() is None:
        own = v2.find_unified()
        assert own is not None
        v2.claim(v2.started_in(own), os.getpid())


def _instance_groups() -> set[Path]:
    """Every jobsvc instance's parent group beneath this process's own groups, in every hierarchy."""
    if CGROUP_VERSION == "v1":
        parents = [d / "jobsvc" for d in dict.fromkeys(v1.find_hierarchies().values())]
    else:
        own = v2.find_unified()
        parents = [v2.started_in(own) / "jobsvc"] if own is not None else []
    found = set()
    for parent in parents:
        with contextlib.suppress(FileNotFoundError):
            found |= {d for d in parent.iterdir() if d.is_dir() and d.name != v2.SUPERVISOR}
    return found


@pytest.fixture(scope="session", autouse=True)
def no_groups_left_behind(supervisor_leaf: None) -> Iterator[None]:
    """After the whole suite (every server and engine stopped, crashed ones taken over or cleaned up, those that
    could not start gone), none of the instance groups made during it is left, in any hierarchy."""
    before = _instance_groups() if _why_not() is None else set()
    yield
    if _why_not() is None:
        left = sorted(map(str, _instance_groups() - before))
        assert not left, f"groups left behind by the system tests: {left}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not()
    for item in items:
        if "tests/system" in str(item.fspath):
            item.add_marker(pytest.mark.system)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def processes_in_cgroup_named(name: str) -> list[int]:
    """Every process on the host whose cgroup path mentions name (a job id or an instance id)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cgroup").read_text()
        except OSError:
            continue
        if name in text:
            found.append(int(entry.name))
    return found


def job_group_dirs(engine: object, job_id: str) -> list[Path]:
    return [d / job_id for d in engine.instance_groups]  # type: ignore[attr-defined]


@pytest.fixture
def work_root() -> Iterator[Path]:
    """Jobs' working directories: outside pytest's private tmp (mode 0700), so jobs' own uids can enter them."""
    path = Path(tempfile.mkdtemp(prefix="jobsvc-test-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def engine(tmp_path: Path, work_root: Path) -> AsyncIterator[object]:
    from jobsvc.manager import EngineConfig, JobManager

    manager = JobManager.open(EngineConfig(state_dir=tmp_path / "state", default_grace=2.0, work_root=work_root))
    await manager.reconcile()
    bases = manager.instance_groups
    yield manager
    await manager.shutdown(grace=1.0)
    instance = bases[0].name
    assert not processes_in_cgroup_named(instance), "a job process outlived the engine"
    assert not any(b.exists() for b in bases), "the instance's groups were left behind"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> object:
    from tests.system.server import make_pki

    return make_pki(tmp_path_factory.mktemp("pki") / "pki")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: object) -> object:
    """One real jobsvc process per test module; it must exit 0 on SIGTERM and leave no job process behind."""
    if _why_not():
        pytest.skip(_why_not() or "")
    from tests.system.server import start_server

    srv = start_server(tmp_path_factory.mktemp("server"), keys)  # type: ignore[arg-type]
    yield srv
    if not srv.stopped:
        assert srv.stop() == 0, srv.log()
    shutil.rmtree(srv.work_root, ignore_errors=True)


# -- jobctl's command server (cli/agent.py) ---------------------------------------------------------------------


def agent_pids(runtime_dir: Path) -> list[int]:
    """Every jobctl agent on the host that serves runtime_dir (started by a fixture or by a jobctl front end)."""
    found = []
    wanted = f"XDG_RUNTIME_DIR={runtime_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"jobctl.agent" not in (entry / "cmdline").read_bytes():
                continue
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def end_process(pid: int, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL, to pid (not our child: a pidfd says when it is gone)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            if select.select([pidfd], [], [], bound(timeout))[0]:
                return
    finally:
        os.close(pidfd)


@pytest.fixture(autouse=True)
def jobctl_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test's own XDG_RUNTIME_DIR: an agent a jobctl in it starts is its own, and is ended by PID after it.

    Short and in /tmp: a Unix socket's path has room for 107 bytes.
    """
    path = Path(tempfile.mkdtemp(prefix="jobctl-run-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)  # an agent still starting now finds no directory and leaves
    for pid in agent_pids(path):
        end_process(pid)


def agent_socket(runtime_dir: Path) -> Path:
    from jobctl import front

    return Path(front.paths(str(runtime_dir / "jobctl"))[0])


def wait_for_agent(runtime_dir: Path, timeout: float = 60) -> None:
    """Until the agent of runtime_dir takes connections."""
    path = agent_socket(runtime_dir)
    deadline = time.monotonic() + bound(timeout)
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """End it (by PID); the number of commands it ran."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        text = self.log()
        assert "Traceback" not in text and "request failed" not in text, text
        served = re.findall(r"leaving after (\d+) commands", text)
        return int(served[-1]) if served else 0


def start_agent(runtime_dir: Path, env: dict[str, str] | None = None) -> Agent:
    """The installed jobctl's agent for runtime_dir, as a front end starts it, and once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "jobctl.agent"],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir), **(env or {})},
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    from jobctl import front

    agent = Agent(proc, Path(front.paths(str(runtime_dir / "jobctl"))[2]))
    try:
        wait_for_agent(runtime_dir)
    except OSError:
        proc.kill()
        proc.wait()
        raise
    return agent


@pytest.fixture
def jobctl_agent(jobctl_runtime_dir: Path) -> Iterator[Agent]:
    """A warm jobctl agent for this test, so that every jobctl of the test goes through it."""
    agent = start_agent(jobctl_runtime_dir)
    yield agent
    agent.stop()
