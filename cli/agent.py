"""jobctl's command server ("the agent"): one per user and installation, started by the front end (cli/front.py).

It imports grpc, click and all of jobctl once, never creates a channel itself, and forks a child per command (the
parent stays single-threaded and grpc-free, so every child is a clean process: nothing of grpc crosses a fork). The
child takes the command's argv, environment, umask, working directory and stdio, runs jobctl's own in-process main
and exits; the parent reports the exit status to the front end and forwards the signals it sends. A command thus has
its own os.environ, sys.stdout and signal handlers exactly as in a process of its own.

A spare child is forked ahead for the target and certificate files the last command used: it has connected a
channel (TLS and HTTP/2 done) and hands it to JobClient when the command asks for the same target and files of the
same bytes (a changed file makes a new channel) and the channel is still READY. The agent ends after
JOBCTL_AGENT_IDLE seconds (default 300) without a command, and retires when its code changes on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import front

if TYPE_CHECKING:
    from pathlib import Path

    import grpc

log = logging.getLogger("jobctl.agent")
IDLE_ENV = "JOBCTL_AGENT_IDLE"
DEFAULT_IDLE = 300.0
REQUEST_TIMEOUT = 5.0  # for a front end to send its request once connected (it gives up sooner: ANSWER_TIMEOUT)
MAX_REQUEST = 8 << 20  # argv and environment: Linux gives exec at most a quarter of the stack limit (2 MiB)
# what the interpreter read at start-up: a command whose values differ runs in its own process
IDENTITY = (b"LANG", b"LC_ALL", b"LC_CTYPE")
PROXY = (b"http_proxy", b"https_proxy", b"no_proxy", b"all_proxy", b"grpc_proxy", b"no_grpc_proxy")
PRELOAD = (
    "click",
    "click.shell_completion",
    "grpc",
    "jobsvc._pb.jobs_pb2",
    "jobsvc._pb.jobs_pb2_grpc",
    "jobsvc.wire",
    "jobsvc.limits",
    "jobsvc.states",
    "jobctl.main",
    "jobctl.client",
    "jobctl.render",
    "jobctl.resume",
    "jobctl.config",
    "tomllib",
    "json",
    "datetime",
    "concurrent.futures",
    "importlib.metadata",
)

GO = b"go"  # a child's frame: the command's set-up is done, it waits for RUN
RUN = b"run"  # to a child: its front end has committed to the command (front.COMMIT), run it
FORWARDED_TO_COMMAND = [s for s in front.FORWARDED if s != signal.SIGTSTP]  # the agent sends SIGSTOP for it
Key = tuple[str, tuple[str, str, str]]  # target, (CA, certificate, key) as absolute paths


def identity(env: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {k: v for k, v in env.items() if k.startswith(b"PYTHON") or k in IDENTITY}


def grpc_env(env: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """What grpc's C core reads when it starts, with the default JobClient gives GRPC_VERBOSITY."""
    found = {k: v for k, v in env.items() if k.upper().startswith(b"GRPC_") or k.lower() in PROXY}
    found.setdefault(b"GRPC_VERBOSITY", b"NONE")
    return found


@dataclass(eq=False)
class Child:
    pid: int
    pidfd: int
    chan: socket.socket  # requests to it, the settings its JobClient used from it
    grpc: dict[bytes, bytes]
    key: Key | None = None  # its connected channel's target and files (None: no channel)
    conn: socket.socket | None = None  # the front end whose command it runs
    inbox: bytes = b""
    ready: bool = False  # it has taken on the command's set-up (GO) and waits for RUN
    accepted: bool = False  # it was sent RUN: the front end waits for its end
    exited: bool = field(default=False)


@dataclass(eq=False)
class Request:
    """A front end's connection until its request has come whole (read as it comes: one slow client blocks no one)."""

    conn: socket.socket
    deadline: float
    data: bytes = b""
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.conn.close()


class Agent:
    def __init__(self, directory: str, idle: float) -> None:
        self.directory = directory
        self.idle = idle
        self.sock_path, self.pid_path, _ = front.paths(directory)
        self.env = dict(os.environb)
        self.identity = identity(self.env)
        self.sel = selectors.DefaultSelector()
        self.lock_fd: int | None = None
        self.listener: socket.socket | None = None
        self.listener_ino = 0
        self.children: dict[int, Child] = {}
        self.requests: list[Request] = []
        self.spare: Child | None = None
        self.last_key: Key | None = None
        self.last_active = time.monotonic()
        self.watched: dict[str, tuple[int, int, int]] = {}
        self.served = 0

    # -- start-up -----------------------------------------------------------------------------------------------

    def lock(self) -> bool:
        """One agent per user and installation: the one that holds the lock on the pid file."""
        fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.lock_fd = fd
        return True

    def preload(self) -> None:
        import importlib

        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError as e:
                log.warning("cannot preload %s: %s", name, e)
        for name, module in list(sys.modules.items()):
            top = name.partition(".")[0]
            path = getattr(module, "__file__", None)
            if path and (top in ("jobctl", "jobsvc") or name in ("click", "grpc")):
                self.watched[path] = self._stamp(path)
        gc.freeze()  # what the children share stays shared: the collector does not touch (and so copy) it

    @staticmethod
    def _stamp(path: str) -> tuple[int, int, int]:
        try:
            st = os.stat(path)
        except OSError:
            return (0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def stale(self) -> bool:
        return any(self._stamp(path) != stamp for path, stamp in self.watched.items())

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # a stale socket: we hold the lock, so no live agent owns it
            os.unlink(self.sock_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.sock_path)
        os.chmod(self.sock_path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener
        self.listener_ino = os.stat(self.sock_path).st_ino
        self.sel.register(listener, selectors.EVENT_READ, self.on_accept)
        self.last_active = time.monotonic()  # the idle time counts from here, not from before the imports
        log.info("pid %d listening on %s (idle timeout %gs)", os.getpid(), self.sock_path, self.idle)

    def retire(self) -> None:
        """Take no more commands and let a successor start; the running ones finish."""
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                if os.stat(self.sock_path).st_ino == self.listener_ino:
                    os.unlink(self.sock_path)
            except OSError:
                pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.spare is not None:
            self.drop(self.spare)

    # -- the loop -----------------------------------------------------------------------------------------------

    def busy(self) -> bool:
        return bool(self.requests) or any(c.conn is not None for c in self.children.values())

    def serve(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """One round of the loop; False once the agent is done."""
        busy = self.busy()
        if self.listener is None and not busy:
            return False
        now = time.monotonic()
        if self.requests:
            timeout: float | None = max(0.0, min(r.deadline for r in self.requests) - now)
        else:
            timeout = None if busy else max(0.0, self.last_active + self.idle - now)
        events = self.sel.select(timeout)
        registered = self.sel.get_map()
        for key, _ in events:
            # an earlier callback of this round may have closed this one's descriptor (a child's exit closes its
            # channel and its front end's connection), and its number may be registered anew since
            if registered.get(key.fd) is key:
                key.data(key.fileobj)
        self.expire(time.monotonic())
        if not events and not self.busy() and time.monotonic() - self.last_active >= self.idle:
            log.info("idle for %gs", self.idle)
            self.retire()
            return False
        return True

    def on_accept(self, listener: Any) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: those who wait run in-process after their timeout
                log.warning("accept failed: %s", e)
                return
            try:
                uid = front.peer_uid(conn)
                if uid != os.getuid():
                    log.warning("refused a connection from uid %d", uid)
                    conn.close()
                    continue
                conn.setblocking(False)
                conn.send(front.HELLO + b"\0")
            except OSError:
                conn.close()
                continue
            request = Request(conn, time.monotonic() + REQUEST_TIMEOUT)
            self.requests.append(request)
            self.sel.register(conn, selectors.EVENT_READ, lambda _c, r=request: self.on_request(r))

    def end_request(self, request: Request) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(request.conn)
        with contextlib.suppress(ValueError):
            self.requests.remove(request)
        request.close()

    def expire(self, now: float) -> None:
        for request in [r for r in self.requests if r.deadline <= now]:
            log.warning("dropped a connection that sent no whole request within %gs", REQUEST_TIMEOUT)
            self.end_request(request)

    def on_request(self, request: Request) -> None:
        """More of a request; once it is whole, take the command."""
        try:
            data, anc, _flags, _addr = request.conn.recvmsg(
                65536, socket.CMSG_SPACE(front.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionError:  # it went away (a front end that gave up, a probe of the socket)
            self.end_request(request)
            return
        except OSError as e:
            log.warning("request failed: %s", e)
            self.end_request(request)
            return
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(raw) // 4
                request.fds += struct.unpack(f"{n}i", raw[: n * 4])
        if len(request.fds) > front.MAX_FDS:  # a front end sends its descriptors once: more would pile up here
            log.warning("request failed: more than %d descriptors", front.MAX_FDS)
            self.end_request(request)
            return
        if not data:  # it went away (a front end that gave up)
            self.end_request(request)
            return
        request.data += data
        if len(request.data) < 4:
            return
        (size,) = struct.unpack("!I", request.data[:4])
        if size > MAX_REQUEST or len(request.data) > 4 + size:  # a front end sends nothing more until answered
            log.warning("request failed: not a jobctl request")
            self.end_request(request)
            return
        if len(request.data) < 4 + size:
            return
        try:  # it may have given up meanwhile (this agent was stopped, say): then nothing is started for it
            gone = request.conn.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            self.end_request(request)
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(request.conn)
        try:
            self.take_command(request)
        finally:  # the child has its own copies
            with contextlib.suppress(ValueError):
                self.requests.remove(request)
            for fd in request.fds:
                os.close(fd)
            request.fds = []

    def take_command(self, request: Request) -> None:
        conn, data, fds = request.conn, request.data[4:], request.fds
        try:
            if len(fds) != 4:
                raise ValueError(f"{len(fds)} descriptors, want 4")
            _argv, env, _umask = front.decode_request(data)
            if identity(env) != self.identity:
                conn.sendall(front.REFUSED + bytes([front.REFUSED_ENV]))
                conn.close()
                return
            if self.stale():
                log.info("jobctl's code changed on disk: retiring")
                self.retire()
                conn.sendall(front.REFUSED + bytes([front.REFUSED_STALE]))
                conn.close()
                return
            child = self.take(grpc_env(env))
            try:
                front.send_frame(child.chan, data, fds)
            except OSError:
                self.drop(child)
                raise
        except (OSError, ValueError) as e:
            log.warning("request failed: %s", e)
            conn.close()
            return
        # accepted once the child has taken on the command's set-up (GO): should it fail first, the front end gets
        # no answer and runs the command itself; it runs once the front end has committed (on_front)
        child.conn = conn
        self.last_active = time.monotonic()
        self.replenish()

    def take(self, genv: dict[bytes, bytes]) -> Child:
        """The spare when it suits the command's grpc settings, else a fresh child."""
        spare = self.spare
        if spare is not None and spare.grpc == genv and not spare.exited:
            self.spare = None
            return spare
        return self.fork(None, genv)

    def replenish(self) -> None:
        if self.spare is None and self.last_key is not None and self.listener is not None:
            self.spare = self.fork(self.last_key, grpc_env(self.env))

    def fork(self, key: Key | None, genv: dict[bytes, bytes]) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves by os._exit
            try:
                self._forget_in_child()
                ours.close()
                run_child(theirs, key)
            except BaseException:
                traceback.print_exc()
            os._exit(70)
        theirs.close()
        child = Child(pid, os.pidfd_open(pid), ours, genv, key)
        self.watch(child)
        return child

    def watch(self, child: Child) -> None:
        self.children[child.pid] = child
        self.sel.register(child.pidfd, selectors.EVENT_READ, lambda _f, ch=child: self.on_exit(ch))
        self.sel.register(child.chan, selectors.EVENT_READ, lambda _s, ch=child: self.on_report(ch))

    def _forget_in_child(self) -> None:
        """Close the parent's descriptors in a new child (a child must not keep the lock or another's socket)."""
        self.sel.close()
        if self.listener is not None:
            self.listener.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        for other in self.children.values():
            os.close(other.pidfd)
            other.chan.close()
            if other.conn is not None:
                other.conn.close()
        for request in self.requests:  # others' stdio and working directories (and, for a fresh child, its own)
            request.close()

    def on_front(self, child: Child) -> None:
        """The front end's COMMIT or a signal from it, or its end (it was killed: so is the command, as in one
        process; before its COMMIT, it gave up: the command never ran)."""
        if child.conn is None:
            return
        try:
            data = child.conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(child.conn)
            child.conn.close()
            child.conn = None
            if not child.exited:
                self._kill(child, signal.SIGKILL)
            return
        child.inbox += data
        while len(child.inbox) >= 2:
            what, number = child.inbox[:1], child.inbox[1]
            child.inbox = child.inbox[2:]
            if what == front.COMMIT and not child.accepted:
                try:
                    front.send_frame(child.chan, RUN)
                except OSError:  # it died: on_exit tells the front end to run the command itself
                    continue
                child.accepted = True
                self.served += 1
            elif what == front.SIGNAL:
                self._kill(child, signal.SIGSTOP if number == signal.SIGTSTP else number)

    @staticmethod
    def _kill(child: Child, sig: int) -> None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(child.pidfd, sig)

    def on_report(self, child: Child) -> None:
        """A frame from a child: GO, or the target and files its JobClient used."""
        try:
            frame = front.recv_frame(child.chan)
        except OSError:
            frame = None
        if frame is None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(child.chan)
            return
        self.on_frame(child, frame)

    def on_frame(self, child: Child, frame: tuple[bytes, list[int]]) -> None:
        data, fds = frame
        for fd in fds:
            os.close(fd)
        if data == GO:
            self.ready(child)
            return
        parts = [os.fsdecode(p) for p in data.split(b"\0")]
        if len(parts) != 4:
            return
        key: Key = (parts[0], (parts[1], parts[2], parts[3]))
        self.last_key = key
        if self.spare is not None and self.spare.key != key:
            self.drop(self.spare)
        self.replenish()

    def ready(self, child: Child) -> None:
        conn = child.conn
        if conn is None or child.ready:
            return
        child.ready = True
        with contextlib.suppress(OSError):
            conn.sendall(front.ACCEPTED + b"\0")
        self.sel.register(conn, selectors.EVENT_READ, lambda _c, ch=child: self.on_front(ch))

    def on_exit(self, child: Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        child.exited = True
        # what it sent before it ended counts first, whichever of the two epoll reported first
        with contextlib.suppress(OSError):
            child.chan.setblocking(False)
        while True:
            try:
                frame = front.recv_frame(child.chan)
            except OSError:
                break
            if frame is None:
                break
            self.on_frame(child, frame)
        if child.conn is not None:
            if not child.accepted:  # nothing ran: the front end runs the command itself
                reply = front.REFUSED + bytes([front.REFUSED_GONE])
            elif os.WIFSIGNALED(status):
                reply = front.KILLED + bytes([os.WTERMSIG(status)])
            else:
                reply = front.EXITED + bytes([os.waitstatus_to_exitcode(status) & 0xFF])
            with contextlib.suppress(OSError):  # two bytes: they fit, else the front end is gone
                child.conn.send(reply)
            self.last_active = time.monotonic()
        self.forget(child)

    def drop(self, child: Child) -> None:
        """Let an unused child go: it leaves when its request channel ends."""
        if self.spare is child:
            self.spare = None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(child.chan)
        child.chan.close()

    def forget(self, child: Child) -> None:
        if self.spare is child:
            self.spare = None
        for obj in (child.pidfd, child.chan, child.conn):
            if obj is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(obj)
        os.close(child.pidfd)
        child.chan.close()
        if child.conn is not None:
            child.conn.close()
            child.conn = None
        self.children.pop(child.pid, None)


# -- the child ------------------------------------------------------------------------------------------------------


class _Warm:
    """A channel connected ahead for a target and the bytes of its files."""

    def __init__(self, key: Key) -> None:
        target, files = key
        self.target = target
        self.pems = tuple(open(f, "rb").read() for f in files)  # noqa: SIM115 - read whole at once
        from .client import connect_ahead, open_channel

        ca, cert, private = self.pems
        self.channel = open_channel(target, ca, cert, private)
        # connect now, without waiting for it: a command that comes meanwhile must not wait for a server that is
        # down (it then fails at once, as in its own process)
        connect_ahead(self.channel)

    def fits(self, target: str, pems: tuple[bytes, bytes, bytes]) -> bool:
        if target != self.target or pems != self.pems:
            return False
        from .client import usable

        # a channel in backoff after failed attempts would fail the first call at once: a fresh one tries anew
        return usable(self.channel)


class _Hook:
    """jobctl.client.CHANNEL_HOOK in a child: tells the parent what JobClient uses; hands out the warm channel."""

    def __init__(self, chan: socket.socket, warm: _Warm | None) -> None:
        self.chan = chan
        self.warm = warm
        self.lock = threading.Lock()

    def __call__(
        self, target: str, files: tuple[Path, Path, Path], pems: tuple[bytes, bytes, bytes]
    ) -> grpc.Channel | None:
        with self.lock:
            warm, self.warm = self.warm, None
            try:
                report = [target.encode(), *(os.fsencode(os.path.abspath(f)) for f in files)]
                front.send_frame(self.chan, b"\0".join(report))
            except OSError:
                pass
        if warm is None:
            return None
        if warm.fits(target, pems):
            return warm.channel
        warm.channel.close()
        return None


def _text_stream(fd: int, template: Any, writing: bool) -> io.TextIOWrapper:
    """A sys.stdin/stdout/stderr for fd as the interpreter makes them at start-up."""
    binary = open(fd, "wb" if writing else "rb", closefd=False)  # noqa: SIM115 - it lives as long as the process
    unbuffered = bool(getattr(template, "write_through", False))  # python -u, PYTHONUNBUFFERED
    line = fd == 2 or os.isatty(fd) or unbuffered  # stderr is always line-buffered (3.9+)
    return io.TextIOWrapper(
        binary,
        encoding=template.encoding,
        errors=template.errors,
        newline=None if not writing else "\n",
        line_buffering=line and writing,
        write_through=unbuffered and writing,
    )


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_child(chan: socket.socket, key: Key | None) -> None:
    """Wait for one command (a spare first connects its channel), run it as jobctl would in-process, exit."""
    parent = os.getppid()
    for sig in front.FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(0)
    from . import client

    warm = None
    if key is not None:
        try:
            warm = _Warm(key)
        except Exception as e:
            log.info("spare: no channel to %s: %s", key[0], e)
    client.CHANNEL_HOOK = _Hook(chan, warm)
    frame = front.recv_frame(chan)
    if frame is None:
        os._exit(0)
    data, fds = frame
    caught: list[int] = []
    agent_log = os.dup(2)
    try:
        argv, env, umask = front.decode_request(data)
        os.environb.clear()
        os.environb.update(env)
        time.tzset()
        os.umask(umask)
        os.fchdir(fds[3])
        for n in range(3):
            os.dup2(fds[n], n)
        for fd in fds:
            os.close(fd)
        logging.root.handlers.clear()  # as in a fresh process: no handler (the agent's log is not the command's)
        templates = (sys.__stdin__, sys.__stdout__, sys.__stderr__)
        for n, name in enumerate(("stdin", "stdout", "stderr")):
            stream = _text_stream(n, templates[n], writing=n > 0)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
        sys.argv = [os.fsdecode(a) for a in argv]
        from .main import main as run_in_process

        # a signal forwarded right after the COMMIT waits until the command runs (as it would reach a fresh
        # process's main()) rather than end this set-up
        for sig in FORWARDED_TO_COMMAND:
            signal.signal(sig, lambda signum, _frame: caught.append(signum))
        front.send_frame(chan, GO)
        go = front.recv_frame(chan)
        if go is None or go[0] != RUN:  # the front end gave up (it runs the command itself) or went away
            os._exit(0)
    except BaseException:  # nothing ran: the front end runs the command itself; the reason goes to the log
        os.write(agent_log, traceback.format_exc().encode(errors="replace"))
        os._exit(70)
    os.close(agent_log)

    for sig in FORWARDED_TO_COMMAND:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for signum in caught:
            signal.raise_signal(signum)
        run_in_process()  # leaves by os._exit
    except KeyboardInterrupt:  # before jobctl's own handlers: as Python leaves, of SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(1)


def _idle_seconds() -> float:
    text = os.environ.get(IDLE_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_IDLE
    return value if value > 0 else DEFAULT_IDLE


def main() -> None:
    """`python -m jobctl.agent`: what the front end starts."""
    directory = front.socket_dir()
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:  # its runtime directory is gone (its session ended)
        sys.exit(f"jobctl agent: {directory}: {e.strerror}")
    if not front.private_dir(directory):
        sys.exit(f"jobctl agent: {directory} must be a directory of uid {os.getuid()} with mode 0700")
    agent = Agent(directory, _idle_seconds())
    if not agent.lock():
        sys.exit(0)  # another agent of this installation runs (or starts)
    log_path = front.paths(directory)[2]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 2)  # tracebacks land in the log too
    os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        agent.preload()
        agent.listen()
        agent.serve()
    finally:
        agent.retire()
        log.info("leaving after %d commands", agent.served)
        logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
