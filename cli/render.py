"""Human text and JSON for job records."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import signal as _signal

from jobsvc.model import JobRecord, display_arg
from jobsvc.states import JobStatus


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def signal_name(num: int) -> str:
    try:
        return _signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def command(r: JobRecord) -> str:
    return shlex.join(display_arg(a) for a in r.command)


def outcome(r: JobRecord) -> str:
    """'running', 'finished (exit 0)', 'stopped (SIGTERM)', 'finished (SIGKILL, out of memory)'."""
    if r.status is JobStatus.RUNNING:
        return "running"
    if r.signal is not None:
        how = signal_name(r.signal)
    elif r.exit_code is not None:
        how = f"exit {r.exit_code}"
    else:  # ended while no server watched it (a crash, then a restart): how is not known
        how = "exit status unknown"
    if r.oom_killed:
        how += ", out of memory"
    return f"{r.status.value} ({how})"


def _elapsed(r: JobRecord, now: dt.datetime) -> float:
    return ((r.ended_at or now) - r.started_at).total_seconds()


def _limits(r: JobRecord) -> str:
    parts = []
    if r.limits.cpu is not None:
        parts.append(f"cpu {r.limits.cpu:g}")
    if r.limits.memory_bytes is not None:
        parts.append(f"memory {size(r.limits.memory_bytes)}")
    if r.limits.pids is not None:
        parts.append(f"pids {r.limits.pids}")
    for io in r.limits.io:
        rates = [
            f"{name.replace('_', ' ')} {size(v) + '/s' if name.endswith('bps') else v}"
            for name in ("read_bps", "write_bps", "read_iops", "write_iops")
            if (v := getattr(io, name)) is not None
        ]
        parts.append(f"io {io.device} " + ", ".join(rates))
    return "; ".join(parts) or "none"


def _usage(r: JobRecord) -> str:
    u = r.usage
    parts = []
    if u.cpu_seconds is not None:
        parts.append(
            f"cpu {u.cpu_seconds:.3f}s"
            + (f" ({u.cpu_throttled_periods} throttled periods)" if u.cpu_throttled_periods else "")
        )
    if u.memory_peak_bytes is not None:
        parts.append(f"memory peak {size(u.memory_peak_bytes)}")
    if u.io_read_bytes is not None or u.io_write_bytes is not None:
        parts.append(f"io read {size(u.io_read_bytes)}, write {size(u.io_write_bytes)}")
    return "; ".join(parts) or "-"


def record_text(r: JobRecord, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    rows = [
        ("id", r.id),
        ("owner", r.owner),
        ("command", command(r)),
        ("status", outcome(r)),
    ]
    if r.reason:
        rows.append(("reason", r.reason))
    if r.oom_killed:
        rows.append(("oom killed", "yes: the kernel killed a process of this job at its memory limit"))
    if r.pids_limit_hit:
        rows.append(("pids limit", f"hit: the kernel refused a fork of this job at its limit of {r.limits.pids}"))
    rows.append(("pid", str(r.pid) if r.pid is not None else "-"))
    if r.uid is not None:
        rows.append(("user", f"uid {r.uid}"))
    if r.workdir:
        rows.append(("workdir", r.workdir))
    if r.timeout_seconds is not None:
        rows.append(("timeout", duration(r.timeout_seconds)))
    rows.append(("started", f"{_stamp(r.started_at)} ({duration((now - r.started_at).total_seconds())} ago)"))
    if r.ended_at is not None:
        rows.append(("ended", f"{_stamp(r.ended_at)} (ran {duration(_elapsed(r, now))})"))
    else:
        rows.append(("running for", duration(_elapsed(r, now))))
    output = size(r.output_bytes)
    if r.output_dropped_bytes:
        output += f" ({size(r.output_dropped_bytes)} oldest dropped by retention)"
    if r.output_lost_bytes:
        output += f" ({size(r.output_lost_bytes)} lost: the server's disk was full)"
    rows += [("limits", _limits(r)), ("usage", _usage(r)), ("output", output)]
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in rows)


def _stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(
    records: list[JobRecord],
    now: dt.datetime | None = None,
    max_command: int = 48,
    contexts: list[str] | None = None,
) -> str:
    """Aligned columns; with contexts, a first column names each record's server."""
    now = now or dt.datetime.now(dt.UTC)
    header: tuple[str, ...] = ("ID", "STATUS", "STARTED", "DURATION", "OUTPUT", "COMMAND")
    if contexts is not None:
        header = ("CONTEXT", *header)
    rows = []
    for i, r in enumerate(records):
        cmd = command(r)
        if len(cmd) > max_command:
            cmd = cmd[: max_command - 1] + "…"
        ago = duration((now - r.started_at).total_seconds()) + " ago"
        row: tuple[str, ...] = (r.id[:8], outcome(r), ago, duration(_elapsed(r, now)), size(r.output_bytes), cmd)
        rows.append((contexts[i], *row) if contexts is not None else row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def records_json(records: list[JobRecord]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2)
