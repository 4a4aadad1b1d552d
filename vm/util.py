"""Progress, logged subprocesses and step errors shared by the VM harness modules."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

_T0 = time.monotonic()


class StepError(Exception):
    """A harness step failed; the message names the step and says how to fix it."""

    def __init__(self, step: str, problem: str, fix: str = "") -> None:
        self.step, self.problem, self.fix = step, problem, fix
        text = f"step '{step}' failed: {problem}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


def elapsed() -> str:
    s = int(time.monotonic() - _T0)
    return f"{s // 60:02d}:{s % 60:02d}"


def say(msg: str) -> None:
    print(f"[vm {elapsed()}] {msg}", file=sys.stderr, flush=True)


class Timings:
    """Wall time of each named step, printed as a table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, str]]:
        """Time a step; the body may set result["status"] (default "ok", "failed" on exception)."""
        say(f"==> {name}")
        t = time.monotonic()
        status = "failed"
        result: dict[str, str] = {}
        try:
            yield result
            status = result.get("status", "ok")
        finally:
            dt = time.monotonic() - t
            self.rows.append((name, dt, status))
            say(f"<== {name}: {status} in {dt:.1f} s")

    def table(self) -> str:
        width = max([34, *(len(name) for name, _, _ in self.rows)])
        lines = [f"  {name:<{width}} {dt:7.1f} s  {status}" for name, dt, status in self.rows]
        total = time.monotonic() - _T0
        lines.append(f"  {'total':<{width}} {total:7.1f} s")
        return "\n".join(lines)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log: Path | None = None,
    check: bool = True,
    step: str = "",
    fix: str = "",
    capture: bool = False,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; output goes to `log` (appended) unless captured. Raise StepError on failure."""
    argv = [os.fspath(c) for c in cmd]
    line = "+ " + shlex.join(argv)
    if log is not None:
        with log.open("a") as f:
            f.write(line + "\n")
    out: int | None
    if capture:
        out = subprocess.PIPE
    elif log is not None:
        out = os.open(log, os.O_WRONLY | os.O_APPEND)
    else:
        out = None
    try:
        proc = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
            text=True,
            env=env,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as e:
        raise StepError(step or argv[0], f"command not found: {argv[0]}", fix or "install it") from e
    except subprocess.TimeoutExpired as e:
        raise StepError(step or argv[0], f"timed out after {timeout} s: {line}", fix) from e
    finally:
        if isinstance(out, int) and out != subprocess.PIPE:
            os.close(out)
    if check and proc.returncode != 0:
        detail = ""
        if capture:
            detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        elif log is not None:
            detail = tail(log, 25)
        raise StepError(
            step or argv[0],
            f"exit {proc.returncode}: {line}" + (f"\n{detail}" if detail else ""),
            fix or (f"see the log {log}" if log else ""),
        )
    return proc


def tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def cache_dir() -> Path:
    """Where boxes, wheelhouses, logs and run state live (outside the repo)."""
    return Path(os.environ.get("JOBSVC_VM_CACHE", "/var/cache/jobsvc-vm"))


class _Relay:
    """A pipe whose lines are echoed with the harness's elapsed-time prefix (progress bars thinned)."""

    def __init__(self) -> None:
        import threading

        self.r, self.w = os.pipe()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        import re

        last_pct = -100
        buf = b""
        with os.fdopen(self.r, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                buf += chunk
                *lines, buf = re.split(rb"\r\n|\r|\n", buf)
                for raw in lines:
                    line = re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", raw).decode(errors="replace").rstrip()
                    m = re.match(r"\s*Progress: (\d+)%", line)
                    if m:
                        pct = int(m.group(1))
                        if pct - last_pct < 25 and pct != 100:
                            continue
                        last_pct = pct
                    elif not line.strip():
                        continue
                    say("  " + line)

    def close(self) -> None:
        os.close(self.w)
        self.thread.join(timeout=10)


@contextlib.contextmanager
def relayed_output() -> Iterator[int]:
    """A file descriptor for a child's stdout/stderr, echoed line by line with timestamps."""
    relay = _Relay()
    try:
        yield relay.w
    finally:
        relay.close()
