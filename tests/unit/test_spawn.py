"""HelperSpawner's side of the helper's protocol, against a test playing the helper on a real socket pair."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from jobsvc.pipe import PipeEnd, pipe
from jobsvc.spawn import HelperSpawner, SpawnError, SpawnRequest
from jobsvc.spawn_helper import MAX_MESSAGE

REQUEST = SpawnRequest(argv=(b"true",), env={}, cwd=b"/", join_files=())


class ExitedProc:
    """Stands for the helper's process object: already gone, so close() has nothing to wait for."""

    pid = 4000

    def poll(self) -> int | None:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        pass


@dataclass
class Helper:
    """The test's end of the socket, answering as the spawn helper does."""

    sock: socket.socket
    spawner: HelperSpawner
    out: PipeEnd

    async def request(self) -> dict[str, Any]:
        """The next spawn request (the stdio descriptors it carried are closed)."""
        data, fds, _, _ = await asyncio.to_thread(socket.recv_fds, self.sock, MAX_MESSAGE, 2)
        for fd in fds:
            os.close(fd)
        return cast(dict[str, Any], json.loads(data))

    def send(self, **msg: Any) -> None:
        self.sock.send(json.dumps(msg).encode())

    async def start(self, pid: int) -> asyncio.Future[int]:
        """One spawn, answered with pid; its exit future."""
        call = asyncio.ensure_future(self.spawner.spawn(REQUEST, self.out, self.out))
        self.send(seq=(await self.request())["seq"], pid=pid)
        started, status = await call
        assert started == pid
        return status


@pytest.fixture
async def helper() -> AsyncIterator[Helper]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    spawner = HelperSpawner(cast("subprocess.Popen[bytes]", ExitedProc()), ours)
    r, w = pipe()
    with theirs, r, w:
        yield Helper(theirs, spawner, w)
        spawner.close()


async def test_an_exit_once_delivered_leaves_nothing_behind(helper: Helper) -> None:
    statuses = []
    for pid in range(5000, 5100):
        status = await helper.start(pid)
        assert helper.spawner.waiting == 1  # a running process: its exit is awaited
        helper.send(exit=pid, status=pid - 5000)
        statuses.append(await status)
        assert helper.spawner.waiting == 0
    assert statuses == list(range(100))


async def test_an_exit_reported_with_the_start_still_reaches_the_caller(helper: Helper) -> None:
    call = asyncio.ensure_future(helper.spawner.spawn(REQUEST, helper.out, helper.out))
    seq = (await helper.request())["seq"]
    helper.send(seq=seq, pid=6000)  # both packets are read in one wake-up, before spawn() resumes
    helper.send(exit=6000, status=7 << 8)
    pid, status = await call
    assert (pid, await status, helper.spawner.waiting) == (6000, 7 << 8, 0)


async def test_a_refused_start_raises_its_errno_and_stage(helper: Helper) -> None:
    call = asyncio.ensure_future(helper.spawner.spawn(REQUEST, helper.out, helper.out))
    helper.send(seq=(await helper.request())["seq"], errno=2, stage="exec")
    with pytest.raises(SpawnError) as e:
        await call
    assert (e.value.errno, e.value.stage, helper.spawner.waiting) == (2, "exec", 0)


async def test_the_fork_is_told_before_the_start_and_also_before_a_failed_exec(helper: Helper) -> None:
    told: list[int] = []
    for pid, reply in ((8000, {"pid": 8000}), (8001, {"errno": 13, "stage": "exec"})):
        call = asyncio.ensure_future(helper.spawner.spawn(REQUEST, helper.out, helper.out, told.append))
        seq = (await helper.request())["seq"]
        helper.send(seq=seq, forked=pid)
        while told[-1:] != [pid]:
            await asyncio.sleep(0.001)
        assert not call.done()  # told, but not started: the child has not exec'd yet
        helper.send(seq=seq, **reply)
        if "pid" in reply:
            assert (await call)[0] == pid
        else:
            with pytest.raises(SpawnError):
                await call
    assert told == [8000, 8001] and helper.spawner._forked == {}


async def test_a_fork_nobody_asked_to_hear_of_is_ignored(helper: Helper) -> None:
    call = asyncio.ensure_future(helper.spawner.spawn(REQUEST, helper.out, helper.out))
    seq = (await helper.request())["seq"]
    helper.send(seq=seq, forked=8100)
    helper.send(seq=seq, pid=8100)
    assert (await call)[0] == 8100


async def test_the_helpers_death_fails_every_awaited_exit_and_keeps_none(helper: Helper) -> None:
    statuses = [await helper.start(pid) for pid in (7000, 7001)]
    helper.sock.shutdown(socket.SHUT_RDWR)
    for status in statuses:
        with pytest.raises(ConnectionError):
            await status
    assert helper.spawner.waiting == 0 and not helper.spawner.alive


async def test_the_helper_is_this_package_s_whatever_the_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = tmp_path / "jobsvc"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    marker = tmp_path / "ran"
    (impostor / "spawn_helper.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    spawner = HelperSpawner.launch()  # raises if the helper that started is not one that says it is ready
    try:
        assert spawner.alive and not marker.exists()
    finally:
        spawner.close()
