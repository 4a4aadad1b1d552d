"""ServerConfig, build_server() and serve(): the jobsvc process."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import resource
import signal
import sys
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobsvc._pb import jobs_pb2 as pb
from jobsvc.manager import EngineConfig, JobManager
from jobsvc.quota import Quota
from jobsvc.server.audit import AuditLog
from jobsvc.server.interceptors import ErrorInterceptor, IdentityInterceptor
from jobsvc.server.reserve import ConnectionReserve, reserve_default
from jobsvc.server.servicer import JobServicer, add_to_server
from jobsvc.server.tls import CredentialsError, TrustFiles, TrustPolicy

log = logging.getLogger("jobsvc.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Everything `jobsvc serve` takes; building one does no I/O."""

    engine: EngineConfig
    trust: TrustFiles
    listen: str = "127.0.0.1:50051"
    # A connection silent for keepalive_time gets a ping; unanswered after keepalive_timeout, it is closed and its
    # calls end, so a vanished client's streams (and its stream quota) are let go of within the sum of the two.
    keepalive_time: float = 40.0
    keepalive_timeout: float = 20.0
    # A connection that has not finished its TLS handshake by then is closed: silent or slow connections (no TLS,
    # no certificate) were each held for grpc's default of 120 s, and enough of them took every descriptor.
    handshake_timeout: float = 5.0
    # Connections the server holds at once, authenticated or not; past it new ones are closed at accept. None:
    # half the open-file limit, so the other half stays for jobs' pipes and output and for the state dir.
    max_connections: int | None = None
    # Of max_connections, how many connections without an authenticated call may not take (ConnectionReserve):
    # kept for clients with a certificate while silent connections fill the rest. None: an eighth; 0: no reserve.
    reserved_connections: int | None = None
    # Calls in flight on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, as grpc-go's
    # MaxConcurrentStreams): a client's further calls wait in the client until one ends.
    max_calls_per_connection: int = 100
    # Waits and streaming calls one user holds open at once over all their connections.
    max_held_calls_per_user: int = 1024


# Clients may ping too (to keep a NAT mapping open), but not more often than this while no data flows; a client
# that does so MAX_PING_STRIKES times is sent GOAWAY, so pings cannot be used to keep the server busy.
MIN_CLIENT_PING_INTERVAL = 10.0
MAX_PING_STRIKES = 2
# Seconds a call may wait for the server to pick it up (grpc core's default is 30) before grpc cancels it.
UNREQUESTED_CALL_TIMEOUT = 600


def keepalive_options(config: ServerConfig) -> list[tuple[str, int]]:
    """grpc core's channel arguments for the server's keepalive policy."""
    return [
        ("grpc.keepalive_time_ms", round(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout * 1000)),
        # grpc core (1.85) times its pings out after ping_timeout (default 60 s) and does not apply
        # keepalive_timeout to them on its own: without this a dead client was held for a minute past the timeout.
        ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout * 1000)),
        # Idle connections are pinged too: a dead one holds a descriptor even when it holds no call.
        ("grpc.keepalive_permit_without_calls", 1),
        # Without this grpc stops pinging after 2 pings with no data sent, and a stream of a job that prints
        # nothing would never find out that its client is gone.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", round(MIN_CLIENT_PING_INTERVAL * 1000)),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


def connection_limit(config: ServerConfig, fd_limit: int) -> int:
    """The connections the server holds at once: --max-connections, by default half the open-file limit."""
    return config.max_connections if config.max_connections is not None else max(1, fd_limit // 2)


def connection_reserve(config: ServerConfig, fd_limit: int) -> ConnectionReserve | None:
    """The reserve for authenticated connections, or None when there is none (--reserved-connections 0)."""
    limit = connection_limit(config, fd_limit)
    reserved = config.reserved_connections
    reserved = reserve_default(limit) if reserved is None else reserved
    if reserved and reserved >= limit:
        raise ListenError(f"--reserved-connections ({reserved}) must be less than the connections allowed ({limit})")
    return ConnectionReserve(limit, reserved) if reserved else None


def connection_options(config: ServerConfig, fd_limit: int) -> list[tuple[str, int]]:
    """grpc core's channel arguments bounding connections and the calls on each (pre-authentication load)."""
    limit = connection_limit(config, fd_limit)
    log.info(
        "at most %d connections, %d calls on each, %d held calls per user; TLS handshakes time out after %g s",
        limit,
        config.max_calls_per_connection,
        config.max_held_calls_per_user,
        config.handshake_timeout,
    )
    return [
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", limit),
        ("grpc.max_concurrent_streams", config.max_calls_per_connection),
        # grpc core cancels a call the server has not picked up within 30 s, with a bare CANCELLED that the server
        # never logs: 8 of 20 concurrent Streams ended so in an emulated VM guest whose event loop was saturated by
        # the other 12. The client's own deadline bounds the wait; grpc's pending-call limit bounds the queue.
        ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_CALL_TIMEOUT),
    ]


class ListenError(RuntimeError):
    pass


async def build_server(
    config: ServerConfig,
    manager: JobManager,
    audit: AuditLog | None = None,
    trust: TrustPolicy | None = None,
    reserve: ConnectionReserve | None = None,
) -> tuple[aio.Server, int]:
    """A started-able grpc.aio server bound to config.listen (port 0 picks one); returns (server, port).

    With a reserve, its watch(port) is the caller's to start once the server has started."""
    # The request cap sits above the argv cap, so an oversized argv reaches the engine and gets INVALID_ARGUMENT.
    max_request = max(4 << 20, 2 * config.engine.max_argv_bytes + (64 << 10))
    held = Quota("concurrent Wait and streaming calls", config.max_held_calls_per_user)
    server = aio.server(
        interceptors=[ErrorInterceptor(audit), IdentityInterceptor(trust, held, reserve)],
        options=[
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ("grpc.max_receive_message_length", max_request),
            ("grpc.max_send_message_length", 4 << 20),
            *keepalive_options(config),
            *connection_options(config, resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        ],
    )
    add_to_server(JobServicer(manager), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    creds = (trust or TrustPolicy(config.trust)).credentials()
    try:
        port = server.add_secure_port(config.listen, creds)
    except RuntimeError as e:
        raise ListenError(f"cannot listen on {config.listen}: {e}") from None
    if not port:
        raise ListenError(f"cannot listen on {config.listen}")
    return server, port


def raise_fd_limit() -> int:
    """Streams and jobs each hold descriptors: raise the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT: then refuse new work, stop every job, end streams, exit 0."""
    fd_limit = raise_fd_limit()
    reserve = connection_reserve(config, fd_limit)
    trust = TrustPolicy(config.trust)  # unreadable certificates fail here, before anything starts
    manager = JobManager.open(config.engine)  # takes the state dir's lock, or refuses at once
    audit = AuditLog(config.engine.state_dir / "audit.log")
    # Bind before taking over the state dir: a server that cannot listen must leave the jobs of a crashed
    # predecessor, and their groups, exactly as they are for the next server that can.
    try:
        server, port = await build_server(config, manager, audit, trust, reserve)
    except BaseException:
        manager.close()
        audit.close()
        raise
    await manager.reconcile()
    await server.start()
    if reserve is not None:
        reserve.watch(port)
    host = config.listen.rsplit(":", 1)[0]
    log.info("listening on %s:%d (state in %s)", host, port, config.engine.state_dir)
    print(f"jobsvc listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, trust, audit)
    await stop.wait()
    log.info("shutting down: stopping running jobs (grace %.1f s)", config.engine.default_grace)
    # Stopping the jobs first lets open streams reach their natural end; then stop taking calls.
    unsaved = await manager.shutdown()
    await server.stop(grace=1.0)
    if reserve is not None:
        reserve.close()
    audit.close()
    if unsaved:
        # Exiting 0 would tell a supervisor all was well while those jobs' outcomes are lost.
        log.error("stopped, but %d job records could not be written (see above)", len(unsaved))
        return 1
    log.info("stopped")
    return 0


def _reload(trust: TrustPolicy, audit: AuditLog) -> None:
    """SIGHUP: reopen the audit log (logrotate's convention); read the certificates, CA, CRL and deny list again.

    Established connections and streams go on. The server log is stderr, which is not ours to reopen.
    """
    try:
        audit.reopen()
    except OSError as e:
        log.error("cannot reopen the audit log %s (%s); still writing to the old file", audit.path, e.strerror)
    else:
        log.info("reopened the audit log %s", audit.path)
    try:
        trust.reload()
    except CredentialsError as e:
        log.error("reload failed, keeping the previous certificates and lists: %s", e)
        return
    log.info("reloaded the server certificate, CA, CRL and deny list")


def run(config: ServerConfig) -> int:
    faulthandler.enable()  # a crash in native code (grpc) leaves every thread's Python stack in the log
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(config))
    return 130


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # grpc's own cancellation noise is not ours to log at INFO
    logging.getLogger("grpc").setLevel(logging.WARNING)
