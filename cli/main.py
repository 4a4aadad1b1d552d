"""jobctl: each command is a few lines over JobClient. Exit codes: 0 ok, 1 failed operation, 2 usage error."""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from jobsvc import params
from jobsvc.errors import InvalidArgumentError

if TYPE_CHECKING:
    from jobsvc.model import JobRecord, Limits

    from .config import Config

F = TypeVar("F", bound=Callable[..., Any])
PKI = Path(".jobsvc/pki")  # where `make run` puts the dev certificates
SETTINGS = ("target", "ca_cert", "client_cert", "client_key", "timeout")
PATH_SETTINGS = ("ca_cert", "client_cert", "client_key")
MIN_PREFIX = 4  # the server resolves id prefixes of at least this many characters (jobsvc.manager.MIN_PREFIX)
FULL_ID = 36
MAX_PIDS = 4 * 1024 * 1024  # jobsvc.limits.MAX_PIDS, the kernel's PID_MAX_LIMIT (kept out of start-up imports)
MAX_INT64 = 2**63 - 1
WAIT_TIMED_OUT = 124  # like timeout(1)


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


# jobsvc's one vocabulary for limits (jobsvc.params), in jobctl's wording of a bad value
DURATION = params.Duration("duration", strip=True)
GRACE = params.Duration("duration", strip=True, allow_zero=True, maximum=3600)
CPU = params.Cpu(hint="bare")  # the server checks the value (its CPUs, its maximum)
MEMORY = params.Size("--memory", hint="none")


class Since(click.ParamType):
    """A moment as a duration before now (10m, 1h30m, like `docker logs --since`) or an RFC 3339 time; Unix ms."""

    name = "since"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        import datetime as dt

        if isinstance(value, int):
            return value
        text = str(value)
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            ago = DURATION.convert(text, param, ctx)
            return int((time.time() - ago) * 1000)
        if moment.tzinfo is None:
            self.fail(f"{text!r} has no time zone (add Z for UTC, or an offset such as +01:00)", param, ctx)
        return int(moment.timestamp() * 1000)


def _stamp(ms: int) -> bytes:
    """RFC 3339 in UTC to the millisecond, as `jobctl stream --timestamps` prefixes lines."""
    if not ms:
        return b"(time unknown)           "
    t = time.gmtime(ms // 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{ms % 1000:03d}Z ".encode()


# -- shell completion --------------------------------------------------------------------------------------------


def _complete_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Job ids from List on the selected context's server (nothing, quietly, when it cannot be reached)."""
    from click.shell_completion import CompletionItem

    from .client import ClientError, JobClient
    from .config import Config, ConfigError

    root = ctx.find_root()  # the group's options as typed so far (completion does not run the group itself)
    try:
        config = Config.load()
        s = resolve(root, config, root.params.get("context_name") or config.current)
        with JobClient(s["target"], s["ca_cert"], s["client_cert"], s["client_key"], 2.0) as c:
            records = c.list()
    except (ClientError, ConfigError, click.ClickException, KeyError, TypeError):
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


_IO_OPTIONS = (  # option, IoLimit field, a rate (size suffixes) or a count
    ("io_read_bps", "read_bps", True),
    ("io_write_bps", "write_bps", True),
    ("io_read_iops", "read_iops", False),
    ("io_write_iops", "write_iops", False),
)


def _limits(opts: dict[str, Any]) -> Limits:
    from jobsvc.limits import merge_io
    from jobsvc.model import Limits

    io_entries = [(dev, name, n) for flag, name, _ in _IO_OPTIONS for dev, n in opts[flag]]
    try:
        io = merge_io(io_entries)
    except InvalidArgumentError as e:
        raise click.BadParameter(e.message) from None
    return Limits(cpu=opts["cpu"], memory_bytes=opts["memory"], pids=opts["pids"], io=io)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
        if not _ENV_NAME.fullmatch(name):
            extra = " (drop the 'export')" if name.startswith("export ") else ""
            raise _bad(
                f"invalid environment variable name {name!r}{extra}: want letters, digits and _, "
                "not starting with a digit",
                hint,
            )
        env[name] = os.fsencode(value)
    return env


def _job_spec(opts: dict[str, Any]) -> dict[str, Any]:
    """start/run options -> JobClient.start keyword arguments."""
    return {"limits": _limits(opts), "env": _env(opts), "workdir": opts["workdir"], "timeout": opts["timeout"]}


def job_options(f: F) -> F:
    options = [
        click.option(
            "--cpu",
            type=CPU,
            metavar="N",
            help="CPU limit: N CPUs as a decimal (0.25 = a quarter of one CPU, 2 = two CPUs).",
        ),
        click.option(
            "--memory",
            type=MEMORY,
            metavar="SIZE",
            help="Memory limit (swap included) in bytes, with K/M/G/T suffixes in binary units (64M = 64 MiB).",
        ),
        click.option(
            "--pids",
            type=click.IntRange(1, MAX_PIDS),
            metavar="N",
            help="At most N processes and threads in the job.",
        ),
        click.option(
            "--io-read-bps",
            type=params.DeviceValue("--io-read-bps", rate=True),
            multiple=True,
            metavar="DEV=RATE",
            help="Read bytes/s on a disk (/dev/vda=1M or 254:0=1M; K/M/G suffixes). Repeatable.",
        ),
        click.option(
            "--io-write-bps",
            type=params.DeviceValue("--io-write-bps", rate=True),
            multiple=True,
            metavar="DEV=RATE",
            help="Write bytes/s on a disk (/dev/vda=1M or 254:0=1M; K/M/G suffixes). Repeatable.",
        ),
        click.option(
            "--io-read-iops",
            type=params.DeviceValue("--io-read-iops", rate=False),
            multiple=True,
            metavar="DEV=N",
            help="Read operations/s on a disk (/dev/vda=100). Repeatable.",
        ),
        click.option(
            "--io-write-iops",
            type=params.DeviceValue("--io-write-iops", rate=False),
            multiple=True,
            metavar="DEV=N",
            help="Write operations/s on a disk (/dev/vda=100). Repeatable.",
        ),
        click.option(
            "--env",
            "-e",
            multiple=True,
            metavar="NAME=VALUE",
            help="Add NAME=VALUE to the job's environment. Repeatable.",
        ),
        click.option(
            "--env-file",
            multiple=True,
            metavar="FILE",
            help="Add the NAME=VALUE lines of FILE (# comments); --env wins. Repeatable.",
        ),
        click.option("--workdir", metavar="DIR", help="Absolute working directory (default: a fresh one per job)."),
        click.option(
            "--timeout",
            type=DURATION,
            metavar="DURATION",
            help="Stop the job (reason timeout) when it runs longer: seconds or e.g. 90s, 1m30s, 2h.",
        ),
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


def _pick_id(positional: str | None, option: str | None) -> str:
    """The job id from ID or --id (either, not two different ones); a prefix must be long enough to resolve."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two job ids given: {positional!r} and --id {option!r}")
    job_id = positional if positional is not None else option
    if job_id is None:
        raise click.UsageError("missing job id: give it as ID or --id ID")
    if len(job_id) < MIN_PREFIX:
        raise click.BadParameter(
            f"{job_id!r} is too short: give the job id or a unique prefix of at least {MIN_PREFIX} characters",
            param_hint="ID",
        )
    return job_id


def job_id_params(f: F) -> F:
    """ID as a positional argument (like docker) or --id ID; the command gets job_id."""

    @functools.wraps(f)
    def wrapper(*args: Any, job_id_arg: str | None, job_id_opt: str | None, **kwargs: Any) -> Any:
        return f(*args, job_id=_pick_id(job_id_arg, job_id_opt), **kwargs)

    wrapper = click.option(
        "--id",
        "job_id_opt",
        metavar="ID",
        help=f"Job id, or a unique prefix of at least {MIN_PREFIX} characters (the same as ID).",
        shell_complete=_complete_ids,
    )(wrapper)
    wrapper = click.argument("job_id_arg", required=False, metavar="ID", shell_complete=_complete_ids)(wrapper)
    return wrapper  # type: ignore[return-value]


reconnect_option = click.option(
    "--reconnect-for",
    envvar="JOBCTL_RECONNECT_FOR",
    show_envvar=True,
    type=params.Duration("duration", strip=True, allow_zero=True),
    default="60s",
    show_default=True,
    metavar="DURATION",
    help="When the connection drops (a server restart), keep reconnecting this long without progress, then resume "
    "at the next byte; 0 gives up at once.",
)


def _context_timeout(value: object, path: Path, name: str | None) -> float:
    try:
        return DURATION.convert(value, None, None)
    except click.BadParameter as e:
        raise Fail(f"{path}: context {name!r}: timeout: {e.message}") from None


# -- settings: one resolver for every command, `list --all-contexts` and the completion of job ids ----------------


def _given(root: click.Context, key: str) -> bool:
    """Whether the user set this setting: its flag or its JOBCTL_* variable."""
    return root.get_parameter_source(key) in (
        click.core.ParameterSource.COMMANDLINE,
        click.core.ParameterSource.ENVIRONMENT,
    )


def resolve(root: click.Context, config: Config, name: str | None) -> dict[str, Any]:
    """The settings for context name (None: no context): each from its flag, else its JOBCTL_* variable, else the
    context, else its default. root is the group's context, as click parsed the command line and environment."""
    chosen = config.context(name) if name else {}
    settings: dict[str, Any] = {}
    for key in SETTINGS:
        if _given(root, key) or key not in chosen:
            settings[key] = root.params[key]
        elif key in PATH_SETTINGS:
            settings[key] = Path(chosen[key]).expanduser()
        elif key == "timeout":
            settings[key] = _context_timeout(chosen[key], config.path, name)
        else:
            settings[key] = chosen[key]
    return settings


# -- commands ----------------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--context",
    "context_name",
    envvar="JOBCTL_CONTEXT",
    show_envvar=True,
    metavar="NAME",
    shell_complete=_complete_contexts,
    help="A server from ~/.config/jobctl/config.toml (default: its current_context).",
)
@click.option(
    "--target",
    envvar="JOBCTL_TARGET",
    show_envvar=True,
    default="127.0.0.1:50051",
    show_default=True,
    metavar="HOST:PORT",
    help="jobsvc's address.",
)
@click.option(
    "--ca-cert",
    envvar="JOBCTL_CA_CERT",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=PKI / "ca.pem",
    show_default=True,
    help="CA certificate (PEM) that signed the server's certificate.",
)
@click.option(
    "--client-cert",
    envvar="JOBCTL_CLIENT_CERT",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=PKI / "alice.pem",
    show_default=True,
    help="Your client certificate (PEM).",
)
@click.option(
    "--client-key",
    envvar="JOBCTL_CLIENT_KEY",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=PKI / "alice-key.pem",
    show_default=True,
    help="Your client certificate's private key (PEM, unencrypted).",
)
@click.option(
    "--timeout",
    envvar="JOBCTL_TIMEOUT",
    show_envvar=True,
    type=DURATION,
    default="10s",
    show_default=True,
    metavar="DURATION",
    help="How long to wait for the answer to a call (not for a stream or a wait): seconds or e.g. 90s, 1m30s.",
)
@click.option(
    "--no-agent",
    is_flag=True,
    expose_value=False,
    help="Run in this process, not through jobctl's warm command server (as JOBCTL_NO_AGENT=1 does).",
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
    source = "--target or JOBCTL_TARGET"
    if ctx.invoked_subcommand != "context":
        from .config import Config, ConfigError

        try:
            config = Config.load()
            name = context_name or config.current
            settings = resolve(ctx, config, name)
        except ConfigError as e:
            raise Fail(str(e)) from None
        if name and "target" in config.contexts[name] and not _given(ctx, "target"):
            source = f"context {name!r} in {config.path}"
        ctx.obj["context"] = name
    from .client import check_target

    problem = check_target(settings["target"])
    if problem and source.startswith("--"):
        raise click.BadParameter(problem, param_hint="'--target' / 'JOBCTL_TARGET'")
    if problem:
        raise Fail(f"{source}: target: {problem}")
    ctx.obj.update(settings)


@cli.command(context_settings={"allow_interspersed_args": False})
@job_options
@json_option
@click.argument("cmd", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_context
def start(ctx: click.Context, /, cmd: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Start CMD as a job; print its id (--json: its record)."""
    spec = _job_spec(opts)
    record = call(lambda: client(ctx).start(_argv(cmd), **spec))
    click.echo(record.to_json() if as_json else record.id)


@cli.command()
@job_id_params
@json_option
@click.pass_context
def get(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show job ID's status, exit, limits and usage."""
    _print_record(call(lambda: client(ctx).get(job_id)), as_json)


def _signal_number(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        number = int(value)
        if number not in {int(s) for s in signal.valid_signals()}:
            raise _bad(f"{value} is not a signal number on this host (1-{int(signal.SIGRTMAX)})", "--signal")
        return number
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise _bad(f"unknown signal {value!r} (e.g. TERM, INT, HUP, KILL or a number)", "--signal") from None


@cli.command()
@job_id_params
@click.option(
    "--signal", "sig", metavar="SIG", help="First signal: a name (TERM, INT, HUP...) or a number (default TERM)."
)
@click.option(
    "--grace",
    type=GRACE,
    metavar="DURATION",
    help="From the first signal to SIGKILL, at most 1h: seconds or e.g. 500ms, 30s, 1m (default: the server's, 5s).",
)
@json_option
@click.pass_context
def stop(ctx: click.Context, job_id: str, sig: str | None, grace: float | None, as_json: bool) -> None:
    """Stop job ID: a signal (TERM) to all its processes, SIGKILL after the grace period; print its record."""
    number = _signal_number(sig)
    _print_record(call(lambda: client(ctx).stop(job_id, grace, number)), as_json)


STATUSES = ("running", "stopped", "finished")


@cli.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only jobs with this status. Repeatable: jobs with any of them.",
)
@click.option(
    "--since", type=DURATION, metavar="DURATION", help="Only jobs started within this long (e.g. 90s, 10m, 2h, 7d)."
)
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(1, MAX_INT64),
    metavar="N",
    help="Only the newest N jobs (still shown oldest first). Default: all of them.",
)
@click.option(
    "--all-contexts",
    is_flag=True,
    help="Your jobs on every server of your config, side by side (flags and JOBCTL_* variables still win over each "
    "context's settings).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of records, oldest first.")
@click.pass_context
def list_(
    ctx: click.Context,
    statuses: tuple[str, ...],
    since: float | None,
    limit: int | None,
    all_contexts: bool,
    as_json: bool,
) -> None:
    """List your jobs, oldest first: all of them, however many (the server answers page by page)."""
    from . import render

    wanted = tuple(dict.fromkeys(statuses))  # in the order given, once each
    if all_contexts:
        if limit is not None:
            raise click.UsageError("--limit and --all-contexts exclude each other")
        _list_everywhere(ctx, wanted, since, as_json)
        return
    records = call(lambda: client(ctx).list(wanted, since, limit))
    click.echo(render.records_json(records) if as_json else render.table(records))


def _list_everywhere(ctx: click.Context, statuses: tuple[str, ...], since: float | None, as_json: bool) -> None:
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
    root = ctx.find_root()

    def one(name: str) -> list[JobRecord]:
        s = resolve(root, config, name)  # each context as if it were the selected one: flags and variables win
        with JobClient(s["target"], s["ca_cert"], s["client_cert"], s["client_key"], s["timeout"]) as jc:
            return jc.list(statuses, since)

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
    reconnect_for: float = 60.0,
    reached: bool = False,
    since_ms: int | None = None,
    timestamps: bool = False,
) -> None:
    """Write the job's output; across dropped connections and restarts resume at the next byte (cli/resume.py)."""
    from .client import ClientError
    from .resume import follow as follow_output

    out, err = sys.stdout.buffer, sys.stderr.buffer
    c = client(ctx)
    first = True
    chunks = follow_output(
        # --since places the first byte only: once output came, a resumed stream goes on from the next byte
        lambda position, tail_lines: c.stream(job_id, position, follow, only, tail_lines, since_ms if first else None),
        from_offset,
        tail,
        reconnect_for=reconnect_for,
        reached=reached,
        notify=lambda line: click.echo(f"jobctl: {line}", err=True),
    )
    position = from_offset
    line_start = {1: True, 2: True}  # --timestamps: where each stream's next byte begins a line
    try:
        for chunk in chunks:
            placed = tail is not None or since_ms is not None  # the first chunk starts where they put it
            if chunk.offset > position and only is None and not (placed and first):
                # bytes the server does not have (with a filter, the other stream's bytes make gaps too, so
                # nothing can be said): the oldest ones its retention dropped, or ones its full disk lost
                gap = chunk.offset - position
                if first:
                    err.write(f"jobctl: first {gap} bytes dropped by the server's output retention\n".encode())
                else:
                    err.write(
                        f"jobctl: {gap} bytes missing at byte {position} (lost while the server's disk was full, "
                        "or dropped by its output retention before they were read)\n".encode()
                    )
            first = False
            position = chunk.offset + len(chunk.data)
            target = err if chunk.stream == 2 else out
            if timestamps:
                target.write(_stamped(chunk.data, chunk.read_at_ms, line_start, chunk.stream))
            else:
                target.write(chunk.data)
            target.flush()
    except BrokenPipeError:
        _quiet_exit(141)  # like a shell pipeline whose reader went away
    except ClientError as e:
        raise Fail(str(e)) from None
    finally:
        chunks.close()


def _stamped(data: bytes, ms: int, line_start: dict[int, bool], stream: int) -> bytes:
    """data with the time its run was read before each line that begins in it (`docker logs -t`)."""
    stamp = _stamp(ms)
    lines = data.splitlines(keepends=True)
    parts = []
    for line in lines:
        if line_start[stream]:
            parts.append(stamp)
        parts.append(line)
        line_start[stream] = line.endswith(b"\n")
    return b"".join(parts)


def _quiet_exit(code: int) -> NoReturn:
    # stdout may be a closed pipe: point it at /dev/null so the interpreter's final flush cannot complain
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os._exit(code)


@cli.command()
@job_id_params
@click.option(
    "--from-offset",
    type=click.IntRange(0, MAX_INT64),
    default=0,
    show_default=True,
    metavar="BYTES",
    help="Start at this byte of the output (stdout and stderr counted together).",
)
@click.option("--tail", type=click.IntRange(0, MAX_INT64), metavar="N", help="Start at the last N lines.")
@click.option(
    "--since",
    "since_ms",
    type=Since(),
    metavar="WHEN",
    help="Start at the first byte the server read at or after WHEN: a duration before now (10m, 1h30m) or an "
    "RFC 3339 time (2026-12-01T10:00:00Z). With --tail, whichever starts later.",
)
@click.option(
    "-t",
    "--timestamps",
    is_flag=True,
    help="Begin each line with the time the server read it (UTC, RFC 3339, to 0.1 s), like docker logs -t.",
)
@click.option("--no-follow", is_flag=True, help="Write what exists now and exit, even if the job runs on.")
@click.option("--stdout", "only_stdout", is_flag=True, help="Only the job's stdout.")
@click.option("--stderr", "only_stderr", is_flag=True, help="Only the job's stderr.")
@reconnect_option
@click.pass_context
def stream(
    ctx: click.Context,
    job_id: str,
    from_offset: int,
    tail: int | None,
    since_ms: int | None,
    timestamps: bool,
    no_follow: bool,
    only_stdout: bool,
    only_stderr: bool,
    reconnect_for: float,
) -> None:
    """Write job ID's stdout and stderr as they come, until it ends; exit 0 once all of it is written.

    Ctrl-C stops watching (exit 130; the job runs on). A dropped connection, a server restart too, is resumed at
    the next byte (see --reconnect-for); each step is said on stderr.
    """
    if only_stdout and only_stderr:
        raise click.UsageError("--stdout and --stderr exclude each other (give neither for both)")
    if tail is not None and from_offset:
        raise click.UsageError("--tail and --from-offset exclude each other")
    if since_ms is not None and from_offset:
        raise click.UsageError("--since and --from-offset exclude each other")
    only = 1 if only_stdout else 2 if only_stderr else None
    try:
        _stream(
            ctx,
            job_id,
            from_offset,
            follow=not no_follow,
            only=only,
            tail=tail,
            reconnect_for=reconnect_for,
            since_ms=since_ms,
            timestamps=timestamps,
        )
    except KeyboardInterrupt:
        _quiet_exit(130)


@cli.command()
@job_id_params
@click.option(
    "--timeout",
    "wait_for",
    type=DURATION,
    metavar="DURATION",
    help=f"Give up after this long (seconds or e.g. 90s, 1m30s, 2h): say so and exit {WAIT_TIMED_OUT}; the job "
    "runs on.",
)
@click.pass_context
def wait(ctx: click.Context, job_id: str, wait_for: float | None) -> None:
    """Wait for job ID to end; exit with its exit code (128 + signal when killed).

    With --timeout, exit 124 (like timeout(1)) and say so when the job is still running then.
    """
    from .client import WaitTimeoutError

    try:
        record = client(ctx).wait(job_id, wait_for)
    except KeyboardInterrupt:
        _quiet_exit(130)
    except WaitTimeoutError as e:
        click.echo(f"jobctl: {e}", err=True)
        ctx.exit(WAIT_TIMED_OUT)
    except Exception as e:
        from .client import ClientError

        if isinstance(e, ClientError):
            raise Fail(str(e)) from None
        raise
    ctx.exit(record.wait_code)


def why_it_ended(r: JobRecord) -> str | None:
    """One line for a job that did not end by itself with an exit code (None when it did)."""
    from . import render

    how = f"exit {r.exit_code}" if r.signal is None else render.signal_name(r.signal)
    short = r.id[:8]
    if r.oom_killed:
        return f"job {short} was killed at its memory limit (out of memory, {how})"
    if r.reason == "timeout":
        limit = f" of {render.duration(r.timeout_seconds)}" if r.timeout_seconds is not None else ""
        return f"job {short} was stopped at its timeout{limit} ({how})"
    if r.status.value == "stopped":
        reason = r.reason or "stopped"
        return f"job {short} was stopped: {reason} ({how})"
    if r.signal is not None:
        return f"job {short} was killed by {how}"
    return None


@cli.command(context_settings={"allow_interspersed_args": False})
@job_options
@click.option(
    "--grace",
    type=GRACE,
    metavar="DURATION",
    help="When Ctrl-C stops the job: from SIGTERM to SIGKILL, at most 1h (default: the server's, 5s).",
)
@reconnect_option
@click.argument("cmd", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_context
def run(ctx: click.Context, /, cmd: tuple[str, ...], grace: float | None, reconnect_for: float, **opts: Any) -> None:
    """Start CMD, stream its output, exit with its exit code (128 + signal when killed).

    \b
    When the job did not end by itself, one line on stderr says why (out of memory,
    timeout, stopped, server shutdown or restart).
    Ctrl-C stops the job (SIGTERM, SIGKILL after the grace period); the output goes on
    until it has ended. Ctrl-C again: no more output, only wait for the stop (at most the
    grace period), then exit with the job's code. A third Ctrl-C leaves at once.
    To leave a job running, use start and stream: Ctrl-C on stream only stops watching.
    """
    spec = _job_spec(opts)
    c = client(ctx)
    record = call(lambda: c.start(_argv(cmd), **spec))
    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            click.echo(
                f"jobctl: stopping job {record.id[:8]} (SIGTERM, SIGKILL after the grace period); "
                "Ctrl-C again to stop waiting",
                err=True,
            )
            threading.Thread(target=_stop_quietly, args=(c, record.id, grace), daemon=True).start()
        else:
            raise _StopWaiting

    signal.signal(signal.SIGINT, on_sigint)
    try:
        _stream(ctx, record.id, 0, reconnect_for=reconnect_for, reached=True)
        final = call(lambda: c.wait(record.id))
    except _StopWaiting:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third Ctrl-C ends jobctl at once
        click.echo(
            f"jobctl: no more output; waiting only for job {record.id[:8]} to be stopped "
            "(SIGKILL after the grace period); Ctrl-C again to leave at once",
            err=True,
        )
        # Stop is idempotent: this joins the stop under way (or makes sure there is one) and returns once the job
        # has ended, so leaving never depends on whether the first Stop had reached the server.
        final = call(lambda: c.stop(record.id, grace))
    why = why_it_ended(final)
    if why:
        click.echo(f"jobctl: {why}", err=True)
    ctx.exit(final.wait_code)


class _StopWaiting(Exception):
    pass


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


def _output_failed(e: OSError) -> NoReturn:
    """stdout could not take jobctl's output (a full disk, an I/O error): say so in one line, exit 1."""
    try:
        sys.stderr.write(f"error: cannot write to stdout: {e.strerror or e}\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def _stdout_closed() -> bool:
    # Python makes sys.stdout None when fd 1 is closed at start-up, but a descriptor it opened meanwhile may have
    # held number 1 then: fd 1 is checked again here, before grpc can put its own descriptor there (a write or
    # dup2 onto that one at exit killed grpc's poller: SIGABRT, seen once in CI)
    if sys.stdout is None:
        return True
    try:
        os.fstat(1)
    except OSError:
        return True
    return False


def main() -> None:
    if _stdout_closed():  # started with fd 1 closed (`jobctl ... >&-`): nowhere to write, so do nothing
        if sys.stderr is not None:
            sys.stderr.write("error: cannot write to stdout: it is closed\n")
            sys.stderr.flush()
        os._exit(1)
    try:
        cli(prog_name="jobctl")
        code: Any = 0
    except SystemExit as e:  # click ends every run this way
        code = e.code
        if not isinstance(code, int) and code is not None:  # sys.exit("message"), as Python would print it
            print(code, file=sys.stderr)
            code = 1
    except BrokenPipeError:
        _quiet_exit(141)
    except OSError as e:
        if e.filename is not None:  # a file jobctl read (certificates and config are reported where they are read)
            click.echo(f"error: {e.filename}: {e.strerror}", err=True)
            os._exit(1)
        _output_failed(e)
    # Leave without the interpreter's teardown (collecting and freeing every module of grpc and protobuf costs
    # more than the command itself); the client's channel is already closed and only the buffers remain.
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_exit(141)
    except OSError as e:
        _output_failed(e)
    sys.stderr.flush()
    os._exit(code or 0)
