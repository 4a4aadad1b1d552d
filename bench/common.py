"""What every benchmark shares: a real `jobsvc serve` subprocess, /proc probes, statistics and result files."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: jobsvc, jobctl, py-spy
RESULTS = Path(__file__).resolve().parent / "results"
# not under /tmp or /var/tmp: jobs get private ones, and fanout's gate files must be seen by its jobs
DEFAULT_SCRATCH = Path(os.environ.get("BENCH_SCRATCH", str(REPO / "bench" / ".scratch")))
MiB = 1024 * 1024
GiB = 1024 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Issue 7: "start the server with quotas raised by its flags where they would get in the way, and say so". Each
# benchmark names the quotas its load would hit; a flag is passed only when `jobsvc serve --help` lists it, and the
# run prints and records what it raised.
BIG = "100000"
RUNNING_QUOTAS = {"--max-running-per-user": BIG, "--max-running-total": BIG}
STREAM_QUOTAS = {"--max-streams-per-user": BIG, "--max-streams-total": BIG, "--max-streams-per-job": BIG}
KEEP_QUOTAS = {"--keep-finished": BIG}
OUTPUT_QUOTAS = {"--max-total-output": str(1 << 40)}


@dataclass
class Options:
    quick: bool = False
    scratch: Path = DEFAULT_SCRATCH
    results: Path = RESULTS
    keep: bool = False
    profile: bool = False
    log_level: str = "INFO"


# -- statistics ------------------------------------------------------------------------------------------------------


def timed_threads(work: Callable[[Any], object], args: Iterable[Any]) -> float:
    """Seconds for work(a) to run in one thread per a, all started together."""
    threads = [threading.Thread(target=work, args=(a,)) for a in args]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def dist_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds of durations in seconds."""
    ms = [x * 1000 for x in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "max": round(max(ms), 3) if ms else float("nan"),
        "mean": round(sum(ms) / len(ms), 3) if ms else float("nan"),
    }


def mbps(nbytes: int | float, seconds: float) -> float:
    return round(nbytes / MiB / seconds, 1) if seconds > 0 else float("inf")


# -- /proc probes ----------------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_mb(pid: int) -> float:
    return round(int(proc_status(pid)["VmRSS"].split()[0]) / 1024, 1)


def hwm_mb(pid: int) -> float:
    return round(int(proc_status(pid)["VmHWM"].split()[0]) / 1024, 1)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may contain spaces


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included, its children not)."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def processes_with_parent(parents: Iterable[int]) -> list[tuple[int, int, str]]:
    """(pid, ppid, state) of every process whose parent is one of parents."""
    wanted = set(parents)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = _stat_fields(int(name))
        except OSError:
            continue
        state, ppid = f[0], int(f[1])
        if ppid in wanted:
            found.append((int(name), ppid, state))
    return found


def _process_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, name, CPU seconds) for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        table[int(name)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


INODES_NOTED = 1_000_000  # cached inodes past which a result says so (see HostLoad.report)


class HostLoad:
    """CPU used by processes outside this benchmark's process tree (other work on a shared, noisy machine)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.before = _process_table()
        self.steal0 = _steal_seconds()
        self.inodes0 = _inodes_cached()

    def report(self) -> dict[str, Any]:
        after = _process_table()
        elapsed = time.monotonic() - self.t0
        mine = {os.getpid()}
        changed = True
        while changed:  # our descendants: the server, its helper, the jobs, jobctl processes
            changed = False
            for pid, (ppid, _, _) in after.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        other = []
        for pid, (_, name, cpu) in after.items():
            if pid in mine or pid not in self.before:
                continue
            delta = cpu - self.before[pid][2]
            if delta > 0:
                other.append((delta, name, pid))
        other.sort(reverse=True)
        total = sum(d for d, _, _ in other)
        return {
            "seconds": round(elapsed, 1),
            "other_cpu_seconds": round(total, 2),
            "other_cpu_share_of_machine": round(total / (elapsed * (os.cpu_count() or 1)), 3) if elapsed else None,
            "top_other": [f"{name}[{pid}] {d:.1f}s" for d, name, pid in other[:3]],
            "loadavg": open("/proc/loadavg").read().split()[:3],
            # what the hypervisor gave to other guests: invisible above, and it slows every row alike
            "steal_share_of_machine": (
                round((_steal_seconds() - self.steal0) / (elapsed * (os.cpu_count() or 1)), 3) if elapsed else None
            ),
            # inodes in the kernel's cache, before and after: every inode made or first looked up (a job's files,
            # its groups' files) walks a hash chain, and on this host 2.1 million cached inodes made that walk
            # (find_inode_fast) 4.5% of both cores under churn
            "inodes_cached": [self.inodes0, _inodes_cached()],
        }


def _steal_seconds() -> float:
    """CPU time stolen from this VM by its host (the steal column of /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def _inodes_cached() -> int | None:
    try:
        with open("/proc/sys/fs/inode-nr") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def code_info() -> dict[str, Any]:
    """The commit measured, and whether the working tree had uncommitted changes to the server or the CLI."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            ).stdout.rstrip("\n")
        except (OSError, subprocess.TimeoutExpired):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "jobsvc", "cli").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_changes": changed[:20]}


def host_info() -> dict[str, Any]:
    import grpc

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "mem_total_mb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MiB),
    }


# -- results ---------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One measured figure, its same-run baseline and the issue's target."""

    metric: str
    value: float | None
    unit: str
    target: str = ""
    ok: bool | None = None
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None


@dataclass
class Result:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def check(
        self,
        metric: str,
        value: float | None,
        unit: str,
        *,
        target: str = "",
        ok: bool | None = None,
        baseline: float | None = None,
        baseline_name: str = "",
        ratio: float | None = None,
    ) -> Check:
        if ratio is None and baseline and value is not None:
            ratio = round(value / baseline, 3)
        c = Check(metric, value, unit, target, ok, baseline, baseline_name, ratio)
        self.checks.append(c)
        return c

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def write_result(result: Result, opts: Options) -> Path:
    opts.results.mkdir(parents=True, exist_ok=True)
    path = opts.results / f"{result.name}.json"
    doc = {
        "benchmark": result.name,
        "finished_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": opts.quick,
        "host": host_info(),
        "code": code_info(),
        **asdict(result),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


# -- the server under test -------------------------------------------------------------------------------------------


def serve_flags() -> set[str]:
    """The long options `jobsvc serve` accepts."""
    try:
        help_text = subprocess.run(
            [str(BIN / "jobsvc"), "serve", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text))


class Server:
    """`jobsvc serve` as a real subprocess on 127.0.0.1, port 0, with a fresh dev PKI in its work dir."""

    def __init__(
        self, workdir: Path, opts: Options, extra_args: Sequence[str] = (), raise_quotas: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.opts = opts
        self.extra_args = list(extra_args)
        self.raise_quotas = dict(raise_quotas or {})
        self.pki = workdir / "pki"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.quota_flags: dict[str, str] = {}
        self._profiler: subprocess.Popen[bytes] | None = None
        self.profile_path = workdir / "server.pyspy.txt"

    # lifecycle

    def start(self) -> Server:
        from jobsvc import pki

        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        pki.init(self.pki, ["alice"])
        flags = serve_flags()
        self.quota_flags = {f: v for f, v in self.raise_quotas.items() if f in flags}
        args = [
            str(BIN / "jobsvc"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(self.state_dir),
            "--ca-cert",
            str(self.pki / "ca.pem"),
            "--server-cert",
            str(self.pki / "server.pem"),
            "--server-key",
            str(self.pki / "server-key.pem"),
            "--log-level",
            self.opts.log_level,
        ]
        if "--work-root" in flags:  # jobs' working directories stay in the scratch dir too
            args += ["--work-root", str(self.workdir / "work")]
        for flag, value in self.quota_flags.items():
            args += [flag, value]
        args += self.extra_args
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("jobsvc listening on "):
            self.stop()
            raise RuntimeError(f"jobsvc serve did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")
        self.port = int(line.strip().rsplit(":", 1)[1])
        if self.opts.profile:
            self._start_profiler()
        return self

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (the server stops its jobs and removes its groups), SIGKILL if it hangs."""
        self._stop_profiler()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def cleanup(self) -> None:
        if not self.opts.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # profiling (py-spy, optional)

    def _start_profiler(self) -> None:
        spy = BIN / "py-spy"
        if not spy.exists():
            spy_path = shutil.which("py-spy")
            if spy_path is None:
                print("  note: --profile: py-spy is not installed (pip install py-spy); not profiling", flush=True)
                return
            spy = Path(spy_path)
        self._profiler = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(self.profile_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def _stop_profiler(self) -> None:
        if self._profiler is None:
            return
        self._profiler.send_signal(signal.SIGINT)
        try:
            self._profiler.wait(30)
        except subprocess.TimeoutExpired:
            self._profiler.kill()
            self._profiler.wait()
        self._profiler = None

    def profile_summary(self, top: int = 25) -> dict[str, Any]:
        """Top functions by inclusive and self samples from py-spy's collapsed stacks."""
        if not self.profile_path.exists():
            return {}
        inclusive: dict[str, int] = {}
        own: dict[str, int] = {}
        total = 0
        for line in self.profile_path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            n = int(count_text)
            total += n
            frames = stack.split(";")
            for frame in set(frames[1:]):  # frame 0 is the thread name
                inclusive[frame] = inclusive.get(frame, 0) + n
            if len(frames) > 1:
                own[frames[-1]] = own.get(frames[-1], 0) + n

        def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
            return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

        return {
            "samples": total,
            "file": str(self.profile_path),
            "inclusive_pct": ranked(inclusive),
            "self_pct": ranked(own),
        }

    # facts about the running server

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def helper_pid(self) -> int | None:
        kids = children(self.pid)
        return kids[0] if kids else None

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def hwm_mb(self) -> float:
        return hwm_mb(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def helper_cpu_seconds(self) -> float:
        h = self.helper_pid
        return cpu_seconds(h) if h else 0.0

    def instance_dirs(self) -> list[Path]:
        """The server's per-hierarchy parent groups: <own group>/jobsvc/<instance>."""
        from jobsvc.cgroups.v1 import REQUIRED, find_hierarchies

        instance = (self.state_dir / "instance").read_text().strip()
        own = find_hierarchies(Path(f"/proc/{self.pid}"))
        return list(dict.fromkeys(own[c] / "jobsvc" / instance for c in REQUIRED if c in own))

    def job_output_files(self, job_id: str) -> list[Path]:
        return sorted((self.state_dir / "jobs" / job_id / "output").glob("*.seg"))

    def drop_output(self, job_id: str) -> None:
        """Delete an ended job's output segments (keeps the scratch disk small; the server holds no fd on them)."""
        for p in self.job_output_files(job_id):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "helper_pid": self.helper_pid,
            "port": self.port,
            "quota_flags": self.quota_flags,
            "extra_args": self.extra_args,
            "log_level": self.opts.log_level,
        }

    # clients

    def credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            (self.pki / "ca.pem").read_bytes(),
            (self.pki / "alice-key.pem").read_bytes(),
            (self.pki / "alice.pem").read_bytes(),
        )

    def aio_channel(self, own_connection: bool = False, creds: Any = None) -> Any:
        """A grpc.aio mTLS channel; own_connection=True gives it its own TCP connection (a separate client)."""
        return aio_channel(self.target, creds or self.credentials(), own_connection)

    def jobctl(self, *args: str) -> list[str]:
        return [
            str(BIN / "jobctl"),
            "--target",
            self.target,
            "--ca-cert",
            str(self.pki / "ca.pem"),
            "--client-cert",
            str(self.pki / "alice.pem"),
            "--client-key",
            str(self.pki / "alice-key.pem"),
            *args,
        ]

    async def wait_ready(self, timeout: float = 30) -> None:
        channel = self.aio_channel()
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        finally:
            await channel.close()


def aio_channel(target: str, creds: Any, own_connection: bool = False) -> Any:
    from grpc import aio

    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 16 * MiB)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return aio.secure_channel(target, creds, options=options)


def stub(channel: Any) -> Any:
    from jobsvc._pb import jobs_pb2_grpc

    return jobs_pb2_grpc.JobServiceStub(channel)


def pb() -> Any:
    from jobsvc._pb import jobs_pb2

    return jobs_pb2


def argv(*args: str) -> list[bytes]:
    return [a.encode() for a in args]


async def start_job(s: Any, *args: str) -> Any:
    return await s.Start(pb().StartRequest(argv=argv(*args)))


async def wait_job(s: Any, job_id: str) -> Any:
    return await s.Wait(pb().GetRequest(id=job_id))


def run_server_bench(
    name: str, opts: Options, body: Any, extra_args: Sequence[str] = (), raise_quotas: Sequence[str] = ()
) -> Result:
    """Start a fresh server, run `await body(server, result)`, stop the server and check it left no groups."""
    result = Result(name)
    server = Server(opts.scratch / name, opts, extra_args, raise_quotas)
    t0 = time.monotonic()
    load = HostLoad()
    server.start()
    result.server = server.info()
    if server.quota_flags:
        result.note(f"server started with quotas raised (they would refuse this load): {server.quota_flags}")
    dirs: list[Path] = []
    try:
        dirs = server.instance_dirs()
        asyncio.run(_with_ready(server, body, result))
    finally:
        code = server.stop()
        result.server["exit_code"] = code
        left = [str(d) for d in dirs if d.exists()]
        result.server["instance_groups_left_after_shutdown"] = left
        if opts.profile:
            result.data["profile"] = server.profile_summary()
        server.cleanup()
    result.seconds = round(time.monotonic() - t0, 1)
    result.data["host_load"] = load.report()
    if (result.data["host_load"]["other_cpu_share_of_machine"] or 0) > 0.1:
        result.note(f"the machine was busy with other work: {result.data['host_load']}")
    if (result.data["host_load"]["steal_share_of_machine"] or 0) > 0.05:
        result.note(f"the hypervisor took CPU from this machine (steal): {result.data['host_load']}")
    if max(n or 0 for n in result.data["host_load"]["inodes_cached"]) > INODES_NOTED:
        result.note(f"the kernel's inode cache was large (inodes_cached): {result.data['host_load']}")
    return result


async def _with_ready(server: Server, body: Any, result: Result) -> None:
    await server.wait_ready()
    await body(server, result)
