"""Start processes already inside their cgroups, from one small single-threaded helper (jobsvc/spawn_helper.py).

The threaded gRPC server must not fork Python code (preexec_fn is unsafe with threads), and a process must not run a
single instruction outside its groups. So the server starts the helper process before anything else
(HelperSpawner.launch); the helper forks, the child joins the job's groups, resets its signals, takes its stdio and
execs. Exec failures come back on a CLOEXEC status pipe with the errno, never as a fake exit status. The helper is the
parent (and a child subreaper) of every job, reaps them and reports each leader's wait status to the server.
The engine sees only the Spawner protocol.

Wire format: SOCK_SEQPACKET, one JSON message per packet; the job's stdout/stderr write ends travel as SCM_RIGHTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jobsvc.spawn_helper import MAX_MESSAGE


class SpawnError(OSError):
    """The job could not be started; errno and the stage (cgroup, exec...) say why."""

    def __init__(self, err: int, stage: str, detail: str) -> None:
        super().__init__(err, os.strerror(err))
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True)
class SpawnRequest:
    argv: Sequence[bytes]
    env: Mapping[bytes, bytes]
    cwd: bytes
    join_files: Sequence[str]
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    # (private /tmp, private /var/tmp) directories: run the job in its own mount and IPC namespaces with these
    # over /tmp and /var/tmp, fresh /dev/shm, /run/lock and /dev/mqueue, and a /proc that hides other uids
    private_dirs: tuple[str, str] | None = None


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class Spawner(Protocol):
    """What the engine starts jobs with (HelperSpawner here; an in-memory fake in the unit tests)."""

    @property
    def pid(self) -> int:
        """The helper's process id (the parent of every job)."""
        ...

    @property
    def alive(self) -> bool:
        """False once the helper is gone: its jobs are being killed, new ones need a new spawner (launch)."""
        ...

    async def spawn(
        self, req: SpawnRequest, stdout: HasFileno, stderr: HasFileno, forked: Callable[[int], None] | None = None
    ) -> tuple[int, asyncio.Future[int]]:
        """Start a process with these pipe ends as its stdout/stderr; its pid and a future of its wait status.

        forked(pid), if given, may be called on the loop once the process exists, before it has exec'd (the
        caller may write the job's record meanwhile; spawn() can still fail after it). Raises SpawnError; the
        future raises ConnectionError if the helper dies first. The caller keeps (and closes) its own ends."""
        ...

    def launch(self) -> Spawner:
        """A new spawner of the same kind, in place of this one once it died."""
        ...

    def close(self) -> None:
        """Let go of the helper (its jobs were stopped or are left running)."""
        ...


class HelperSpawner:
    """Server side: talks to the helper from the asyncio loop."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._seq = 0
        self._replies: dict[int, asyncio.Future[tuple[dict[str, Any], asyncio.Future[int] | None]]] = {}
        # seq -> the caller's forked(pid), until it is told or its spawn() ends (which takes it out either way)
        self._forked: dict[int, Callable[[int], None]] = {}
        # the processes whose exit has not been reported yet: an entry goes when its exit arrives
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone = False
        self._lock = asyncio.Lock()

    @classmethod
    def launch(cls) -> HelperSpawner:
        """Start the helper process (safe from a threaded process: Popen execs at once)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
        # -S skips site processing (faster, smaller); the path to this package is handed over explicitly, which
        # also covers editable installs whose finder lives in a .pth file. -P: not the working directory first
        # (-m puts it there), where a `jobsvc` package would be run as root in place of this one.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join([package_root, *(p for p in sys.path if p)])
        proc = subprocess.Popen(
            [sys.executable, "-S", "-P", "-m", "jobsvc.spawn_helper", str(child.fileno()), str(os.getpid())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            env={"PYTHONPATH": path},
        )
        child.close()
        parent.settimeout(30)
        try:
            hello = json.loads(parent.recv(MAX_MESSAGE) or b"{}")
        except (OSError, ValueError):
            hello = {}
        if hello.get("ready") != proc.pid:
            proc.kill()
            proc.wait()
            parent.close()
            raise RuntimeError("the spawn helper did not start (see its message above)")
        parent.setblocking(False)
        return cls(proc, parent)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _ensure_reader(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._helper_gone()
                return
            msg = json.loads(data)
            if "exit" in msg:
                fut = self._exits.pop(msg["exit"], None)  # one report per pid: a server keeps no future per job
                if fut is not None and not fut.done():
                    fut.set_result(msg["status"])
                continue
            if "forked" in msg:
                told = self._forked.pop(msg["seq"], None)
                if told is not None:
                    told(msg["forked"])
                continue
            reply = self._replies.pop(msg["seq"], None)
            if reply is None or reply.done():
                continue
            exit_fut: asyncio.Future[int] | None = None
            if "pid" in msg:
                # Register the exit future before anything else runs: the exit report may be in the next packet
                # (and then it is delivered, and gone from _exits, before spawn() resumes: the reply carries it).
                assert self._loop is not None
                exit_fut = self._exits[msg["pid"]] = self._loop.create_future()
            reply.set_result((msg, exit_fut))

    @property
    def alive(self) -> bool:
        return not self._gone and self._proc.poll() is None

    def _helper_gone(self) -> None:
        self._gone = True
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        err = ConnectionError("the spawn helper exited")
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(err)
        self._replies.clear()
        for exit_fut in self._exits.values():
            if not exit_fut.done():
                exit_fut.set_exception(err)
        self._exits.clear()

    @property
    def waiting(self) -> int:
        """How many started processes have not had their exit reported yet."""
        return len(self._exits)

    async def spawn(
        self, req: SpawnRequest, stdout: HasFileno, stderr: HasFileno, forked: Callable[[int], None] | None = None
    ) -> tuple[int, asyncio.Future[int]]:
        """Start a process; returns its pid and a future of its wait status. Raises SpawnError."""
        self._ensure_reader()
        assert self._loop is not None
        self._seq += 1
        seq = self._seq
        msg = {
            "seq": seq,
            "argv": [os.fsdecode(a) for a in req.argv],
            "env": {os.fsdecode(k): os.fsdecode(v) for k, v in req.env.items()},
            "cwd": os.fsdecode(req.cwd),
            "join": list(req.join_files),
            "uid": req.uid,
            "gid": req.gid,
            "umask": req.umask,
            "private": list(req.private_dirs) if req.private_dirs is not None else None,
        }
        payload = json.dumps(msg).encode()
        if len(payload) > MAX_MESSAGE:
            raise SpawnError(errno.E2BIG, "request", "the command and environment are too large")
        fut: asyncio.Future[tuple[dict[str, Any], asyncio.Future[int] | None]] = self._loop.create_future()
        self._replies[seq] = fut
        if forked is not None:
            self._forked[seq] = forked
        async with self._lock:  # one sendmsg at a time; the socket is non-blocking
            while True:
                try:
                    socket.send_fds(self._sock, [payload], [stdout.fileno(), stderr.fileno()])
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
        try:
            reply, exit_status = await fut
        finally:
            self._forked.pop(seq, None)
        if exit_status is not None:
            return int(reply["pid"]), exit_status
        raise SpawnError(int(reply["errno"]), reply["stage"], reply.get("detail", ""))

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
