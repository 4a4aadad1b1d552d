"""jobctl: each command is a few lines over JobClient. Exit codes: 0 ok, 1 failed operation, 2 usage error."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from jobsvc.errors import InvalidArgumentError

if TYPE_CHECKING:
    from jobsvc.model import JobRecord, Limits

F = TypeVar("F", bound=Callable[..., Any])
PKI = Path(".jobsvc/pki")  # where `make run` puts the dev certificates
SETTINGS = ("target", "ca_cert", "client_cert", "client_key", "timeout")
PATH_SETTINGS = ("ca_cert", "client_cert", "client_key")
STREAM_RETRIES = 5


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


def _bad(message: str, hint: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint=hint)


# -- shell completion --------------------------------------------------------------------------------------------


def _complete_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Job ids from List (nothing, quietly, when the server cannot be reached)."""
    from click.shell_completion import CompletionItem

    from .client import ClientError, JobClient

    p = ctx.find_root().params
    try:
        with JobClient(p["target"], p["ca_cert"], p["client_cert"], p["client_key"], 2.0) as c:
            records = c.list()
    except (ClientError, KeyError, TypeError):
        return []
    return [
        CompletionItem(r.id, help=" ".join(a.decode(errors="replace") for a in r.command)[:60])
        for r in records
        if r.id.startswith(incomplete)
    ]


def _complete_contexts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from .config import Config, ConfigError

    try:
        return [name for name in sorted(Config.load().contexts) if name.startswith(incomplete)]
    except ConfigError:
        return []


# -- job options -------------------------------------------------------------------------------------------------


def _size_option(value: str | None, what: str) -> int | None:
    from jobsvc.limits import parse_size

    if value is None:
        return None
    try:
        return parse_size(value, what)
    except InvalidArgumentError as e:
        raise click.BadParameter(e.message) from None


def _limits(opts: dict[str, Any]) -> Limits:
    from jobsvc.limits import merge_io, parse_cpu, parse_size, split_device_value
    from jobsvc.model import Limits

    cpu = None
    if opts["cpu"] is not None:
        try:
            cpu = parse_cpu(opts["cpu"])
        except InvalidArgumentError as e:
            raise _bad(e.message, "--cpu") from None
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
                raise _bad(msg, hint) from None
            io_entries.append((dev, name, n))
    try:
        io = merge_io(io_entries)
    except InvalidArgumentError as e:
        raise click.BadParameter(e.message) from None
    return Limits(cpu=cpu, memory_bytes=_size_option(opts["memory"], "--memory"), pids=opts["pids"], io=io)


def _env(opts: dict[str, Any]) -> dict[str, bytes]:
    """--env-file lines first, then --env (a later value wins), as the bytes the shell passed."""
    pairs: list[tuple[str, str]] = []
    for path in opts["env_file"]:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise _bad(f"{path}: {getattr(e, 'strerror', None) or e}", "--env-file") from None
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise _bad(f"{path}:{n}: want NAME=VALUE, got {line!r}", "--env-file")
            pairs.append(("--env-file", line))
    pairs += [("--env", text) for text in opts["env"]]
    env: dict[str, bytes] = {}
    for hint, text in pairs:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise _bad(f"want NAME=VALUE, got {text!r}", hint)
        env[name] = os.fsencode(value)
    return env


def _job_spec(opts: dict[str, Any]) -> dict[str, Any]:
    """start/run options -> JobClient.start keyword arguments."""
    from jobsvc.limits import parse_duration

    timeout = None
    if opts["timeout"] is not None:
        try:
            timeout = parse_duration(opts["timeout"], "--timeout")
        except InvalidArgumentError as e:
            raise _bad(e.message, "--timeout") from None
    return {"limits": _limits(opts), "env": _env(opts), "workdir": opts["workdir"], "timeout": timeout}


def job_options(f: F) -> F:
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
        click.option("--env", "-e", multiple=True, metavar="NAME=VALUE", help="Add to the job's environment."),
        click.option("--env-file", multiple=True, metavar="FILE", help="NAME=VALUE lines to add (# comments)."),
        click.option("--workdir", metavar="DIR", help="Absolute working directory (default: a fresh one per job)."),
        click.option("--timeout", metavar="DURATION", help="Stop the job when it runs longer (e.g. 90s, 5m, 2h)."),
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
id_option = click.option(
    "--id",
    "job_id",
    required=True,
    metavar="ID",
    help="Job id, or a unique prefix of it.",
    shell_complete=_complete_ids,
)


# -- commands ----------------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--context",
    "context_name",
    envvar="JOBCTL_CONTEXT",
    metavar="NAME",
    shell_complete=_complete_contexts,
    help="A server from ~/.config/jobctl/config.toml (default: its current_context).",
)
@click.option(
    "--target", envvar="JOBCTL_TARGET", default="127.0.0.1:50051", show_default=True, help="jobsvc address HOST:PORT."
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
def cli(ctx: click.Context, /, context_name: str | None, **settings: Any) -> None:
    """Run commands on a jobsvc host and watch their output.

    \b
    Each setting comes from its flag, else its JOBCTL_* variable, else the context
    (`jobctl context --help`), else the default shown.

    \b
    Shell completion (commands, options, job ids, context names); zsh and fish alike
    with zsh_source and fish_source:
      eval "$(_JOBCTL_COMPLETE=bash_source jobctl)"
    """
    ctx.ensure_object(dict)
    if ctx.invoked_subcommand != "context":
        from .config import Config, ConfigError

        try:
            config = Config.load()
            name = context_name or config.current
            chosen = config.context(name) if name else {}
        except ConfigError as e:
            raise Fail(str(e)) from None
        for key in SETTINGS:  # a context fills in only what neither a flag nor a variable set
            if key in chosen and ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT:
                value = chosen[key]
                settings[key] = Path(value).expanduser() if key in PATH_SETTINGS else value
        ctx.obj["context"] = name
    ctx.obj.update(settings)


@cli.command(context_settings={"allow_interspersed_args": False})
@job_options
@json_option
@click.argument("cmd", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_context
def start(ctx: click.Context, /, cmd: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Start CMD as a job; print its id."""
    spec = _job_spec(opts)
    record = call(lambda: client(ctx).start(_argv(cmd), **spec))
    click.echo(record.to_json() if as_json else record.id)


@cli.command()
@id_option
@json_option
@click.pass_context
def get(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job's status, exit, limits and usage."""
    _print_record(call(lambda: client(ctx).get(job_id)), as_json)


def _signal_number(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise _bad(f"unknown signal {value!r} (e.g. TERM, INT, HUP, KILL or a number)", "--signal") from None


@cli.command()
@id_option
@click.option("--signal", "sig", metavar="SIG", help="First signal to send (default TERM); KILL follows after grace.")
@click.option("--grace", type=click.FloatRange(0, 3600), help="Seconds from the first signal to SIGKILL (default 5).")
@json_option
@click.pass_context
def stop(ctx: click.Context, job_id: str, sig: str | None, grace: float | None, as_json: bool) -> None:
    """Stop a job: a signal (TERM) to all its processes, SIGKILL after the grace period."""
    number = _signal_number(sig)
    _print_record(call(lambda: client(ctx).stop(job_id, grace, number)), as_json)


@cli.command("list")
@click.option("--status", type=click.Choice(["running", "stopped", "finished"]), help="Only jobs with this status.")
@click.option("--since", metavar="DURATION", help="Only jobs started within this long (e.g. 10m, 2h, 7d).")
@click.option("--all-contexts", is_flag=True, help="Your jobs on every server of your config, side by side.")
@json_option
@click.pass_context
def list_(ctx: click.Context, status: str | None, since: str | None, all_contexts: bool, as_json: bool) -> None:
    """List your jobs, oldest first."""
    from jobsvc.limits import parse_duration

    from . import render

    seconds = None
    if since is not None:
        try:
            seconds = parse_duration(since, "--since")
        except InvalidArgumentError as e:
            raise _bad(e.message, "--since") from None
    if all_contexts:
        _list_everywhere(ctx, status, seconds, as_json)
        return
    records = call(lambda: client(ctx).list(status, seconds))
    click.echo(render.records_json(records) if as_json else render.table(records))


def _list_everywhere(ctx: click.Context, status: str | None, since: float | None, as_json: bool) -> None:
    """List on every configured server at once; an unreachable one is reported, not fatal."""
    import concurrent.futures
    import json

    from . import render
    from .client import ClientError, JobClient
    from .config import Config, ConfigError

    try:
        config = Config.load()
    except ConfigError as e:
        raise Fail(str(e)) from None
    if not config.contexts:
        raise Fail(f"no contexts in {config.path}")
    timeout = ctx.obj["timeout"]

    def one(name: str) -> list[JobRecord]:
        c = config.contexts[name]
        paths = {
            k: Path(c.get(k, PKI / f"{d}.pem")).expanduser()
            for k, d in (("ca_cert", "ca"), ("client_cert", "alice"), ("client_key", "alice-key"))
        }
        with JobClient(c.get("target", "127.0.0.1:50051"), timeout=c.get("timeout", timeout), **paths) as jc:
            return jc.list(status, since)

    rows: list[tuple[str, JobRecord]] = []
    names = sorted(config.contexts)
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        futures = {name: pool.submit(one, name) for name in names}
        for name, fut in futures.items():
            try:
                rows += [(name, r) for r in fut.result()]
            except ClientError as e:
                failed += 1
                click.echo(f"jobctl: context {name}: {e}", err=True)
    rows.sort(key=lambda row: row[1].started_at)
    if as_json:
        click.echo(json.dumps([{"context": n, **r.to_dict()} for n, r in rows], indent=2))
    else:
        click.echo(render.table([r for _, r in rows], contexts=[n for n, _ in rows]))
    if failed == len(names):
        ctx.exit(1)


def _stream(
    ctx: click.Context,
    job_id: str,
    from_offset: int,
    follow: bool = True,
    only: int | None = None,
    tail: int | None = None,
) -> None:
    """Write the job's output; after a dropped connection resume at the next byte (bounded retries, each said)."""
    from .client import ConnectionLostError

    out, err = sys.stdout.buffer, sys.stderr.buffer
    position = from_offset
    retries = 0
    while True:
        chunks = client(ctx).stream(job_id, position, follow, only, tail)
        try:
            for chunk in chunks:
                if chunk.offset > position and only is None and tail is None:
                    # the server's output retention dropped bytes before we could read them (with a filter,
                    # the other stream's bytes make gaps too, so nothing can be said)
                    gap = chunk.offset - position
                    where = "first " if position == from_offset and retries == 0 else ""
                    err.write(f"jobctl: {where}{gap} bytes dropped by the server's output retention\n".encode())
                position = chunk.offset + len(chunk.data)
                target = err if chunk.stream == 2 else out
                target.write(chunk.data)
                target.flush()
            return
        except ConnectionLostError as e:
            retries += 1
            if retries > STREAM_RETRIES:
                raise Fail(f"{e} (gave up after {STREAM_RETRIES} retries)") from None
            delay = min(0.5 * 2 ** (retries - 1), 8.0)
            click.echo(
                f"jobctl: connection lost ({e}); resuming at byte {position} in {delay:g}s "
                f"(retry {retries}/{STREAM_RETRIES})",
                err=True,
            )
            tail = None  # the tail was already written; go on from the next byte
            time.sleep(delay)
        except BrokenPipeError:
            _quiet_exit(141)  # like a shell pipeline whose reader went away
        except Exception as e:
            from .client import ClientError

            if isinstance(e, ClientError):
                raise Fail(str(e)) from None
            raise
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
    "--from-offset", type=click.IntRange(min=0), default=0, show_default=True, help="Start at this byte of the output."
)
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Start at the last N lines.")
@click.option("--no-follow", is_flag=True, help="Write what exists now and exit, even if the job runs on.")
@click.option("--stdout", "only_stdout", is_flag=True, help="Only the job's stdout.")
@click.option("--stderr", "only_stderr", is_flag=True, help="Only the job's stderr.")
@click.pass_context
def stream(
    ctx: click.Context,
    job_id: str,
    from_offset: int,
    tail: int | None,
    no_follow: bool,
    only_stdout: bool,
    only_stderr: bool,
) -> None:
    """Write the job's stdout and stderr as they come, until it ends.

    Ctrl-C stops watching (the job runs on). A dropped connection is resumed where it broke.
    """
    if only_stdout and only_stderr:
        raise click.UsageError("--stdout and --stderr exclude each other (give neither for both)")
    if tail is not None and from_offset:
        raise click.UsageError("--tail and --from-offset exclude each other")
    only = 1 if only_stdout else 2 if only_stderr else None
    try:
        _stream(ctx, job_id, from_offset, follow=not no_follow, only=only, tail=tail)
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
@job_options
@click.option("--grace", type=click.FloatRange(0, 3600), help="Grace period when Ctrl-C stops the job.")
@click.argument("cmd", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_context
def run(ctx: click.Context, /, cmd: tuple[str, ...], grace: float | None, **opts: Any) -> None:
    """Start CMD, stream its output, exit with its exit code. Ctrl-C stops the job; twice detaches."""
    spec = _job_spec(opts)
    c = client(ctx)
    record = call(lambda: c.start(_argv(cmd), **spec))
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


@cli.group()
def context() -> None:
    """Named servers in ~/.config/jobctl/config.toml ($XDG_CONFIG_HOME), like kubectl's contexts.

    \b
    current_context = "prod"
    [contexts.prod]
    target = "jobs.example.com:50051"
    ca_cert = "~/.jobsvc/ca.pem"
    client_cert = "~/.jobsvc/me.pem"
    client_key = "~/.jobsvc/me-key.pem"
    """


@context.command("list")
def context_list() -> None:
    """List the contexts; * marks the current one."""
    from .config import Config, ConfigError

    try:
        config = Config.load()
    except ConfigError as e:
        raise Fail(str(e)) from None
    if not config.contexts:
        click.echo(f"no contexts in {config.path}", err=True)
    for name in sorted(config.contexts):
        mark = "*" if name == config.current else " "
        click.echo(f"{mark} {name}\t{config.contexts[name].get('target', '127.0.0.1:50051')}")


@context.command("use")
@click.argument("name", shell_complete=_complete_contexts)
def context_use(name: str) -> None:
    """Make NAME the current context."""
    from .config import Config, ConfigError

    try:
        Config.load().use(name)
    except (ConfigError, OSError) as e:
        raise Fail(str(e)) from None
    click.echo(f"current context: {name}")


def main() -> None:
    try:
        cli(prog_name="jobctl")
        code: Any = 0
    except SystemExit as e:  # click ends every run this way
        code = e.code
        if not isinstance(code, int) and code is not None:  # sys.exit("message"), as Python would print it
            print(code, file=sys.stderr)
            code = 1
    # Leave without the interpreter's teardown (collecting and freeing every module of grpc and protobuf costs
    # more than the command itself); the client's channel is already closed and only the buffers remain.
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_exit(141)
    sys.stderr.flush()
    os._exit(code or 0)
