"""Start processes already inside their cgroups, from one small single-threaded helper.

The threaded gRPC server must not fork Python code (preexec_fn is unsafe with threads), and a process must not run a
single instruction outside its groups. So the server starts this module as a helper process before anything else;
the helper forks, the child joins the job's groups, resets its signals, takes its stdio and execs. Exec failures come
back on a CLOEXEC status pipe with the errno, never as a fake exit status. The helper is the parent (and a child
subreaper) of every job, reaps them and reports each leader's wait status to the server.

Wire format: SOCK_SEQPACKET, one JSON message per packet; the job's stdout/stderr write ends travel as SCM_RIGHTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 4 * 1024 * 1024
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36


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


class Spawner:
    """Server side: talks to the helper from the asyncio loop."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._seq = 0
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone = False
        self._lock = asyncio.Lock()

    @classmethod
    def launch(cls) -> Spawner:
        """Start the helper process (safe from a threaded process: Popen execs at once)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
        # -S skips site processing (faster, smaller); the path to this package is handed over explicitly, which
        # also covers editable installs whose finder lives in a .pth file.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join([package_root, *(p for p in sys.path if p)])
        proc = subprocess.Popen(
            [sys.executable, "-S", "-m", "jobsvc.spawn", str(child.fileno()), str(os.getpid())],
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
                fut = self._exits.get(msg["exit"])
                if fut is not None and not fut.done():
                    fut.set_result(msg["status"])
                continue
            reply = self._replies.pop(msg["seq"], None)
            if reply is None or reply.done():
                continue
            if "pid" in msg:
                # Register the exit future before anything else runs: the exit report may be in the next packet.
                assert self._loop is not None
                self._exits[msg["pid"]] = self._loop.create_future()
            reply.set_result(msg)

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

    async def spawn(self, req: SpawnRequest, stdout: int, stderr: int) -> tuple[int, asyncio.Future[int]]:
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
        }
        payload = json.dumps(msg).encode()
        if len(payload) > MAX_MESSAGE:
            raise SpawnError(errno.E2BIG, "request", "the command and environment are too large")
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._replies[seq] = fut
        async with self._lock:  # one sendmsg at a time; the socket is non-blocking
            while True:
                try:
                    socket.send_fds(self._sock, [payload], [stdout, stderr])
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
        reply = await fut
        if "pid" in reply:
            pid = int(reply["pid"])
            return pid, self._exits[pid]
        raise SpawnError(int(reply["errno"]), reply["stage"], reply.get("detail", ""))

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)

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


# ---------------------------------------------------------------------------------------------------------------------
# The helper process. Runs single-threaded; everything below happens in it or in its forked children.


def _prctl(option: int, arg: int) -> None:
    import ctypes  # loaded by the helper at start, so the forked child imports nothing

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _child(msg: dict[str, Any], out: int, err: int, status_w: int) -> None:
    """In the forked child: join the groups, set up, exec. Never returns."""
    stage = "setup"
    try:
        os.setsid()
        stage = "cgroup"
        for path in msg["join"]:
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)
        stage = "setup"
        with contextlib.suppress(OSError):
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)
        for sig in range(1, signal.NSIG):
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in {null, out, err} - {0, 1, 2}:
            os.close(fd)
        if msg["umask"] is not None:
            os.umask(msg["umask"])
        stage = "user"
        if msg["gid"] is not None:
            os.setgroups([])
            os.setgid(msg["gid"])
        if msg["uid"] is not None:
            os.setuid(msg["uid"])
        # no setuid binary, file capability or LSM transition can give the job more than it starts with
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        stage = "cwd"
        os.chdir(msg["cwd"])  # as the job's user: it must be able to enter its working directory
        stage = "exec"
        argv = [os.fsencode(a) for a in msg["argv"]]
        env = {os.fsencode(k): os.fsencode(v) for k, v in msg["env"].items()}
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        report = {"errno": e.errno or errno.EIO, "stage": stage, "detail": str(e.filename or "")}
    except BaseException as e:
        report = {"errno": errno.EIO, "stage": stage, "detail": type(e).__name__}
    with contextlib.suppress(BaseException):
        os.write(status_w, json.dumps(report).encode())
    os._exit(127)


def _spawn(msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    if len(fds) != 2 or not msg.get("argv"):
        for fd in fds:
            os.close(fd)
        return {"seq": msg.get("seq"), "errno": errno.EINVAL, "stage": "request", "detail": "bad request"}
    out, err = fds
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as e:
        os.close(status_r)
        os.close(status_w)
        os.close(out)
        os.close(err)
        return {"seq": msg["seq"], "errno": e.errno, "stage": "fork", "detail": ""}
    if pid == 0:
        os.close(status_r)
        _child(msg, out, err, status_w)
    os.close(status_w)
    os.close(out)
    os.close(err)
    chunks = []
    while True:  # EOF means the exec succeeded (the pipe closed on exec)
        chunk = os.read(status_r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(status_r)
    if not chunks:
        return {"seq": msg["seq"], "pid": pid}
    os.waitpid(pid, 0)
    report: dict[str, Any] = json.loads(b"".join(chunks))
    report["seq"] = msg["seq"]
    return report


def _reap(sock: socket.socket, leaders: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in leaders:
            leaders.discard(pid)
            sock.sendall(json.dumps({"exit": pid, "status": status}).encode())


def helper_main(sock_fd: int, server_pid: int) -> None:
    """The helper's loop: spawn on request, reap on SIGCHLD, exit when the server goes away."""
    import select

    sock = socket.socket(fileno=sock_fd)
    os.set_inheritable(sock_fd, False)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:
        os._exit(0)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # Ctrl-C in the server's terminal is the server's to handle; the helper ends when its socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    leaders: set[int] = set()
    sock.sendall(json.dumps({"ready": os.getpid()}).encode())
    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
        if sock.fileno() in ready:
            # descriptors arriving by SCM_RIGHTS are inheritable unless asked otherwise
            msg_bytes, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 8, socket.MSG_CMSG_CLOEXEC)
            if not msg_bytes:
                return
            reply = _spawn(json.loads(msg_bytes), fds)
            if "pid" in reply:
                leaders.add(reply["pid"])
            sock.sendall(json.dumps(reply).encode())
        _reap(sock, leaders)


if __name__ == "__main__":
    helper_main(int(sys.argv[1]), int(sys.argv[2]))
