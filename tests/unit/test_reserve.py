"""The connection reserve: its choice of connections to close, its two views of the kernel's connections (sock_diag
and /proc/net/tcp), and its periodic sweep against a listener whose connections another thread accepts at once."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from jobsvc.server.reserve import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Connection,
    ConnectionReserve,
    Lister,
    excess,
    held_now,
    listed,
    listed_in_proc,
    parse_proc_tcp,
    peer_name,
    reserve_default,
    shut_down,
    socket_fds,
)


def conn(port: int, inode: int, received: int = 0) -> Connection:
    return Connection(f"ipv4:10.0.0.1:{port}", inode, received)


def test_nothing_is_closed_within_the_unreserved_part() -> None:
    conns = [conn(1000 + i, 10 + i) for i in range(4)]
    assert excess(conns, set(), {}, 4) == []


def test_authenticated_connections_do_not_count_and_silent_old_ones_go_first() -> None:
    spoke_old, silent_new, silent_old, authed = conn(1, 11, 500), conn(2, 12), conn(3, 13), conn(4, 14)
    first_seen = {11: 1.0, 12: 3.0, 13: 2.0, 14: 0.5}
    conns = [spoke_old, silent_new, silent_old, authed]
    assert excess(conns, {authed.peer}, first_seen, 1) == [silent_old, silent_new]
    assert excess(conns, {authed.peer}, first_seen, 0) == [silent_old, silent_new, spoke_old]
    assert excess(conns, set(), first_seen, 3) == [authed]  # not yet known as authenticated: the oldest silent


def test_connections_still_in_the_accept_queue_are_not_chosen() -> None:
    assert excess([conn(1, 0), conn(2, 0)], set(), {}, 0) == []


def test_the_default_reserve_and_its_bounds() -> None:
    assert [reserve_default(n) for n in (1, 2, 64, 1000)] == [0, 1, 8, 125]
    with pytest.raises(ValueError):
        ConnectionReserve(8, 8)
    with pytest.raises(ValueError):
        ConnectionReserve(8, 0)
    assert ConnectionReserve(64, 8).unreserved == 56


# Recorded on this x86-64 host (kernel 6.18): a listener on 127.0.0.1:45087 with one client, and a dual-stack
# listener on [::]:33379 with a client from ::1 and one from 127.0.0.1 (v4-mapped); each table also holds the
# clients' own ends, whose local port is theirs.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:B01F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2087945 1 00000000364b79f5 100 0 0 10 0
   2: 0100007F:DB24 0100007F:8263 01 00000000:00000000 00:00000000 00000000     0        0 2087950 2 000000002417eb7a 20 0 0 10 -1
 404: 0100007F:B01F 0100007F:A6DC 01 00000000:00000000 00:00000000 00000000     0        0 2087949 1 000000003e8dd69e 20 0 0 10 -1
 405: 0100007F:A6DC 0100007F:B01F 01 00000000:00000000 00:00000000 00000000     0        0 2087948 2 00000000b30d8ff6 20 0 0 10 -1
"""  # noqa: E501
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:8263 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2087947 1 000000005f93c184 100 0 0 10 0
   1: 00000000000000000000000001000000:8263 00000000000000000000000001000000:B404 01 00000000:00000000 00:00000000 00000000     0        0 2087953 1 000000008b85fa29 20 0 0 10 -1
   2: 00000000000000000000000001000000:B404 00000000000000000000000001000000:8263 01 00000000:00000000 00:00000000 00000000     0        0 2087952 2 00000000c808ba14 20 0 0 10 -1
   3: 0000000000000000FFFF00000100007F:8263 0000000000000000FFFF00000100007F:DB24 01 00000000:00000000 00:00000000 00000000     0        0 2087951 1 00000000b5a03ecd 20 0 0 10 -1
"""  # noqa: E501


@pytest.mark.skipif(sys.byteorder != "little", reason="the tables were recorded on a little-endian host")
def test_a_recorded_proc_net_tcp_is_read_as_grpc_names_its_peers() -> None:
    assert parse_proc_tcp(PROC_NET_TCP, socket.AF_INET, 45087, TCP_ESTABLISHED) == [
        Connection("ipv4:127.0.0.1:42716", 2087949, 0)
    ]
    assert parse_proc_tcp(PROC_NET_TCP, socket.AF_INET, 45087, TCP_LISTEN) == [Connection("ipv4:0.0.0.0:0", 2087945, 0)]
    assert parse_proc_tcp(PROC_NET_TCP6, socket.AF_INET6, 33379, TCP_ESTABLISHED) == [
        Connection("ipv6:[::1]:46084", 2087953, 0),
        Connection("ipv4:127.0.0.1:56100", 2087951, 0),  # a v4 client of the dual-stack listener
    ]
    assert parse_proc_tcp(PROC_NET_TCP, socket.AF_INET, 33379, TCP_ESTABLISHED) == []  # only the client's end


class Clients:
    """A listener on 127.0.0.1 whose connections a thread accepts the moment they arrive (as grpc's poller does,
    which leaves an epoll on the listener nothing to report), and the clients' ends."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def connect(self, first_bytes: bytes = b"") -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if first_bytes:
            client.sendall(first_bytes)
        self.clients.append(client)
        return client

    def peer(self, client: socket.socket) -> str:
        return f"ipv4:127.0.0.1:{client.getsockname()[1]}"

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
        self._thread.join(10)
        for s in [self.listener, *self.accepted, *self.clients]:
            s.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    c.close()


def closed_by_server(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_both_listings_see_this_ports_connections_with_their_peer_and_bytes(clients: Clients) -> None:
    quiet, talker = clients.connect(), clients.connect(b"hello")
    wait_until(lambda: len(clients.accepted) == 2, "accepted")
    a, b = clients.accepted
    wait_until(lambda: {c.received for c in listed(clients.port)} == {0, 5}, "the talker's bytes in tcp_info")
    by_diag = {c.peer: c for c in listed(clients.port)}
    q, t = clients.peer(quiet), clients.peer(talker)
    assert set(by_diag) == {q, t}  # the server's sockets only, not the clients' ends
    assert {by_diag[q].inode, by_diag[t].inode} == {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
    assert (by_diag[q].received, by_diag[t].received) == (0, 5)
    # /proc/net/tcp lists the same sockets; the bytes come from each socket this process holds
    in_proc = listed_in_proc(clients.port)
    assert {(c.peer, c.inode) for c in in_proc} == {(c.peer, c.inode) for c in by_diag.values()}
    fds = socket_fds(c.inode for c in in_proc)
    assert set(fds.values()) == {a.fileno(), b.fileno()}
    assert {c.peer: c.received for c in held_now(in_proc + in_proc, fds)} == {q: 0, t: 5}  # each once
    # and both find the listener
    listener = os.fstat(clients.listener.fileno()).st_ino
    assert [c.inode for c in listed(clients.port, TCP_LISTEN)] == [c.inode for c in listed_in_proc(clients.port, 10)]
    assert [c.inode for c in listed(clients.port, TCP_LISTEN)] == [listener]


def test_a_socket_is_shut_down_only_through_a_descriptor_that_still_is_it(clients: Clients) -> None:
    quiet, talker = clients.connect(), clients.connect()
    wait_until(lambda: len(clients.accepted) == 2, "accepted")
    a, b = clients.accepted
    inode = os.fstat(a.fileno()).st_ino
    assert not shut_down(b.fileno(), inode)
    assert shut_down(a.fileno(), inode)
    quiet.settimeout(10)
    assert quiet.recv(1) == b""
    talker.sendall(b"!")
    assert b.recv(1) == b"!"


@pytest.mark.parametrize("lister", [listed, listed_in_proc], ids=["sock_diag", "proc"])
async def test_the_periodic_sweep_closes_the_excess_that_no_listener_wake_up_reports(
    clients: Clients, lister: Lister
) -> None:
    reserve = ConnectionReserve(8, 2, lister=lister, period=0.05)  # 6 connections without authentication
    assert reserve.watch(clients.port)
    assert reserve._families == (socket.AF_INET,)  # an IPv4 listener: one table
    try:
        authed = clients.connect(b"a handshake and a call")
        reserve.admit(clients.peer(authed))
        talker = clients.connect(b"a handshake")
        silent = [clients.connect() for _ in range(9)]
        # 10 without an authenticated call: the 4 over go, all of them silent ones
        await asyncio.to_thread(
            wait_until, lambda: sum(map(closed_by_server, silent)) >= 4, "the excess was not shut down"
        )
        assert reserve.sweep() == []  # nothing is over any more
        assert sum(map(closed_by_server, silent)) == 4 == reserve.closed
        assert not closed_by_server(authed) and not closed_by_server(talker)
    finally:
        reserve.close()


async def test_without_sock_diag_the_reserve_lists_from_proc_and_says_so(
    clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    def no_diag(port: int, state: int, families: Sequence[int]) -> list[Connection]:
        raise OSError(2, "sock_diag: No such file or directory")

    reserve = ConnectionReserve(8, 2, lister=no_diag, period=0.05)
    with caplog.at_level(logging.INFO, "jobsvc.server"):
        assert reserve.watch(clients.port)
    reserve.close()
    assert reserve.lister is listed_in_proc
    assert "sock_diag: No such file or directory; listing connections from /proc/net/tcp instead" in caplog.text


async def test_a_reserve_that_cannot_find_its_listener_says_it_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port nobody listens on
        reserve = ConnectionReserve(8, 2, period=0.05)
        with caplog.at_level(logging.INFO, "jobsvc.server"):
            assert not reserve.watch(unused.getsockname()[1])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("connection reserve unavailable (sock_diag: ")


async def test_a_listing_that_names_connections_twice_or_skips_one_closes_no_more_than_the_excess(
    clients: Clients,
) -> None:
    # /proc/net/tcp and dumps are read in parts while connections come and go: a connection may be named twice, or
    # missed. Here every connection is named twice, and the authenticated one is missing from every other listing.
    authed = clients.connect(b"a handshake and a call")
    skipped = {"now": False}

    def unsteady(port: int, state: int, families: Sequence[int]) -> list[Connection]:
        found = listed(port, state, families)
        if state == TCP_ESTABLISHED:
            skipped["now"] = not skipped["now"]
            if skipped["now"]:
                found = [c for c in found if c.peer != clients.peer(authed)]
        return found + found

    reserve = ConnectionReserve(8, 2, lister=unsteady, period=0.05)
    assert reserve.watch(clients.port)
    try:
        reserve.admit(clients.peer(authed))
        silent = [clients.connect() for _ in range(8)]
        await asyncio.to_thread(
            wait_until, lambda: sum(map(closed_by_server, silent)) >= 2, "the excess was not shut down"
        )
        for _ in range(4):  # listings with and without the authenticated one
            assert reserve.sweep() == []
        assert sum(map(closed_by_server, silent)) == 2 == reserve.closed
        assert not closed_by_server(authed)
    finally:
        reserve.close()


def test_an_authenticated_address_that_comes_back_on_another_connection_is_not_authenticated() -> None:
    reserve = ConnectionReserve(3, 1)  # 2 without authentication
    first, *others = [conn(1, 11, 100), conn(2, 12), conn(3, 13)]
    reserve.admit(first.peer)
    assert reserve._settle({c.peer: c.inode for c in [first, *others]}) == {first.peer}
    again = conn(1, 21)  # the same address, another socket
    assert reserve._settle({c.peer: c.inode for c in [again, *others]}) == set()


async def test_no_connection_listed_while_the_host_accepted_none_since_a_sweep_that_left_nothing_to_look_at(
    clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted = {"count": 100, "read": 0}

    def passive_opens() -> int:
        accepted["read"] += 1  # once a tick
        return accepted["count"]

    monkeypatch.setattr("jobsvc.server.reserve.passive_opens", passive_opens)
    listings: list[int] = []

    def counted(port: int, state: int, families: Sequence[int]) -> list[Connection]:
        listings.append(state)
        return listed(port, state, families)

    reserve = ConnectionReserve(8, 2, lister=counted, period=0.01)
    assert reserve.watch(clients.port)
    try:
        await asyncio.to_thread(wait_until, lambda: listings.count(TCP_ESTABLISHED) >= 1, "no first sweep")
        silent = [clients.connect() for _ in range(8)]  # 2 over, not looked for while the count stays
        before, ticks = listings.count(TCP_ESTABLISHED), accepted["read"]
        await asyncio.to_thread(wait_until, lambda: accepted["read"] >= ticks + 10, "no ticks")
        assert listings.count(TCP_ESTABLISHED) == before and not any(map(closed_by_server, silent))
        # counted once the host has accepted connections, even those a sweep finds still in the accept queue
        accepted["count"] += 8
        await asyncio.to_thread(
            wait_until, lambda: sum(map(closed_by_server, silent)) == 2, "the excess was not shut down"
        )
    finally:
        reserve.close()


@pytest.mark.parametrize("lister", [listed, listed_in_proc], ids=["sock_diag", "proc"])
async def test_a_dual_stack_listener_is_swept_from_its_ipv6_table_alone_v4_clients_included(lister: Lister) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 here")
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        reserve = ConnectionReserve(8, 2, lister=lister, period=60)
        assert reserve.watch(port)
        reserve.close()
        assert reserve._families == (socket.AF_INET6,)
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                found = lister(port, TCP_ESTABLISHED, reserve._families)
                assert [c.peer for c in found] == [f"ipv4:127.0.0.1:{client.getsockname()[1]}"]


def test_peer_name_undoes_grpcs_percent_encoding_of_ipv6_peers() -> None:
    assert peer_name("ipv4:127.0.0.1:5678") == "ipv4:127.0.0.1:5678"
    assert peer_name("ipv6:%5B::1%5D:5678") == "ipv6:[::1]:5678"
    assert peer_name("ipv6:%5Bfe80::1%25eth0%5D:5678") == "ipv6:[fe80::1]:5678"  # the kernel's listing has no zone


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_the_peer_grpc_names_is_the_one_the_listings_name(host: str) -> None:
    # An authenticated IPv6 client was never matched: grpc wrote ipv6:%5B::1%5D:port, the listings ipv6:[::1]:port.
    import grpc
    from grpc import aio

    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    seen: list[str] = []
    listings: list[list[Connection]] = []

    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.append(context.peer())
        listings.append(listed(port) + listed_in_proc(port))  # while the call's connection is open
        return b""

    handler = grpc.method_handlers_generic_handler("t.T", {"M": grpc.unary_unary_rpc_method_handler(call)})
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"[{host}]:0" if ":" in host else f"{host}:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") as channel:
            await channel.unary_unary("/t.T/M", None, None)(b"")
    finally:
        await server.stop(None)
    (peer,), (connections,) = seen, listings
    assert {c.peer for c in connections if c.inode} == {peer_name(peer)}  # both listings, one name
