"""The `jobsvc` console script: `jobsvc serve` and `jobsvc pki init|add-user|revoke`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from jobsvc import params
from jobsvc.errors import InvalidArgumentError
from jobsvc.limits import LimitPolicy
from jobsvc.model import Limits

# jobsvc.params: the one vocabulary for limits, shared with jobctl; a bad value names the option
SIZE, CPUS, DURATION = params.Size(), params.Cpu(positive=True), params.Duration()
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _uid_range(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    first, sep, last = value.partition("-")
    try:
        lo, hi = int(first), int(last)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not FIRST-LAST, e.g. 61184-65519") from None
    if not sep or not 0 < lo <= hi < 2**31:
        raise click.BadParameter(f"{value!r} is not a range of uids FIRST-LAST with 0 < FIRST <= LAST")
    return lo, hi


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jobsvc")
def main() -> None:
    """jobsvc: run commands on this host inside cgroup limits, over a mutual-TLS gRPC API."""


@main.command()
@click.option(
    "--listen",
    envvar="JOBSVC_LISTEN",
    default="127.0.0.1:50051",
    show_default=True,
    help="HOST:PORT to serve on (port 0 picks a free one).",
)
@click.option(
    "--state-dir",
    envvar="JOBSVC_STATE_DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Job records and output live here.",
)
@click.option("--ca-cert", envvar="JOBSVC_CA_CERT", required=True, type=FILE, help="CA that signs client certs.")
@click.option("--server-cert", envvar="JOBSVC_SERVER_CERT", required=True, type=FILE)
@click.option("--server-key", envvar="JOBSVC_SERVER_KEY", required=True, type=FILE)
@click.option(
    "--grace",
    envvar="JOBSVC_GRACE",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="Seconds between SIGTERM and SIGKILL when a job is stopped.",
)
@click.option(
    "--max-argv-bytes",
    default=128 * 1024,
    show_default=True,
    type=SIZE,
    help="Largest command (all argv bytes) a Start may send.",
)
@click.option("--default-cpu", type=CPUS, help="CPU limit for jobs that set none.")
@click.option("--default-memory", type=SIZE, help="Memory limit for jobs that set none (e.g. 512M).")
@click.option("--default-pids", type=click.IntRange(1), help="Process limit for jobs that set none.")
@click.option("--max-cpu", type=CPUS, help="Largest CPU limit a job may ask for.")
@click.option("--max-memory", type=SIZE, help="Largest memory limit a job may ask for.")
@click.option("--max-pids", type=click.IntRange(1), help="Largest process limit a job may ask for.")
@click.option(
    "--work-root",
    envvar="JOBSVC_WORK_ROOT",
    default="/var/tmp/jobsvc",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Each job's fresh working directory lives here.",
)
@click.option(
    "--job-user",
    metavar="NAME",
    help="Run every job as this account (e.g. root) instead of a transient uid per job. Opt-in for "
    "trusted setups only.",
)
@click.option(
    "--job-uids",
    "uid_range",
    metavar="FIRST-LAST",
    default="61184-65519",
    show_default=True,
    callback=_uid_range,
    help="The uids transient job users come from (systemd's DynamicUser= range), taken host-wide: no two live "
    "jobs of any jobsvc servers on this host share one.",
)
@click.option(
    "--admin",
    "admins",
    multiple=True,
    metavar="SUBJECT",
    help="A certificate Subject (RFC 4514) that may get, stream, stop and list every job. Repeatable.",
)
@click.option("--max-running-per-user", default=128, show_default=True, type=click.IntRange(1))
@click.option("--max-running-total", default=512, show_default=True, type=click.IntRange(1))
@click.option("--max-streams-per-user", default=512, show_default=True, type=click.IntRange(1))
@click.option(
    "--crl",
    envvar="JOBSVC_CRL",
    type=FILE,
    help="Certificate revocation list (PEM or DER, signed by the CA); revoked clients are refused.",
)
@click.option(
    "--deny-subject",
    "deny_subjects",
    multiple=True,
    metavar="SUBJECT",
    help="Refuse this certificate Subject (RFC 4514) with PERMISSION_DENIED. Repeatable.",
)
@click.option("--deny-file", type=FILE, help="Subjects to refuse, one per line (# comments); reread on SIGHUP.")
@click.option(
    "--deny-env",
    "deny_env",
    multiple=True,
    default=("LD_PRELOAD",),
    show_default=True,
    metavar="NAME",
    help="Environment variable names a job may not set. Repeatable.",
)
@click.option("--default-timeout", type=DURATION, help="Timeout for jobs that set none (e.g. 1h).")
@click.option("--max-timeout", type=DURATION, help="Largest timeout a job may ask for.")
@click.option(
    "--max-output",
    default="1G",
    show_default=True,
    type=SIZE,
    help="Output kept per job; past it the oldest output is dropped (the job is never blocked).",
)
@click.option(
    "--max-total-output",
    default="10G",
    show_default=True,
    type=SIZE,
    help="Output kept in the state dir; past it the oldest ended jobs are removed first.",
)
@click.option(
    "--max-output-per-user",
    type=SIZE,
    help="Output one user's jobs keep in the state dir; past it their oldest ended jobs go, and while that is not "
    "enough their new output is dropped (counted as lost), so no user fills the disk for the others. "
    "[default: a quarter of the smaller of --max-total-output and the state dir's disk]",
)
@click.option(
    "--keep-finished",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Ended jobs kept per user (records, output, working dirs); the oldest go first.",
)
@click.option(
    "--keep-finished-for",
    default="7d",
    show_default=True,
    type=DURATION,
    help="How long an ended job is kept (e.g. 12h, 7d).",
)
@click.option(
    "--keepalive-time",
    default="40s",
    show_default=True,
    type=DURATION,
    help="Silence on a client connection after which the server pings the client (a number of seconds, or "
    "e.g. 500ms, 40s, 2m).",
)
@click.option(
    "--keepalive-timeout",
    default="20s",
    show_default=True,
    type=DURATION,
    help="How long the server waits for the answer to its ping (seconds, or e.g. 20s) before it closes the "
    "connection and ends its calls: a vanished client's streams are released within keepalive-time + "
    "keepalive-timeout.",
)
@click.option(
    "--handshake-timeout",
    default="5s",
    show_default=True,
    type=DURATION,
    help="How long a new connection may take to finish its TLS handshake (seconds, or e.g. 500ms, 5s) before the "
    "server closes it: silent or slow connections cannot pile up.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    help="Client connections held at once, authenticated or not (a number); past it new connections are closed "
    "as they arrive. Default: half the server's open-file limit, keeping the rest for jobs and the state dir.",
)
@click.option(
    "--reserved-connections",
    type=click.IntRange(0),
    help="Of --max-connections, how many connections that have made no authenticated call may not take (a "
    "number): past the rest, the server closes such connections, silent ones and then the oldest first, so that "
    "clients with a certificate can connect during a flood. 0: no reserve. Default: an eighth of the connections.",
)
@click.option(
    "--max-calls-per-connection",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Calls in flight at once on one connection (a number; HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); a client's "
    "further calls wait until one ends.",
)
@click.option(
    "--max-calls-per-user",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Wait and streaming calls (Stream, health Watch, reflection) one user may hold open at once over all "
    "connections (a number); past it RESOURCE_EXHAUSTED. Start, Get, Stop and List do not count.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def serve(
    listen: str,
    state_dir: Path,
    ca_cert: Path,
    server_cert: Path,
    server_key: Path,
    grace: float,
    max_argv_bytes: int,
    default_cpu: float | None,
    default_memory: int | None,
    default_pids: int | None,
    max_cpu: float | None,
    max_memory: int | None,
    max_pids: int | None,
    work_root: Path,
    job_user: str | None,
    uid_range: tuple[int, int],
    admins: tuple[str, ...],
    max_running_per_user: int,
    max_running_total: int,
    max_streams_per_user: int,
    max_output: int,
    max_total_output: int,
    max_output_per_user: int | None,
    keep_finished: int,
    keep_finished_for: float,
    crl: Path | None,
    deny_subjects: tuple[str, ...],
    deny_file: Path | None,
    deny_env: tuple[str, ...],
    default_timeout: float | None,
    max_timeout: float | None,
    keepalive_time: float,
    keepalive_timeout: float,
    handshake_timeout: float,
    max_connections: int | None,
    reserved_connections: int | None,
    max_calls_per_connection: int,
    max_calls_per_user: int,
    log_level: str,
) -> None:
    """Serve the JobService API over mutual TLS until SIGTERM or SIGINT."""
    import jobsvc.server  # noqa: F401 - sets the TLS cipher policy before grpc is imported
    from jobsvc.cgroups.base import CgroupSetupError
    from jobsvc.manager import EngineConfig
    from jobsvc.server.app import ListenError, ServerConfig, configure_logging, run
    from jobsvc.server.tls import CredentialsError, TrustFiles
    from jobsvc.store import StateDirError

    configure_logging(log_level)
    policy = LimitPolicy(
        defaults=Limits(cpu=default_cpu, memory_bytes=default_memory, pids=default_pids),
        maxima=Limits(cpu=max_cpu, memory_bytes=max_memory, pids=max_pids),
    )
    engine = EngineConfig(
        state_dir=state_dir.absolute(),
        policy=policy,
        default_grace=grace,
        max_argv_bytes=max_argv_bytes,
        work_root=work_root.absolute(),
        job_user=job_user,
        uid_range=uid_range,
        admins=frozenset(admins),
        max_running_per_user=max_running_per_user,
        max_running_total=max_running_total,
        max_streams_per_user=max_streams_per_user,
        max_output_bytes=max_output,
        max_total_output_bytes=max_total_output,
        max_output_per_user=max_output_per_user,
        keep_finished_per_user=keep_finished,
        keep_finished_seconds=keep_finished_for,
        deny_env=frozenset(deny_env),
        default_timeout=default_timeout,
        max_timeout=max_timeout,
    )
    trust = TrustFiles(
        ca_cert=ca_cert,
        server_cert=server_cert,
        server_key=server_key,
        crl=crl,
        deny_file=deny_file,
        deny_subjects=frozenset(deny_subjects),
    )
    config = ServerConfig(
        engine=engine,
        trust=trust,
        listen=listen,
        keepalive_time=keepalive_time,
        keepalive_timeout=keepalive_timeout,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        reserved_connections=reserved_connections,
        max_calls_per_connection=max_calls_per_connection,
        max_held_calls_per_user=max_calls_per_user,
    )
    try:
        code = run(config)
    except (CgroupSetupError, ListenError, CredentialsError, PermissionError, InvalidArgumentError, StateDirError) as e:
        click.echo(f"jobsvc: {e}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.group()
def pki() -> None:
    """A development PKI: a CA, a server certificate, one client certificate per user."""


@pki.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--user", "users", multiple=True, required=True, help="A user to make a client certificate for.")
def pki_init(directory: Path, users: tuple[str, ...]) -> None:
    """Write ca.pem, server.pem and USER.pem (with -key.pem files, mode 0600) into DIRECTORY."""
    from jobsvc import pki as dev_pki

    try:
        written = dev_pki.init(directory, list(users))
    except (FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for path in written:
        click.echo(path)


@pki.command("add-user")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def pki_add_user(directory: Path, names: tuple[str, ...]) -> None:
    """Add client certificates NAME.pem and NAME-key.pem (mode 0600) to DIRECTORY, signed by its CA.

    Refuses to overwrite an existing file; running servers accept the new users at once (same CA).
    """
    from jobsvc import pki as dev_pki

    try:
        written = dev_pki.add_users(directory, list(names))
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for path in written:
        click.echo(path)


@pki.command("revoke")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("certs", nargs=-1, required=True, type=FILE)
def pki_revoke(directory: Path, certs: tuple[Path, ...]) -> None:
    """Add CERTS to DIRECTORY/crl.pem, signed by DIRECTORY's CA (then `kill -HUP` a server using --crl)."""
    from jobsvc import pki as dev_pki

    try:
        click.echo(dev_pki.revoke(directory, list(certs)))
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
