"""jobctl: each command is a few lines over JobClient. Exit codes: 0 ok, 1 failed operation, 2 usage error."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from jobsvc.errors import InvalidArgumentError
from jobsvc.limits import merge_io, parse_cpu, parse_size, split_device_value
from jobsvc.model import JobRecord, Limits

F = TypeVar("F", bound=Callable[..., Any])
PKI = Path(".jobsvc/pki")  # where `make run` puts the dev certificates


class Fail(click.ClickException):
    """A failed operation: one line, exit 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def client(ctx: click.Context) -> Any:
    """The JobClient for this invocation (made on first use, closed when the command ends)."""
    obj = ctx.find_root().obj
    if obj.get("client") is None:
        from .client import ClientError, JobClient

        factory = obj.get("client_factory")
        try:
            obj["client"] = (
                factory()
                if factory
                else JobClient(obj["target"], obj["ca_cert"], obj["client_cert"], obj["client_key"], obj["timeout"])
            )
        except ClientError as e:
            raise Fail(str(e)) from None
        ctx.find_root().call_on_close(obj["client"].close)
    return obj["client"]


def call(fn: Callable[[], Any]) -> Any:
    """Run a client call; its ClientError becomes the one-line failure."""
    from .client import ClientError

    try:
        return fn()
    except ClientError as e:
        raise Fail(str(e)) from None


# -- limit options -----------------------------------------------------------------------------------------------


def _size_option(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value, what)
    except InvalidArgumentError as e:
        raise click.BadParameter(e.message) from None


def _limits(opts: dict[str, Any]) -> Limits:
    cpu = None
    if opts["cpu"] is not None:
        try:
            cpu = parse_cpu(opts["cpu"])
        except InvalidArgumentError as e:
            raise click.BadParameter(e.message, param_hint="--cpu") from None
    io_entries = []
    for flag, name, is_rate in (
        ("io_read_bps", "read_bps", True),
        ("io_write_bps", "write_bps", True),
        ("io_read_iops", "read_iops", False),
        ("io_write_iops", "write_iops", False),
    ):
        for text in opts[flag]:
            hint = "--" + flag.replace("_", "-")
            try:
                dev, value = split_device_value(text, hint)
                n = parse_size(value, hint) if is_rate else int(value)
            except (InvalidArgumentError, ValueError) as e:
                msg = e.message if isinstance(e, InvalidArgumentError) else f"want DEV=N, got {text!r}"
                raise click.BadParameter(msg, param_hint=hint) from None
            io_entries.append((dev, name, n))
    try:
        io = merge_io(io_entries)
    except InvalidArgumentError as e:
        raise click.BadParameter(e.message) from None
    return Limits(cpu=cpu, memory_bytes=_size_option(opts["memory"], "--memory"), pids=opts["pids"], io=io)


def limit_options(f: F) -> F:
    options = [
        click.option("--cpu", metavar="N", help="CPUs as a decimal (0.25 = a quarter of one CPU)."),
        click.option("--memory", metavar="SIZE", help="Memory limit in bytes, K/M/G suffixes (binary units)."),
        click.option("--pids", type=int, metavar="N", help="At most N processes and threads."),
        click.option("--io-read-bps", multiple=True, metavar="DEV=RATE", help="Read bytes/s for a disk (repeatable)."),
        click.option(
            "--io-write-bps", multiple=True, metavar="DEV=RATE", help="Write bytes/s for a disk (repeatable)."
        ),
        click.option("--io-read-iops", multiple=True, metavar="DEV=N", help="Read operations/s for a disk."),
        click.option("--io-write-iops", multiple=True, metavar="DEV=N", help="Write operations/s for a disk."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _argv(cmd: tuple[str, ...]) -> list[bytes]:
    if not cmd:
        raise click.UsageError("missing command: jobctl start [OPTIONS] -- CMD [ARG...]")
    return [os.fsencode(a) for a in cmd]  # back to the exact bytes the shell passed


def _print_record(r: JobRecord, as_json: bool) -> None:
    from . import render

    click.echo(r.to_json() if as_json else render.record_text(r))


json_option = click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
id_option = click.option("--id", "job_id", required=True, metavar="ID", help="Job id, or a unique prefix of it.")


# -- commands ----------------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--target",
    envvar="JOBCTL_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    help="jobsvc address HOST:PORT.",
)
@click.option(
    "--ca-cert",
    envvar="JOBCTL_CA_CERT",
    type=click.Path(path_type=Path),
    default=PKI / "ca.pem",
    show_default=True,
    help="CA certificate that signed the server's certificate.",
)
@click.option(
    "--client-cert",
    envvar="JOBCTL_CLIENT_CERT",
    type=click.Path(path_type=Path),
    default=PKI / "alice.pem",
    show_default=True,
    help="Your client certificate.",
)
@click.option(
    "--client-key",
    envvar="JOBCTL_CLIENT_KEY",
    type=click.Path(path_type=Path),
    default=PKI / "alice-key.pem",
    show_default=True,
    help="Your client key.",
)
@click.option(
    "--timeout",
    envvar="JOBCTL_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for a unary call.",
)
@click.version_option(package_name="jobsvc")
@click.pass_context
def cli(ctx: click.Context, target: str, ca_cert: Path, client_cert: Path, client_key: Path, timeout: float) -> None:
    """Run commands on a jobsvc host and watch their output.

    \b
    Shell completion (bash; zsh and fish alike with zsh_source / fish_source):
      eval "$(_JOBCTL_COMPLETE=bash_source jobctl)"
    """
    ctx.ensure_object(dict)
    ctx.obj.update(target=target, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key, timeout=timeout)


@cli.command(context_settings={"allow_interspersed_args": False})
@limit_options
@json_option
@click.argument("cmd", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_context
def start(ctx: click.Context, /, cmd: tuple[str, ...], as_json: bool, **limit_opts: Any) -> None:
    """Start CMD as a job; print its id."""
    limits = _limits(limit_opts)
    record = call(lambda: client(ctx).start(_argv(cmd), limits))
    click.echo(record.to_json() if as_json else record.id)


@cli.command()
@id_option
@json_option
@click.pass_context
def get(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job's status, exit, limits and usage."""
    _print_record(call(lambda: client(ctx).get(job_id)), as_json)


@cli.command()
@id_option
@click.option("--grace", type=click.FloatRange(0, 3600), help="Seconds from SIGTERM to SIGKILL (server default 5).")
@json_option
@click.pass_context
def stop(ctx: click.Context, job_id: str, grace: float | None, as_json: bool) -> None:
    """Stop a job: SIGTERM to all its processes, SIGKILL after the grace period."""
    _print_record(call(lambda: client(ctx).stop(job_id, grace)), as_json)


@cli.command("list")
@json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List your jobs, oldest first."""
    from . import render

    records = call(lambda: client(ctx).list())
    click.echo(render.records_json(records) if as_json else render.table(records))


def _write_output(chunks: Iterator[Any], from_offset: int) -> None:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    expected = from_offset
    for chunk in chunks:
        if chunk.offset > expected:  # the server's output retention dropped bytes before we could read them
            gap = chunk.offset - expected
            where = "first " if expected == from_offset else ""
            err.write(f"jobctl: {where}{gap} bytes dropped by the server's output retention\n".encode())
        expected = chunk.offset + len(chunk.data)
        target = err if chunk.stream == 2 else out
        target.write(chunk.data)
        target.flush()


def _stream(ctx: click.Context, job_id: str, from_offset: int) -> None:
    chunks = client(ctx).stream(job_id, from_offset)
    try:
        call(lambda: _write_output(chunks, from_offset))
    except BrokenPipeError:
        _quiet_exit(141)  # like a shell pipeline whose reader went away
    finally:
        chunks.close()


def _quiet_exit(code: int) -> NoReturn:
    # stdout may be a closed pipe: point it at /dev/null so the interpreter's final flush cannot complain
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os._exit(code)


@cli.command()
@id_option
@click.option(
    "--from-offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start at this byte of the output.",
)
@click.pass_context
def stream(ctx: click.Context, job_id: str, from_offset: int) -> None:
    """Write the job's stdout and stderr as they come, until it ends. Ctrl-C stops watching (the job runs on)."""
    try:
        _stream(ctx, job_id, from_offset)
    except KeyboardInterrupt:
        _quiet_exit(130)


@cli.command()
@id_option
@click.pass_context
def wait(ctx: click.Context, job_id: str) -> None:
    """Wait for a job to end; exit with its exit code (128 + signal when killed)."""
    try:
        record = call(lambda: client(ctx).wait(job_id))
    except KeyboardInterrupt:
        _quiet_exit(130)
    ctx.exit(record.wait_code)


class _Detach(Exception):
    pass


@cli.command(context_settings={"allow_interspersed_args": False})
@limit_options
@click.option("--grace", type=click.FloatRange(0, 3600), help="Grace period when Ctrl-C stops the job.")
@click.argument("cmd", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_context
def run(ctx: click.Context, /, cmd: tuple[str, ...], grace: float | None, **limit_opts: Any) -> None:
    """Start CMD, stream its output, exit with its exit code. Ctrl-C stops the job; twice detaches."""
    limits = _limits(limit_opts)
    c = client(ctx)
    record = call(lambda: c.start(_argv(cmd), limits))
    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            click.echo(f"jobctl: stopping job {record.id} (Ctrl-C again to detach)", err=True)
            threading.Thread(target=_stop_quietly, args=(c, record.id, grace), daemon=True).start()
        else:
            raise _Detach

    signal.signal(signal.SIGINT, on_sigint)
    try:
        _stream(ctx, record.id, 0)
        final = call(lambda: c.wait(record.id))
    except _Detach:
        click.echo(f"jobctl: detached; job {record.id} goes on (jobctl stream --id {record.id})", err=True)
        _quiet_exit(130)
    ctx.exit(final.wait_code)


def _stop_quietly(c: Any, job_id: str, grace: float | None) -> None:
    from .client import ClientError

    try:
        c.stop(job_id, grace)
    except ClientError as e:
        click.echo(f"error: {e}", err=True)


def main() -> None:
    cli(prog_name="jobctl")
