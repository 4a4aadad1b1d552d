"""jobctl's command server (cli/agent.py) and its warm channel, in process: no server, no root."""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator

import grpc
import pytest
from jobctl import front
from jobctl.agent import Agent, Child, Request
from jobctl.client import connect_ahead


def test_connecting_ahead_needs_no_thread() -> None:
    # grpc's connectivity poller thread outlives a cancel() by up to 0.2 s, and the channel's close() waits for it
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        channel = grpc.insecure_channel(f"127.0.0.1:{listener.getsockname()[1]}")
        threads = set(threading.enumerate())
        connect_ahead(channel)
        conn, _ = listener.accept()  # it does connect
        try:
            assert set(threading.enumerate()) == threads
        finally:
            conn.close()
            channel.close()


# -- the agent's loop, driven in this process (its children here are plain forks that leave at once) ----------------


@pytest.fixture
def agent() -> Iterator[Agent]:
    directory = tempfile.mkdtemp(prefix="jobctl-agent-")  # short: a Unix socket's path has room for 107 bytes
    made = Agent(directory, idle=300)
    yield made
    made.sel.close()
    if made.listener is not None:
        made.listener.close()
    shutil.rmtree(directory)


def _exited_child(code: int) -> tuple[int, int]:
    """(pid, pidfd) of a child of this process that has exited with code (not yet reaped)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves at once
        os._exit(code)
    pidfd = os.pidfd_open(pid)
    select.select([pidfd], [], [])
    return pid, pidfd


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (more := sock.recv(n - len(data))):
        data += more
    return data


REPORT = b"127.0.0.1:1\0/pki/ca.pem\0/pki/alice.pem\0/pki/alice-key.pem"


@pytest.mark.parametrize("exit_first", [True, False])
def test_a_childs_last_report_and_its_exit_count_in_either_order(agent: Agent, exit_first: bool) -> None:
    ours, theirs = socket.socketpair()
    front_end, conn = socket.socketpair()
    with theirs, front_end:
        pid, pidfd = _exited_child(3)
        child = Child(pid, pidfd, ours, {}, conn=conn, ready=True, accepted=True)
        agent.watch(child)
        front.send_frame(theirs, REPORT)  # what its JobClient used, sent just before it ended
        theirs.close()
        if exit_first:
            agent.on_exit(child)
            agent.on_report(child)  # as epoll may list it after the exit, in the same round
        else:
            agent.on_report(child)
            agent.on_exit(child)
        assert _recv_exactly(front_end, 2) == front.EXITED + bytes([3])
        assert agent.last_key == ("127.0.0.1:1", ("/pki/ca.pem", "/pki/alice.pem", "/pki/alice-key.pem"))
        assert not agent.children and not agent.busy()


def test_a_round_that_lists_a_childs_exit_and_its_front_ends_end_runs_both(agent: Agent) -> None:
    ours, theirs = socket.socketpair()
    front_end, conn = socket.socketpair()
    with theirs:
        pid, pidfd = _exited_child(0)
        child = Child(pid, pidfd, ours, {}, conn=conn, ready=True, accepted=True)
        agent.watch(child)
        agent.sel.register(conn, selectors.EVENT_READ, lambda _c: agent.on_front(child))
        front_end.close()  # after the exit: epoll lists the exit first, whose forget() closes the connection
        while agent.step():
            pass
        assert not agent.children and not agent.busy()


def _request(env: list[bytes]) -> bytes:
    data = front.encode_request([b"jobctl", b"--version"], env, 0o022)
    return struct.pack("!I", len(data)) + data


def test_a_slow_front_end_holds_up_no_other(agent: Agent) -> None:
    agent.listen()
    assert agent.listener is not None
    path = agent.sock_path
    # a different interpreter set-up: the agent answers at once (REFUSED), with no child to fork
    frame = _request([b"PYTHONJOBCTLTEST=1"])
    null = os.open(os.devnull, os.O_RDWR)
    fds = [null] * 4
    slow, quick = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        slow.connect(path)
        slow.sendmsg([frame[:3]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", *fds))])
        quick.connect(path)
        quick.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", *fds))])
        assert _answers(agent, quick) == front.HELLO + b"\0" + front.REFUSED + bytes([front.REFUSED_ENV])
        slow.sendall(frame[3:])  # the rest comes only now
        assert _answers(agent, slow) == front.HELLO + b"\0" + front.REFUSED + bytes([front.REFUSED_ENV])
    finally:
        os.close(null)
        slow.close()
        quick.close()
        agent.retire()


def _answers(agent: Agent, sock: socket.socket) -> bytes:
    """The agent's hello and answer to sock, running the agent's loop until they have come."""
    sock.setblocking(False)
    got = b""
    while len(got) < 4:
        agent.step()
        try:
            more = sock.recv(4 - len(got))
        except BlockingIOError:
            continue
        if not more:
            break
        got += more
    return got


def test_a_forked_child_closes_the_descriptors_of_other_requests(agent: Agent) -> None:
    r, w = os.pipe()
    conn, peer = socket.socketpair()
    agent.requests.append(Request(conn, deadline=float("inf"), fds=[w]))
    report_r, report_w = os.pipe()
    conn_fd = conn.fileno()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports and leaves
        try:
            agent._forget_in_child()
            still = [fd for fd in (w, conn_fd) if _open(fd)]
            os.write(report_w, repr(still).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    assert os.waitpid(pid, 0)[1] == 0
    with os.fdopen(report_r, "rb") as f:
        assert f.read() == b"[]"
    os.close(w)
    agent.requests.clear()
    conn.close()
    peer.close()
    os.close(r)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_front_end_that_sends_descriptors_without_end_is_dropped(agent: Agent) -> None:
    # each piece of a request may carry descriptors: without a cap one client of this user could fill the agent's
    # descriptor table within the request's deadline
    agent.listen()
    frame = _request([b"PYTHONJOBCTLTEST=1"])
    null = os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(agent.sock_path)
        before = len(os.listdir("/proc/self/fd"))
        sent = 0
        with contextlib.suppress(BrokenPipeError):  # the agent has hung up on it
            for byte in frame[: front.MAX_FDS]:  # a byte at a time, each with MAX_FDS descriptors
                sock.sendmsg([bytes([byte])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("8i", *[null] * 8))])
                sent += 1
                agent.step()
        assert sent < front.MAX_FDS and not agent.requests  # dropped once it held more than MAX_FDS
        assert len(os.listdir("/proc/self/fd")) <= before  # and what it sent closed
    finally:
        os.close(null)
        sock.close()
        agent.retire()
