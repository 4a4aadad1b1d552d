"""JobClient: one mTLS channel to jobsvc; returns model objects and turns gRPC failures into one-line errors.

grpc and the generated stubs are imported when a client is made, not when jobctl starts, so `jobctl --help` and
usage errors stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobsvc.model import JobRecord, Limits

if TYPE_CHECKING:
    import grpc


class ClientError(Exception):
    """A failed operation, with a message fit for one line on stderr."""


class UnavailableError(ClientError):
    """The server could not be reached or closed the connection (it may be restarting)."""


class ConnectionLostError(UnavailableError):
    """The connection dropped in the middle of a stream (worth resuming)."""


class WaitTimeoutError(ClientError):
    """Wait's own deadline passed while the job was still running."""


# Set only in a child of jobctl's command server (cli/agent.py): given the target, the files and their bytes, a channel
# it connected ahead for exactly those, or None for a new one.
CHANNEL_HOOK: Callable[[str, tuple[Path, Path, Path], tuple[bytes, bytes, bytes]], grpc.Channel | None] | None = None


@dataclass(frozen=True)
class Output:
    stream: int  # 1 stdout, 2 stderr
    offset: int
    data: bytes
    read_at_ms: int = 0  # when the server read data[0] (Unix ms, to 0.1 s); 0: not known


def _read(path: Path, what: str, hint: str, marker: bytes) -> bytes:
    """The file's bytes, which must hold a PEM block with marker (checked without importing cryptography)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ClientError(f"{what} {path}: {e.strerror} (set {hint})") from None
    if marker not in data:
        kind = "private key" if b"KEY" in marker else "certificate"
        raise ClientError(f"{what} {path} holds no PEM {kind} (set {hint})")
    return data


def check_target(target: str) -> str | None:
    """Why target is not HOST:PORT (None when it is)."""
    host, sep, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:50051
    if not sep or not host or not port:
        return f"want HOST:PORT (e.g. 127.0.0.1:50051), got {target!r}"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"port must be a number from 1 to 65535, got {port!r} in {target!r}"
    if any(c.isspace() or c in "/?#@" for c in host) or not host.isprintable():
        return f"{host!r} is not a host name or address (in {target!r})"
    return None


class JobClient:
    def __init__(
        self, target: str, ca_cert: Path, client_cert: Path, client_key: Path, timeout: float | None = 10.0
    ) -> None:
        problem = check_target(target)
        if problem:
            raise ClientError(f"target: {problem}")
        begin_cert = b"-----BEGIN CERTIFICATE-----"
        ca = _read(ca_cert, "CA certificate", "--ca-cert or JOBCTL_CA_CERT", begin_cert)
        cert = _read(client_cert, "client certificate", "--client-cert or JOBCTL_CLIENT_CERT", begin_cert)
        key = _read(client_key, "client key", "--client-key or JOBCTL_CLIENT_KEY", b"PRIVATE KEY-----")
        self._files = (ca_cert, client_cert, client_key)
        # grpc's C core logs its own view of every failure on stderr; jobctl says it in one line instead
        # (GRPC_VERBOSITY=debug still shows everything)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        import grpc

        from jobsvc._pb import jobs_pb2, jobs_pb2_grpc

        self._grpc = grpc
        self._pb = jobs_pb2
        self.target = target
        self.timeout = timeout
        warm = CHANNEL_HOOK(target, self._files, (ca, cert, key)) if CHANNEL_HOOK is not None else None
        if warm is not None:
            self._channel = warm
        else:
            self._channel = open_channel(target, ca, cert, key)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None = -1.0) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout if timeout == -1.0 else timeout)
        except self._grpc.RpcError as e:
            raise self._error(e, getattr(request, "id", None)) from None

    def _error(self, e: grpc.RpcError, job_id: str | None = None) -> ClientError:
        code = e.code()
        details = e.details() or code.name
        sc = self._grpc.StatusCode
        if code == sc.UNAVAILABLE:
            lowered = details.lower()
            if "security handshaker" in lowered:  # grpc could not use the local files: say which one is wrong
                from .tlscheck import diagnose

                ca, cert, key = self._files
                return ClientError(diagnose(ca, cert, key) or f"cannot use {cert} and {key} for TLS")
            if "wrong_version_number" in lowered or "http_request" in lowered:
                return ClientError(f"{self.target} does not speak TLS: is it jobsvc's port? (set --target)")
            if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
                return ClientError(
                    f"the certificate of the server at {self.target} is not signed by the CA in {self._files[0]}"
                    " (set --ca-cert or JOBCTL_CA_CERT)"
                )
            if "handshake" in lowered or "ssl" in lowered or "tls" in lowered:
                return UnavailableError(f"TLS handshake with {self.target} failed ({_short(details)})")
            if "socket closed" in lowered or "connection reset" in lowered:
                return UnavailableError(
                    f"jobsvc at {self.target} closed the connection ({_short(details)}): it may be restarting, or "
                    "refuse your client certificate (not signed by its CA, expired or revoked)"
                )
            return UnavailableError(f"cannot reach jobsvc at {self.target} ({_short(details)})")
        if code == sc.NOT_FOUND and job_id:
            return ClientError(f"{details}: {job_id}")
        if code == sc.DEADLINE_EXCEEDED:
            return ClientError(f"jobsvc at {self.target} did not answer within {self.timeout:g} s")
        if code == sc.UNAUTHENTICATED:
            return ClientError(f"not authenticated: {details}")
        return ClientError(details)

    def start(
        self,
        argv: list[bytes],
        limits: Limits,
        env: dict[str, bytes] | None = None,
        workdir: str | None = None,
        timeout: float | None = None,
    ) -> JobRecord:
        from jobsvc.wire import job_from_pb, limits_to_pb

        req = self._pb.StartRequest(argv=argv, limits=limits_to_pb(limits), env=env or {})
        if workdir is not None:
            req.workdir = workdir
        if timeout is not None:
            req.timeout_seconds = timeout
        return job_from_pb(self._call("Start", req))

    def get(self, job_id: str) -> JobRecord:
        from jobsvc.wire import job_from_pb

        return job_from_pb(self._call("Get", self._pb.GetRequest(id=job_id)))

    def stop(self, job_id: str, grace: float | None = None, sig: int | None = None) -> JobRecord:
        from jobsvc.wire import job_from_pb

        req = self._pb.StopRequest(id=job_id)
        if grace is not None:
            req.grace_seconds = grace
        if sig is not None:
            req.signal = sig
        wait = None if self.timeout is None else self.timeout + (grace if grace is not None else 3600)
        return job_from_pb(self._call("Stop", req, timeout=wait))

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """The job's final record; WaitTimeoutError when timeout (seconds) passes first."""
        from jobsvc.wire import job_from_pb

        try:
            return job_from_pb(self._stub.Wait(self._pb.GetRequest(id=job_id), timeout=timeout))
        except self._grpc.RpcError as e:
            if e.code() == self._grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                raise WaitTimeoutError(f"job {job_id} is still running after {timeout:g}s") from None
            raise self._error(e, job_id) from None

    def list(
        self, status: str | tuple[str, ...] | None = None, since: float | None = None, limit: int | None = None
    ) -> list[JobRecord]:
        """Jobs with any of the given statuses (all when none), oldest first; with limit, only the newest limit.

        The server answers in pages (of about 1 MiB at most): this asks for every page it needs.
        """
        from jobsvc.states import JobStatus
        from jobsvc.wire import job_from_pb, status_to_pb

        wanted = (status,) if isinstance(status, str) else tuple(status or ())
        req = self._pb.ListRequest(newest_first=limit is not None)
        one = len(set(wanted)) == 1
        if one:  # the server filters one status; a union is filtered here
            req.status = status_to_pb(JobStatus(wanted[0]))  # type: ignore[assignment]
        if since is not None:
            req.since_seconds = since
        if limit is not None and (one or not wanted):
            req.page_size = min(limit, 1000)
        records: list[JobRecord] = []
        while True:
            reply = self._call("List", req)
            records += [r for r in map(job_from_pb, reply.jobs) if not wanted or r.status.value in wanted]
            if not reply.next_page_token or (limit is not None and len(records) >= limit):
                break
            req.page_token = reply.next_page_token
        if limit is not None:
            return records[:limit][::-1]  # the newest limit, shown oldest first like the rest
        return records

    def stream(
        self,
        job_id: str,
        from_offset: int = 0,
        follow: bool = True,
        only: int | None = None,
        tail: int | None = None,
        since_ms: int | None = None,
    ) -> Iterator[Output]:
        """The job's output from from_offset until it has ended; close the iterator to stop watching."""
        req = self._pb.StreamRequest(
            id=job_id,
            from_offset=from_offset,
            no_follow=not follow,
            only=only or 0,  # type: ignore[arg-type]
        )
        if tail is not None:
            req.tail_lines = tail
        if since_ms is not None:
            req.since.FromMilliseconds(since_ms)
        call = self._stub.Stream(req)
        received = False
        try:
            for msg in call:
                received = True
                yield Output(stream=msg.stream, offset=msg.offset, data=msg.data, read_at_ms=msg.read_at_ms)
        except self._grpc.RpcError as e:
            if e.code() == self._grpc.StatusCode.CANCELLED:
                return
            err = self._error(e, job_id)
            dropped = received or "failed to connect" not in (e.details() or "")
            if isinstance(err, UnavailableError) and dropped:
                raise ConnectionLostError(
                    f"the connection to jobsvc at {self.target} was lost ({_short(e.details() or '')})"
                ) from None
            raise err from None
        finally:
            call.cancel()


def _short(details: str) -> str:
    # grpc's connection errors are long ("...: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection
    # refused"); the last clause says what happened
    return details.rsplit(": ", 1)[-1].strip().rstrip(".")


# A call whose connection went silent (a NAT, proxy or firewall lost it: no RST, no FIN, nothing comes any more)
# would wait for ever, a stream or a wait having no deadline: while a call is open and nothing came for
# KEEPALIVE_TIME, ping; unanswered after KEEPALIVE_TIMEOUT, the connection is dropped and the call fails (a stream
# then resumes). jobsvc takes a client's pings at 10 s intervals or more (server/app.py MIN_CLIENT_PING_INTERVAL).
KEEPALIVE_TIME = 20.0
KEEPALIVE_TIMEOUT = 10.0
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", round(KEEPALIVE_TIME * 1000)),
    ("grpc.keepalive_timeout_ms", round(KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.http2.ping_timeout_ms", round(KEEPALIVE_TIMEOUT * 1000)),  # (grpc core 1.85 times pings out by this)
    ("grpc.http2.max_pings_without_data", 0),  # else it stops after 2 on a stream of a job that prints nothing
)


def open_channel(target: str, ca: bytes, cert: bytes, key: bytes) -> grpc.Channel:
    """A mutual-TLS channel to target (JobClient's, and the agent's warm one: built in one place)."""
    import grpc

    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    except Exception as e:
        raise ClientError(f"bad certificate or key: {e}") from None
    return grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)


def connect_ahead(channel: grpc.Channel) -> None:
    """Start connecting channel now, without waiting and without a thread.

    Not grpc.channel_ready_future (or subscribe()): their poller thread watches the state in 0.2 s windows and
    outlives its cancel() until its window ends, and the channel's close() waits for it; a command that used a
    channel connected less than 0.2 s before paid up to 0.2 s when it closed it.
    """
    import contextlib

    with contextlib.suppress(Exception):  # not grpc's own channel class: its first call connects it
        channel._channel.check_connectivity_state(True)  # type: ignore[attr-defined]


def usable(channel: grpc.Channel) -> bool:
    """False for a channel in backoff after failed attempts or shut down: its first call would fail at once."""
    import grpc
    from grpc import _common

    try:
        cygrpc_state = channel._channel.check_connectivity_state(False)  # type: ignore[attr-defined]
        state = _common.CYGRPC_CONNECTIVITY_STATE_TO_CHANNEL_CONNECTIVITY[cygrpc_state]
    except Exception:
        return False
    return state not in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
