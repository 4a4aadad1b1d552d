"""The spawn helper process (`python -S -m jobsvc.spawn_helper SOCK_FD SERVER_PID`); jobsvc/spawn.py talks to it.

Single-threaded; it forks one child per job, the child joins the job's groups, sets up and execs. The helper's own
footprint is the cost of every Start: fork copies its page tables, the child pays a copy-on-write fault for each
page it touches before exec, and exec tears its copy down. So this module imports only what the helper needs (no
asyncio: 20 -> 9 MB), and the child runs as little Python as it can:

- Signals: exec resets every caught signal to its default by itself; only ignored ones (SIGPIPE, SIGXFSZ from
  Python's start-up, SIGINT from the helper) survive exec, so only those are reset, plus the signal mask.
- no_new_privs is set once on the helper: fork children inherit it and exec keeps it (prctl(2)).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any

MAX_MESSAGE = 4 * 1024 * 1024
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18


# Before 5.8 a proc mount's options belong to its pid namespace: hidepid here would change the host's /proc too,
# so older kernels keep the host's /proc (the README says so).
def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return True  # an unusual release string: assume a current kernel
    return found >= (major, minor)


_PROC_PER_MOUNT = _kernel_at_least(5, 8)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_ignored: list[signal.Signals] = []  # what the child must reset; filled once the helper is set up


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _sandbox(private: list[str], cwd: str) -> None:
    """Private /tmp, /var/tmp, /dev/shm, /run/lock, IPC and a /proc showing only the job's own uid's processes
    (systemd's PrivateTmp=, PrivateIPC= and ProtectProc=invisible): nothing a job leaves there outlives it, and
    a later job that gets the same transient uid finds none of it."""
    if _libc.unshare(_CLONE_NEWNS | _CLONE_NEWIPC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing mounted here reaches the host
    # Held open first: each of these may lie under /tmp or /var/tmp, which the first mount may hide.
    sources = [os.open(d, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY) for d in private]
    try:
        keep = os.open(cwd, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        keep = -1  # the chdir later fails and says why
    try:
        for fd, target in zip(sources, ("/tmp", "/var/tmp"), strict=True):
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
        for target, options in (("/dev/shm", "mode=1777"), ("/run/lock", "mode=1777,size=5m")):
            if os.path.isdir(target):
                _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
        if os.path.isdir("/dev/mqueue"):  # POSIX queues of the job's own IPC namespace
            _mount("mqueue", "/dev/mqueue", "mqueue", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        if _PROC_PER_MOUNT:
            _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible")
        if keep >= 0 and not _same(cwd, keep):  # it lay under /tmp or /var/tmp: bring it back at its own path
            os.makedirs(cwd, mode=0o711, exist_ok=True)
            _mount(f"/proc/self/fd/{keep}", cwd, None, _MS_BIND)
    finally:
        for fd in [*sources, keep]:
            if fd >= 0:
                os.close(fd)


def _same(path: str, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except OSError:
        return False


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
        stage = "sandbox"
        if msg.get("private"):
            _sandbox(msg["private"], msg["cwd"])
        stage = "setup"
        with contextlib.suppress(OSError):
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)
        for sig in _ignored:
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


class _Pending:
    """A child forked but not yet exec'd: its status pipe is watched by the helper's loop, which meanwhile forks
    the next job (a child's setup, its namespaces and mounts, took 1-3 ms here, and one at a time they were a
    ceiling on Starts per second). A plain class: dataclasses would import 26 ms of modules into every fork."""

    __slots__ = ("pid", "report", "seq", "status")

    def __init__(self, seq: int, pid: int) -> None:
        self.seq = seq
        self.pid = pid
        self.report: list[bytes] = []
        self.status: int | None = None  # reaped before its pipe said exec: told once its pid is


def _spawn(msg: dict[str, Any], fds: list[int], pending: dict[int, _Pending]) -> dict[str, Any]:
    """Fork the job; the first reply: {"forked": pid} if it is now pending (its status pipe in pending; the
    server can write the job's record while the child sets up), else the error."""
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
    pending[status_r] = _Pending(msg["seq"], pid)
    return {"seq": msg["seq"], "forked": pid}


def _settle(fd: int, job: _Pending) -> dict[str, Any] | None:
    """Read a pending child's status pipe: None while it has not exec'd, else the reply (EOF without a report:
    the exec succeeded, the pipe closed on exec)."""
    chunk = os.read(fd, 4096)
    if chunk:
        job.report.append(chunk)
        return None
    os.close(fd)
    if not job.report:
        return {"seq": job.seq, "pid": job.pid}
    if job.status is None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(job.pid, 0)
    report: dict[str, Any] = json.loads(b"".join(job.report))
    report["seq"] = job.seq
    return report


def _reap(sock: socket.socket, leaders: set[int], pending: dict[int, _Pending]) -> None:
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
            continue
        for job in pending.values():
            if job.pid == pid:
                job.status = status


def _serve(sock: socket.socket, wake_r: int) -> None:
    leaders: set[int] = set()
    pending: dict[int, _Pending] = {}  # status pipe -> its child
    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r, *pending], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
        for fd in ready:
            job = pending.get(fd)
            if job is None:
                continue
            reply = _settle(fd, job)
            if reply is None:
                continue
            del pending[fd]
            sock.sendall(json.dumps(reply).encode())
            if "pid" in reply:
                if job.status is None:
                    leaders.add(job.pid)
                else:  # it exited before the loop saw its exec: its exit follows its pid
                    sock.sendall(json.dumps({"exit": job.pid, "status": job.status}).encode())
        if sock.fileno() in ready:
            # descriptors arriving by SCM_RIGHTS are inheritable unless asked otherwise
            msg_bytes, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 8, socket.MSG_CMSG_CLOEXEC)
            if not msg_bytes:
                return
            sock.sendall(json.dumps(_spawn(json.loads(msg_bytes), fds, pending)).encode())
        _reap(sock, leaders, pending)


def helper_main(sock_fd: int, server_pid: int) -> None:
    """The helper's loop: spawn on request, reap on SIGCHLD, exit when the server goes away."""
    sock = socket.socket(fileno=sock_fd)
    os.set_inheritable(sock_fd, False)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:
        os._exit(0)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # no setuid binary, file capability or LSM transition can give a job more than it starts with
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    # Ctrl-C in the server's terminal is the server's to handle; the helper ends when its socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _ignored[:] = [s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN]
    # Nothing here makes reference cycles worth collecting, and a collection in a fresh child would touch (and
    # copy) every object the helper has.
    gc.disable()
    gc.freeze()
    sock.sendall(json.dumps({"ready": os.getpid()}).encode())
    _serve(sock, wake_r)


if __name__ == "__main__":
    helper_main(int(sys.argv[1]), int(sys.argv[2]))
