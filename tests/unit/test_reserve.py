"""The connection reserve's choice of connections to close, and its view of the kernel's connections."""

from __future__ import annotations

import os
import socket

import pytest

from jobsvc.server.reserve import Connection, ConnectionReserve, excess, listed, reserve_default, shut_down, socket_fds


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


def test_the_kernel_lists_this_ports_connections_with_their_peer_and_bytes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        quiet = socket.create_connection(("127.0.0.1", port))
        talker = socket.create_connection(("127.0.0.1", port))
        a, _ = server.accept()
        b, _ = server.accept()
        talker.sendall(b"hello")
        assert b.recv(5) == b"hello"
        try:
            found = {c.peer: c for c in listed(port)}
            q, t = (f"ipv4:127.0.0.1:{s.getsockname()[1]}" for s in (quiet, talker))
            assert set(found) == {q, t}  # the server's sockets only, not the clients' ends
            assert (found[q].received, found[t].received) == (0, 5)
            assert {found[q].inode, found[t].inode} == {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
            fds = socket_fds([found[q].inode])
            assert fds == {found[q].inode: a.fileno()}
            # shutting one down is seen by its client; a descriptor that is no longer that socket is left alone
            assert not shut_down(b.fileno(), found[q].inode)
            assert shut_down(a.fileno(), found[q].inode)
            assert quiet.recv(1) == b""
            talker.sendall(b"!")
            assert b.recv(1) == b"!"
        finally:
            for s in (quiet, talker, a, b):
                s.close()
