"""A peer for the fan-out benchmark: a bare grpc.aio server, same mTLS credentials and TLS policy as jobsvc, that
streams N bytes of zeros in messages of the size jobsvc would send (jobsvc.output.chunk_size_for: 1 MiB for a few
streams, smaller as they multiply), as raw bytes: no protobuf, no files, none of jobsvc's serving code.

It is what any Python gRPC service pays to move the same bytes to the same clients on this machine: jobsvc's
fan-out divided by the peer's says how much of the cost is jobsvc's own. Run as `python -m bench.peer PKI_DIR`;
it prints `peer listening on 127.0.0.1:PORT` and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

METHOD = "/bench.Peer/Stream"


async def serve(pki: Path) -> None:
    import jobsvc.server  # noqa: F401 - the same TLS cipher policy as jobsvc (set before grpc starts)
    from jobsvc.server.app import raise_fd_limit

    raise_fd_limit()
    import grpc
    from grpc import aio

    from jobsvc.output import chunk_size_for

    zeros: dict[int, bytes] = {}  # one buffer per message size
    open_streams = 0

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        nonlocal open_streams
        open_streams += 1
        try:
            left = int(request)
            while left > 0:
                size = chunk_size_for(open_streams)
                n = min(size, left)
                block = zeros.get(size) or zeros.setdefault(size, bytes(size))
                yield block if n == size else block[:n]
                left -= n
        finally:
            open_streams -= 1

    handler = grpc.method_handlers_generic_handler(
        "bench.Peer", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [((pki / "server-key.pem").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    print(f"peer listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def open_stream(channel: Any, size: int) -> Any:
    """The peer's stream of size bytes on channel (yields raw bytes messages)."""
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
    return call(str(size).encode())


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
