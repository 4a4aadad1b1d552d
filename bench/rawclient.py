"""The least a Python client can do to stream a job: the generated sync stub, each message's bytes to stdout, and
os._exit at the end as jobctl does.

`python -m bench.rawclient TARGET PKI_DIR JOB_ID`. The fan-out benchmark runs it like `jobctl stream`, to separate
what jobctl adds from what any Python gRPC client process costs on the same cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(target: str, pki: Path, job_id: str) -> None:
    import grpc

    from jobsvc._pb import jobs_pb2, jobs_pb2_grpc

    creds = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / "alice-key.pem").read_bytes(), (pki / "alice.pem").read_bytes()
    )
    out = sys.stdout.buffer
    with grpc.secure_channel(target, creds) as channel:
        for msg in jobs_pb2_grpc.JobServiceStub(channel).Stream(jobs_pb2.StreamRequest(id=job_id)):
            out.write(msg.data)
    out.flush()
    os._exit(0)  # as jobctl leaves: without the interpreter's teardown


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
