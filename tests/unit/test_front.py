"""jobctl's front end (cli/front.py): its request encoding, what it trusts, when it stays in-process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from jobctl import front


def test_a_request_carries_any_bytes_but_nul() -> None:
    argv = [b"jobctl", b"start", b"--", b"printf", b"\xff\xfe=\n"]
    env = [b"A=1", b"EMPTY=", b"ODD=x=y", b"BIN=\xc3("]
    decoded_argv, decoded_env, umask = front.decode_request(front.encode_request(argv, env, 0o027))
    assert decoded_argv == argv and umask == 0o027
    assert decoded_env == {b"A": b"1", b"EMPTY": b"", b"ODD": b"x=y", b"BIN": b"\xc3("}


def test_anything_else_is_not_a_request() -> None:
    with pytest.raises(ValueError):
        front.decode_request(b"GET / HTTP/1.1")
    with pytest.raises(ValueError):
        front.decode_request(front.PROTOCOL + b"\x0018\x005\x00jobctl")


def test_frames_carry_their_descriptors(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        r, w = os.pipe()
        front.send_frame(ours, b"x" * 100_000, [w])
        os.close(w)
        got = front.recv_frame(theirs)
        assert got is not None
        data, fds = got
        assert data == b"x" * 100_000 and len(fds) == 1
        os.write(fds[0], b"through")
        os.close(fds[0])
        assert os.read(r, 10) == b"through"
        os.close(r)
        ours.shutdown(socket.SHUT_WR)
        assert front.recv_frame(theirs) is None


def test_only_a_private_directory_of_this_uid_is_trusted(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert front.private_dir(str(private))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    assert not front.private_dir(str(shared))
    link = tmp_path / "link"
    link.symlink_to(private)
    assert not front.private_dir(str(link))
    assert not front.private_dir(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("env", "argv", "enabled"),
    [
        ({}, ["list"], True),
        ({"JOBCTL_NO_AGENT": "1"}, ["list"], False),
        ({"JOBCTL_NO_AGENT": "0"}, ["list"], True),
        ({}, ["--no-agent", "list"], False),
        ({}, ["start", "--", "echo", "--no-agent"], True),  # the job's argument, not jobctl's flag
    ],
)
def test_the_agent_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], enabled: bool
) -> None:
    monkeypatch.delenv("JOBCTL_NO_AGENT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert front._agent_enabled(argv) is enabled


def test_the_socket_lives_in_the_runtime_dir_or_a_per_uid_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert front.socket_dir() == "/run/user/1000/jobctl"
    sock, pid, log = front.paths()
    assert sock.startswith("/run/user/1000/jobctl/agent-") and sock.endswith(".sock")
    assert pid == sock.removesuffix(".sock") + ".pid" and log == sock.removesuffix(".sock") + ".log"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert front.socket_dir() == f"/tmp/jobctl-{os.getuid()}"
