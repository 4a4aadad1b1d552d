"""The connection reserve: connections not yet authenticated may take only the part of --max-connections that is
not reserved, so that clients with a certificate can still connect while a flood of silent connections lasts.

grpc core (1.85) counts only all connections together (grpc.max_allowed_incoming_connections) and has no channel
argument for pending handshakes, and grpcio cannot accept from a socket it is given; relaying every byte through
jobsvc to a private grpc port costs 6-15% of the streaming throughput (measured), too much for a default. So grpc
keeps its listener and every connection, and this watcher sits beside it: each time the listener is woken by new
connections it lists the server's established TCP connections from the kernel (sock_diag, filtered to the
listening port), and when those that have made no authenticated call exceed the unreserved part it shuts the excess
down, those that never sent a byte first, then the oldest. grpc sees the shutdown as the client closing and lets
the connection go. A connection counts as authenticated from its first call with a verified, allowed certificate
(IdentityInterceptor tells this watcher the call's peer address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger("jobsvc.server")

# linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_INFO = 2
_BC_S_GE, _BC_S_LE = 2, 3
_TCP_ESTABLISHED, _TCP_LISTEN = 1, 10
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info (kernel 4.1 and newer)

# A burst of new connections is swept once: the first wake-up waits this long for the rest of the burst.
SWEEP_DELAY = 0.02


@dataclass(frozen=True)
class Connection:
    """One established connection to the server's port, as the kernel lists it."""

    peer: str  # as grpc names it in context.peer(): ipv4:1.2.3.4:5678, ipv6:[::1]:5678
    inode: int  # of the server's socket (0 while it waits in the accept queue)
    received: int  # bytes the client has sent (0: a silent connection)


def reserve_default(max_connections: int) -> int:
    """The default reserve: an eighth of the connections (at least one when there are two or more)."""
    return max(1 if max_connections > 1 else 0, max_connections // 8)


def excess(
    connections: Sequence[Connection], authenticated: set[str], first_seen: dict[int, float], unreserved: int
) -> list[Connection]:
    """The unauthenticated connections beyond `unreserved`, in the order they should go: silent ones before those
    that have spoken, and among each the oldest first (an attacker's older connections before a client that has
    only just begun its handshake)."""
    pending = [c for c in connections if c.peer not in authenticated and c.inode]
    over = len(pending) - unreserved
    if over <= 0:
        return []
    pending.sort(key=lambda c: (c.received > 0, first_seen.get(c.inode, 0.0)))
    return pending[:over]


def _peer(family: int, address: bytes, port: int) -> str:
    if family == socket.AF_INET6:
        ip = socket.inet_ntop(socket.AF_INET6, address[:16])
        if ip.startswith("::ffff:") and "." in ip:  # a v4 client of a dual-stack listener: grpc names it ipv4
            return f"ipv4:{ip[7:]}:{port}"
        return f"ipv6:[{ip}]:{port}"
    return f"ipv4:{socket.inet_ntop(socket.AF_INET, address[:4])}:{port}"


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


def listed(port: int, state: int = _TCP_ESTABLISHED) -> list[Connection]:
    """The TCP sockets of this host in `state` whose local port is `port`, IPv4 and IPv6 (sock_diag)."""
    found: list[Connection] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            nl.send(_request(family, port, state))
            while not _parse(nl.recv(1 << 16), found):
                pass
    return found


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


def shut_down(fd: int, inode: int) -> bool:
    """Shut the socket at fd down (its owner, grpc, sees the peer gone and closes it) if fd still is that socket."""
    try:
        dup = os.dup(fd)  # holds the socket: fd may be closed and reused meanwhile
    except OSError:
        return False
    try:
        if os.fstat(dup).st_ino != inode:
            return False
        with socket.socket(fileno=os.dup(dup)) as s:
            s.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        os.close(dup)


class ConnectionReserve:
    """Keeps connections without an authenticated call to max_connections - reserved (see the module's doc)."""

    def __init__(self, max_connections: int, reserved: int) -> None:
        if not 0 < reserved < max_connections:
            raise ValueError(f"the reserve ({reserved}) must be at least 1 and less than the connections allowed")
        self.unreserved = max_connections - reserved
        self.reserved = reserved
        self._authenticated: set[str] = set()
        self._first_seen: dict[int, float] = {}
        self._port = 0
        self._epoll: select.epoll | None = None
        self._listener = -1
        self._scheduled = False
        self.closed = 0  # connections shut down so far (for the log and the tests)

    def admit(self, peer: str) -> None:
        """A call from peer passed the identity check: its connection may use the reserve."""
        if peer not in self._authenticated:
            self._authenticated.add(peer)

    def watch(self, port: int) -> None:
        """Sweep whenever grpc's listener on port is woken by a new connection (call once the server started)."""
        listeners = socket_fds(c.inode for c in listed(port, _TCP_LISTEN))
        if not listeners:
            raise RuntimeError(f"no listening socket of this process on port {port}")
        self._port = port
        self._epoll = select.epoll()
        for fd in listeners.values():
            # edge-triggered: one wake-up per arrival, whether grpc has accepted it already or not
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._woken)
        log.info(
            "connections without an authenticated call: at most %d (%d more reserved for authenticated ones)",
            self.unreserved,
            self.reserved,
        )

    def close(self) -> None:
        if self._epoll is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _woken(self) -> None:
        assert self._epoll is not None
        self._epoll.poll(0)  # consume the edge
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(SWEEP_DELAY, self._sweep_now)

    def _sweep_now(self) -> None:
        self._scheduled = False
        try:
            self.sweep()
        except OSError as e:
            log.error("connection reserve: cannot list connections: %s", e)

    def sweep(self) -> list[Connection]:
        """Shut down the unauthenticated connections beyond the unreserved part; the ones shut down."""
        now = time.monotonic()
        connections = listed(self._port)
        present = {c.peer for c in connections}
        self._authenticated &= present  # a closed connection's address may come back as someone else's
        inodes = {c.inode for c in connections}
        self._first_seen = {i: self._first_seen.get(i, now) for i in inodes}
        victims = excess(connections, self._authenticated, self._first_seen, self.unreserved)
        if any(not c.inode for c in connections) and not self._scheduled:
            # some still wait in the accept queue, uncounted: look again once grpc has taken them
            self._scheduled = True
            asyncio.get_running_loop().call_later(SWEEP_DELAY, self._sweep_now)
        if not victims:
            return []
        fds = socket_fds(c.inode for c in victims)
        done = [c for c in victims if c.inode in fds and shut_down(fds[c.inode], c.inode)]
        self.closed += len(done)
        log.warning(
            "%d connections without an authenticated call over the %d allowed: closed %d (%d silent)",
            len(victims) + self.unreserved,
            self.unreserved,
            len(done),
            sum(1 for c in done if not c.received),
        )
        return done
