"""jobctl's command server (cli/agent.py) and its warm channel, in process: no server, no root."""

from __future__ import annotations

import socket
import threading

import grpc
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
