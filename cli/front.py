"""jobctl's front end: hand the command to this user's warm command server (cli/agent.py), else run it here.

It imports only what the interpreter has already loaded or builds in (`_socket`, `_signal`, `_struct` rather than
their pure-Python wrappers, which cost a few ms of enum building each), so a command through the agent costs about
a bare interpreter start. It sends argv, the environment, the umask and descriptors 0, 1, 2 and the working
directory (SCM_RIGHTS) over a Unix socket in a 0700 directory of its own uid, forwards signals, and exits with the
code (or dies of the signal) the agent reports. On any problem before the agent accepted the command it runs the
command in this process instead, exactly as without an agent; so does an agent that has not answered within
ANSWER_TIMEOUT (stopped, wedged or swamped). The command runs only once this process has answered the agent's
acceptance (COMMIT): a front end that gave up on a slow agent never has its command run there as well.
"""

from __future__ import annotations

import _socket
import _struct
import os
import stat
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs more than all the rest of this module
if TYPE_CHECKING:  # the same functions; the wrapper module only adds enums (and costs their building)
    import signal as _signal
else:
    import _signal

PROTOCOL = b"jobctl-agent/2"
NO_AGENT = "JOBCTL_NO_AGENT"
# every message but the request is two bytes: what, and a number. The agent sends HELLO once it has taken the
# connection (only then does the request, with the stdio descriptors, go: descriptors queued to an agent that is
# stopped would stay open until it runs again), ACCEPTED (its child has taken on the command's set-up) or REFUSED,
# then EXITED or KILLED; the front end sends COMMIT (run it), then SIGNALs.
HELLO, ACCEPTED, REFUSED, EXITED, KILLED, SIGNAL, COMMIT = b"H", b"A", b"R", b"E", b"K", b"S", b"C"
# the child died before it ran anything; a different interpreter set-up; the agent's code changed on disk (it retires)
REFUSED_GONE, REFUSED_ENV, REFUSED_STALE = 0, 1, 2
# for the agent to take the connection and the request and to accept it; past it the command runs here
ANSWER_TIMEOUT = 3.0
# forwarded to the command as they come; SIGTSTP stops the command and then this process, SIGCONT wakes both
FORWARDED = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
    _signal.SIGWINCH,
    _signal.SIGTSTP,
    _signal.SIGCONT,
)
MAX_FDS = 8
# before the agent has accepted, one of these ends the wait at once (the process then leaves as it would have)
ENDING = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2)


def socket_dir() -> str:
    """$XDG_RUNTIME_DIR/jobctl, or /tmp/jobctl-UID without one."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "jobctl") if runtime else f"/tmp/jobctl-{os.getuid()}"


def installation() -> str:
    """Names this interpreter and jobctl's code: each installation of a user has its own agent (two venvs must
    never run each other's code)."""
    h = 0xCBF29CE484222325  # FNV-1a: no hashlib (it loads OpenSSL) for 16 hex digits
    for byte in os.fsencode(sys.executable + "\0" + os.path.dirname(os.path.abspath(__file__))):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def paths(directory: str | None = None) -> tuple[str, str, str]:
    """(socket, pid/lock file, log file) of this installation's agent."""
    d = directory or socket_dir()
    base = os.path.join(d, "agent-" + installation())
    return base + ".sock", base + ".pid", base + ".log"


def private_dir(path: str) -> bool:
    """path is a real directory (not a link) owned by this uid that no one else may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def peer_uid(sock: _socket.socket) -> int:
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int(_struct.unpack("3i", creds)[1])


def send_frame(sock: _socket.socket, data: bytes, fds: list[int] = []) -> None:  # noqa: B006 (never mutated)
    """A length-prefixed frame, with fds (SCM_RIGHTS) on its first byte."""
    frame = _struct.pack("!I", len(data)) + data
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sent = sock.sendmsg([frame], anc)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_frame(sock: _socket.socket) -> tuple[bytes, list[int]] | None:
    """One frame and the fds that came with it; None at a clean end of the stream."""
    fds: list[int] = []
    data, anc, _flags, _addr = sock.recvmsg(65536, _socket.CMSG_SPACE(MAX_FDS * 4), _socket.MSG_CMSG_CLOEXEC)
    for level, kind, raw in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            n = len(raw) // 4
            fds += _struct.unpack(f"{n}i", raw[: n * 4])
    if not data:
        return None
    try:
        while len(data) < 4:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("frame cut short")
            data += more
        (size,) = _struct.unpack("!I", data[:4])
        while len(data) < 4 + size:
            more = sock.recv(max(65536, 4 + size - len(data)))
            if not more:
                raise ConnectionError("frame cut short")
            data += more
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data[4 : 4 + size], fds


def encode_request(argv: list[bytes], env: list[bytes], umask: int) -> bytes:
    """NUL-separated: no argument or environment entry can hold a NUL."""
    return b"\0".join([PROTOCOL, b"%d" % umask, b"%d" % len(argv), *argv, *env])


def decode_request(data: bytes) -> tuple[list[bytes], dict[bytes, bytes], int]:
    """(argv, environment, umask); ValueError when it is not a request of this protocol."""
    fields = data.split(b"\0")
    if len(fields) < 3 or fields[0] != PROTOCOL:
        raise ValueError("not a jobctl-agent/1 request")
    umask, n = int(fields[1]), int(fields[2])
    if len(fields) < 3 + n:
        raise ValueError("argv cut short")
    env = {}
    for entry in fields[3 + n :]:
        name, sep, value = entry.partition(b"=")
        if sep:
            env[name] = value
    return fields[3 : 3 + n], env, umask


def _agent_enabled(argv: list[str]) -> bool:
    if os.environ.get(NO_AGENT, "") not in ("", "0"):
        return False
    for arg in argv:
        if arg == "--":
            break
        if arg == "--no-agent":
            return False
    return True


def _fds_open() -> bool:
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False
    return True


def _run_here() -> None:
    from .main import main as run_in_process

    run_in_process()


def _agent_running(pid_file: str) -> bool:
    """An agent holds the lock on its pid file from before it listens until it retires."""
    import fcntl

    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def start_agent(directory: str | None = None) -> None:
    """Start this installation's agent, detached: its own session, stdio on /dev/null, cwd /."""
    d = directory or socket_dir()
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return
    if not private_dir(d) or _agent_running(paths(d)[1]):
        return
    env = {k: v for k, v in os.environb.items() if k != b"_JOBCTL_COMPLETE"}
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or leaves at once
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 1 << 20)
            os.chdir("/")
            # -P: nothing from the current directory on sys.path, as for the console script
            os.execve(sys.executable, [sys.executable, "-P", "-m", "jobctl.agent"], env)
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


class _Forwarder:
    """Signals while the agent runs the command: each goes to the command, as if it had come to this process."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.accepted = False
        self.pending: list[int] = []
        self.sent: list[int] = []  # forwarded since the COMMIT
        self.waiting = True  # for the agent: an ENDING signal interrupts the wait
        for sig in FORWARDED:
            _signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if not self.accepted:
            self.pending.append(signum)
            if self.waiting and signum in ENDING:
                raise InterruptedError(f"signal {signum}")  # an OSError: through_agent's cleanup acts on it
            return
        try:
            self.sock.sendall(SIGNAL + bytes([signum]))
        except OSError:
            return
        self.sent.append(signum)
        if signum == _signal.SIGTSTP:  # the command is stopped (SIGSTOP); now stop here too, as Ctrl-Z would
            _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGTSTP)
            _signal.signal(_signal.SIGTSTP, self.handle)

    def accept(self) -> None:
        self.accepted = True
        for signum in self.pending:
            self.handle(signum, None)
        self.pending.clear()

    def unaccept(self) -> None:
        """The agent's child died before it got the COMMIT: what was forwarded meanwhile counts as pending."""
        self.accepted = False
        self.pending, self.sent = self.sent, []


def _read_reply(sock: _socket.socket) -> bytes:
    reply = b""
    while len(reply) < 2:
        more = sock.recv(2 - len(reply))
        if not more:
            break
        reply += more
    return reply


def _die_of(signum: int) -> None:
    """End as the command did: of the same signal (a shell then sees what it would have seen in process)."""
    _signal.signal(signum, _signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def through_agent(argv: list[str]) -> int | None:
    """Run argv through the agent: its exit code, or None when this process must run the command itself."""
    sock_path, _pid_file, _log = paths()
    if not private_dir(os.path.dirname(sock_path)):
        start_agent()
        return None
    try:
        st = os.lstat(sock_path)
    except OSError:
        start_agent()
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(ANSWER_TIMEOUT)  # a stopped agent's full backlog, or a request it does not read
    try:
        sock.connect(sock_path)
    except TimeoutError:
        sock.close()
        return None
    except OSError:  # refused: a stale socket (the agent ended without removing it), or a retiring agent
        sock.close()
        start_agent()
        return None
    forward: _Forwarder | None = None
    try:
        # from here a Ctrl-C before the agent accepts leaves as it would in-process (130), also while this waits
        forward = _Forwarder(sock)
        if peer_uid(sock) != os.getuid() or _read_reply(sock) != HELLO + b"\0":
            return None
        umask = os.umask(0)
        os.umask(umask)
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            request = encode_request(
                [os.fsencode(a) for a in argv], [k + b"=" + v for k, v in os.environb.items()], umask
            )
            send_frame(sock, request, [0, 1, 2, cwd])
        finally:
            os.close(cwd)
        reply = _read_reply(sock)  # TimeoutError (an OSError) after ANSWER_TIMEOUT: nothing has run
        if reply[:1] != ACCEPTED:
            if reply == REFUSED + bytes([REFUSED_STALE]):
                start_agent()  # the old one has let go of its lock: its successor runs the new code
            return None
        sock.settimeout(None)  # from here the command runs for as long as it runs
        forward.waiting = False  # a signal from here on is the command's: held, then forwarded once it runs
        sock.sendall(COMMIT + b"\0")
        forward.accept()
        reply = _read_reply(sock)
        if reply[:1] == REFUSED:
            forward.unaccept()
            return None
    except OSError:
        if forward is None or not forward.accepted:
            return None
        reply = b""
    finally:
        if forward is not None:
            forward.waiting = False
        if forward is None or not forward.accepted:
            sock.close()  # the agent lets go of what it holds for this command (its child, our descriptors)
        if forward is not None and not forward.accepted:
            for sig in FORWARDED:
                _signal.signal(sig, _signal.SIG_DFL if sig != _signal.SIGINT else _signal.default_int_handler)
            for signum in forward.pending:  # came before anything ran: leave as a Ctrl-C / the signal would
                if signum == _signal.SIGINT:
                    os._exit(130)
                if signum not in (_signal.SIGWINCH, _signal.SIGCONT, _signal.SIGTSTP):
                    _die_of(signum)
    if len(reply) == 2 and reply[:1] == EXITED:
        return reply[1]
    if len(reply) == 2 and reply[:1] == KILLED:
        _die_of(reply[1])
    os.write(2, b"jobctl: the command server (jobctl agent) ended before the command did\n")
    return 1


def main() -> None:
    """The `jobctl` console script."""
    if _agent_enabled(sys.argv[1:]) and _fds_open():
        code = through_agent(sys.argv)
        if code is not None:
            os._exit(code)
    _run_here()
