"""The connection reserve: connections not yet authenticated may take only the part of --max-connections that is
not reserved, so that clients with a certificate can still connect while a flood of silent connections lasts.

grpc core (1.85) counts only all connections together (grpc.max_allowed_incoming_connections) and has no channel
argument for pending handshakes, and grpcio cannot accept from a socket it is given; relaying every byte through
jobsvc to a private grpc port costs 6-15% of the streaming throughput (measured), too much for a default. So grpc
keeps its listener and every connection, and this sweep runs beside it on the event loop, every SWEEP_PERIOD: it
lists the server's established TCP connections from the kernel (sock_diag, filtered to the listening port; where
the kernel has no inet_diag, /proc/net/tcp and tcp6), and when those that have made no authenticated call exceed the
unreserved part it shuts the excess down, those that never sent a byte first, then the oldest. grpc sees the
shutdown as the client closing and lets the connection go. A connection counts as authenticated from its first call
with a verified, allowed certificate (IdentityInterceptor tells the reserve the call's peer address).

Why a period and not a wake-up by the listener: an epoll edge on grpc's listening socket is lost whenever grpc's
own poller accepts the connection first (epoll re-checks the listener when it reports, finds the accept queue
empty and drops the event), which is the usual case; it was the only trigger once, and in a slow VM guest it never
fired after the first burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

log = logging.getLogger("jobsvc.server")

# linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_INFO = 2
_BC_S_GE, _BC_S_LE = 2, 3
TCP_ESTABLISHED, TCP_LISTEN = 1, 10
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info (kernel 4.1 and newer)

# How often the connections are counted: how long a flood may hold the reserve before its excess is shut down.
SWEEP_PERIOD = 0.5


@dataclass(frozen=True)
class Connection:
    """One connection to the server's port (or its listening socket), as the kernel lists it."""

    peer: str  # as grpc names it in context.peer(): ipv4:1.2.3.4:5678, ipv6:[::1]:5678
    inode: int  # of the server's socket (0 while it waits in the accept queue)
    received: int  # bytes the client has sent (0: a silent connection)


FAMILIES = (socket.AF_INET, socket.AF_INET6)

# How the TCP sockets of a port in a state, of some address families, are listed: listed() (sock_diag) or
# listed_in_proc() (/proc/net/tcp*).
Lister = Callable[[int, int, Sequence[int]], list[Connection]]


def reserve_default(max_connections: int) -> int:
    """The default reserve: an eighth of the connections (at least one when there are two or more)."""
    return max(1 if max_connections > 1 else 0, max_connections // 8)


def pending(connections: Sequence[Connection], authenticated: set[str]) -> list[Connection]:
    """The connections grpc holds (accepted) that have made no authenticated call."""
    return [c for c in connections if c.peer not in authenticated and c.inode]


def excess(
    connections: Sequence[Connection], authenticated: set[str], first_seen: dict[int, float], unreserved: int
) -> list[Connection]:
    """The unauthenticated connections beyond `unreserved`, in the order they should go: silent ones before those
    that have spoken, and among each the oldest first (an attacker's older connections before a client that has
    only just begun its handshake)."""
    waiting = pending(connections, authenticated)
    over = len(waiting) - unreserved
    if over <= 0:
        return []
    waiting.sort(key=lambda c: (c.received > 0, first_seen.get(c.inode, 0.0)))
    return waiting[:over]


def peer_name(grpc_peer: str) -> str:
    """context.peer() in the form the listings use: grpc percent-encodes an IPv6 peer's brackets (and the % of a
    zone), as in ipv6:%5B::1%5D:5678, which the listings name ipv6:[::1]:5678; a zone (fe80::1%eth0) is dropped, as
    the kernel's listing has none."""
    name = urllib.parse.unquote(grpc_peer)
    if name.startswith("ipv6:[") and "%" in name:
        head, _, rest = name.partition("%")
        name = head + rest[rest.index("]") :] if "]" in rest else name
    return name


def _peer(family: int, address: bytes, port: int) -> str:
    if family == socket.AF_INET6:
        ip = socket.inet_ntop(socket.AF_INET6, address[:16])
        if ip.startswith("::ffff:") and "." in ip:  # a v4 client of a dual-stack listener: grpc names it ipv4
            return f"ipv4:{ip[7:]}:{port}"
        return f"ipv6:[{ip}]:{port}"
    return f"ipv4:{socket.inet_ntop(socket.AF_INET, address[:4])}:{port}"


# -- sock_diag ----------------------------------------------------------------------------------------------------


def _request(family: int, port: int, state: int) -> bytes:
    """A sock_diag dump request for TCP sockets of `family` in `state` whose local port is `port`."""
    # The kernel runs this filter: sport >= port, then sport <= port; a jump past the end (len + 4) rejects.
    code = struct.pack("=BBHBBH", _BC_S_GE, 8, 20, 0, 0, port) + struct.pack("=BBHBBH", _BC_S_LE, 8, 12, 0, 0, port)
    ext = 1 << (_INET_DIAG_INFO - 1)
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, ext, 0, 1 << state) + bytes(48)  # inet_diag_req_v2
    body += struct.pack("=HH", 4 + len(code), _INET_DIAG_REQ_BYTECODE) + code
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body


def _parse(data: bytes, into: list[Connection]) -> bool:
    """Append the connections of one netlink reply to `into`; True at the end of the dump."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if kind == _NLMSG_DONE:
            return True
        if kind == _NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, off + 16)[0]
            raise OSError(err, f"sock_diag: {os.strerror(err)}")
        msg = off + 16  # struct inet_diag_msg
        family = data[msg]
        dport = struct.unpack_from("!H", data, msg + 6)[0]
        inode = struct.unpack_from("=I", data, msg + 68)[0]
        received = 0
        attr = msg + 72
        while attr + 4 <= off + length:
            alen, atype = struct.unpack_from("=HH", data, attr)
            if alen < 4:
                break
            if atype == _INET_DIAG_INFO and alen - 4 >= _TCPI_BYTES_RECEIVED + 8:
                received = struct.unpack_from("=Q", data, attr + 4 + _TCPI_BYTES_RECEIVED)[0]
            attr += (alen + 3) & ~3
        into.append(Connection(_peer(family, data[msg + 24 : msg + 40], dport), inode, received))
        off += (length + 3) & ~3
    return False


def listed(port: int, state: int = TCP_ESTABLISHED, families: Sequence[int] = FAMILIES) -> list[Connection]:
    """The TCP sockets of this host in `state` whose local port is `port`, of the address families given (sock_diag;
    each family's dump walks the kernel's whole table). OSError when the kernel cannot answer (no inet_diag or
    tcp_diag: EPROTONOSUPPORT, ENOENT)."""
    found: list[Connection] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        for family in families:
            nl.send(_request(family, port, state))
            while not _parse(nl.recv(1 << 16), found):
                pass
    return found


# -- /proc/net/tcp, where the kernel has no inet_diag ---------------------------------------------------------------


def _proc_address(family: int, text: str) -> tuple[bytes, int]:
    """An address and port of /proc/net/tcp{,6}: hex of 32-bit words in the host's byte order, ':', a hex port."""
    address, port = text.split(":")
    words = [int(address[i : i + 8], 16) for i in range(0, len(address), 8)]
    return b"".join(struct.pack("=I", w) for w in words), int(port, 16)


def parse_proc_tcp(text: str, family: int, port: int, state: int) -> list[Connection]:
    """The sockets of one /proc/net/tcp (AF_INET) or tcp6 (AF_INET6) table in `state` on local port `port`. The
    table does not say how many bytes a client sent: `received` is 0 (held_now() asks each socket)."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or int(fields[3], 16) != state:
            continue
        if _proc_address(family, fields[1])[1] != port:
            continue
        address, remote_port = _proc_address(family, fields[2])
        found.append(Connection(_peer(family, address, remote_port), int(fields[9]), 0))
    return found


def listed_in_proc(port: int, state: int = TCP_ESTABLISHED, families: Sequence[int] = FAMILIES) -> list[Connection]:
    """As listed(), from /proc/net/tcp and /proc/net/tcp6 (a host without IPv6 has no tcp6); `received` is 0."""
    found: list[Connection] = []
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        if family not in families:
            continue
        try:
            with open(path) as table:
                text = table.read()
        except FileNotFoundError:
            if family == socket.AF_INET:
                raise
            continue
        found += parse_proc_tcp(text, family, port, state)
    return found


def passive_opens() -> int | None:
    """TCP connections this network namespace has accepted so far (PassiveOpens of /proc/net/snmp), or None."""
    try:
        with open("/proc/net/snmp") as snmp:
            tcp = [line.split() for line in snmp if line.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("PassiveOpens")])
    except (OSError, IndexError, ValueError):
        return None


# -- this process's sockets ---------------------------------------------------------------------------------------


def socket_fds(inodes: Iterable[int]) -> dict[int, int]:
    """inode -> a descriptor of this process for each socket named (those it holds)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    fds: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            inode = wanted.get(os.readlink(f"/proc/self/fd/{name}"))
            if inode is not None:
                fds[inode] = int(name)
    return fds


@contextlib.contextmanager
def _held(fd: int, inode: int) -> Iterator[socket.socket | None]:
    """The socket at fd, duplicated so that it stays the same socket, or None when fd no longer is that socket."""
    try:
        dup = os.dup(fd)  # fd may be closed and reused meanwhile: the duplicate holds the socket
    except OSError:
        yield None
        return
    try:
        if os.fstat(dup).st_ino != inode:
            os.close(dup)
            yield None
            return
    except OSError:
        os.close(dup)
        yield None
        return
    with socket.socket(fileno=dup) as s:
        yield s


def tcp_state(fd: int, inode: int) -> tuple[int, int] | None:
    """(tcpi_state, tcpi_bytes_received) of the socket at fd; None when fd is no longer that socket."""
    with _held(fd, inode) as s:
        if s is None:
            return None
        try:
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return None
        if len(info) < _TCPI_BYTES_RECEIVED + 8:
            return None
        received: int = struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]
        return info[0], received


def held_now(connections: Sequence[Connection], fds: dict[int, int]) -> list[Connection]:
    """Of the connections listed, those this process holds that are still established, each once, with the bytes
    their client has sent as the socket tells them now. A listing is not a snapshot (a dump, like /proc/net/tcp,
    is read in parts while connections come and go, and may name one twice or name one since closed), so nothing
    is shut down on the listing's word alone."""
    out: dict[int, Connection] = {}
    for c in connections:
        if c.inode in fds and c.inode not in out:
            now = tcp_state(fds[c.inode], c.inode)
            if now is not None and now[0] == TCP_ESTABLISHED:
                out[c.inode] = replace(c, received=now[1])
    return list(out.values())


def shut_down(fd: int, inode: int) -> bool:
    """Shut the socket at fd down (its owner, grpc, sees the peer gone and closes it) if fd still is that socket."""
    with _held(fd, inode) as s:
        if s is None:
            return False
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True


class ConnectionReserve:
    """Keeps connections without an authenticated call to max_connections - reserved (see the module's doc)."""

    def __init__(
        self, max_connections: int, reserved: int, lister: Lister | None = None, period: float = SWEEP_PERIOD
    ) -> None:
        if not 0 < reserved < max_connections:
            raise ValueError(f"the reserve ({reserved}) must be at least 1 and less than the connections allowed")
        self.unreserved = max_connections - reserved
        self.reserved = reserved
        self.lister: Lister = lister or listed  # None: sock_diag, or /proc/net/tcp* where the kernel lacks it
        self.period = period
        # peer -> the inode of the connection that made an authenticated call (0 until a sweep has seen it)
        self._authenticated: dict[str, int] = {}
        self._unseen: set[str] = set()  # authenticated peers the last listing did not name
        self._first_seen: dict[int, float] = {}
        self._port = 0
        self._families: tuple[int, ...] = FAMILIES  # of this process's listeners on the port
        self._timer: asyncio.TimerHandle | None = None
        self._failing = ""  # the error the last sweep logged, so that a lasting one is logged once
        self._opens: int | None = None  # passive_opens() at the last sweep
        # the last sweep left something to look at again: connections over the unreserved part, or connections
        # still in the accept queue (they count once grpc has accepted them); True until the first sweep
        self._again = True
        self.closed = 0  # connections shut down so far (for the log and the tests)

    def admit(self, peer: str) -> None:
        """A call from peer (context.peer()) passed the identity check: its connection may use the reserve."""
        self._authenticated.setdefault(peer_name(peer), 0)

    def watch(self, port: int) -> bool:
        """Sweep every period from now on (call on the event loop, once the server listens on port). False, with one
        error line in the log, when this process's listener cannot be found by any means (then there is no
        reserve: nothing is swept)."""
        self._port = port
        problems = []
        for lister in dict.fromkeys([self.lister, listed_in_proc]):
            try:
                # a dual-stack listener (grpc's usual) has only AF_INET6 sockets: one dump, not two, per sweep
                families = tuple(f for f in FAMILIES if socket_fds(c.inode for c in lister(port, TCP_LISTEN, (f,))))
            except OSError as e:
                problems.append(f"{_name(lister)}: {e}")
                continue
            if families:
                self.lister, self._families = lister, families
                break
            problems.append(f"{_name(lister)}: this process's listener on port {port} is not listed")
        else:
            log.error(
                "connection reserve unavailable (%s): connections without an authenticated call are bounded only by "
                "--max-connections and --handshake-timeout",
                "; ".join(problems),
            )
            return False
        if problems:
            log.warning("connection reserve: %s; listing connections from /proc/net/tcp instead", "; ".join(problems))
        self._timer = asyncio.get_running_loop().call_later(self.period, self._tick)
        log.info(
            "connections without an authenticated call: at most %d (%d more reserved for authenticated ones), "
            "counted every %g s from %s",
            self.unreserved,
            self.reserved,
            self.period,
            _name(self.lister),
        )
        return True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        try:
            # A dump walks the kernel's whole table of connections (2-4 ms of CPU on this host's loaded 6.18);
            # reading the host's count of accepted connections costs 0.08 ms. When none was accepted since the
            # last sweep and it left nothing to look at again, the port's connections can only be fewer.
            opens = passive_opens()
            if opens is None or opens != self._opens or self._again:
                self._opens = opens
                self.sweep()
            self._failing = ""
        except Exception as e:  # a sweep that fails now may not next time; the server goes on either way
            if str(e) != self._failing:
                log.error("connection reserve: a sweep failed (logged once until it changes): %r", e)
                self._failing = str(e)
            self._again = True
        self._timer = asyncio.get_running_loop().call_later(self.period, self._tick)

    def _settle(self, named: dict[str, int]) -> set[str]:
        """The authenticated peers among those listed (peer -> inode). A peer is forgotten when a listing names it
        with another connection (its address came back as someone else's) or when two listings in a row do not
        name it (one may skip a connection: it is read while connections come and go)."""
        for peer, inode in list(self._authenticated.items()):
            now = named.get(peer)
            if now is None:
                if peer in self._unseen:
                    del self._authenticated[peer]
                    self._unseen.discard(peer)
                else:
                    self._unseen.add(peer)
            elif inode in (0, now):
                self._authenticated[peer] = now
                self._unseen.discard(peer)
            else:
                del self._authenticated[peer]
                self._unseen.discard(peer)
        return set(self._authenticated)

    def sweep(self) -> list[Connection]:
        """Shut down the unauthenticated connections beyond the unreserved part; the ones shut down."""
        now = time.monotonic()
        connections = self.lister(self._port, TCP_ESTABLISHED, self._families)
        self._first_seen = {c.inode: self._first_seen.get(c.inode, now) for c in connections}
        self._again = any(not c.inode for c in connections)
        waiting = pending(connections, self._settle({c.peer: c.inode for c in connections if c.inode}))
        if len(waiting) <= self.unreserved:
            return []
        fds = socket_fds(c.inode for c in waiting)
        waiting = held_now(waiting, fds)
        victims = excess(waiting, set(), self._first_seen, self.unreserved)
        if not victims:
            return []
        done = [c for c in victims if c.inode in fds and shut_down(fds[c.inode], c.inode)]
        self._again = True  # to see that they are gone
        self.closed += len(done)
        log.warning(
            "%d connections without an authenticated call over the %d allowed: closed %d (%d silent)",
            len(waiting),
            self.unreserved,
            len(done),
            sum(1 for c in done if not c.received),
        )
        return done


def _name(lister: Lister) -> str:
    if lister is listed:
        return "sock_diag"
    if lister is listed_in_proc:
        return "/proc/net/tcp"
    return str(getattr(lister, "__name__", lister))
