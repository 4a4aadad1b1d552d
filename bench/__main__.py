"""`python -m bench [NAME...] [--quick]`: run the benchmarks, write bench/results/<name>.json, print the table."""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.common import DEFAULT_SCRATCH, RESULTS, Options, Result, write_result
from bench.report import plot_all, table

BENCHMARKS = ("capture", "fanout", "latency", "footprint", "churn", "history", "cli", "noisy")


def parse(argv: list[str]) -> tuple[list[str], Options]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes and counts (a smoke run, under a minute)")
    p.add_argument(
        "--scratch",
        type=Path,
        default=DEFAULT_SCRATCH,
        help=f"work dir for state dirs and baselines (default {DEFAULT_SCRATCH}; $BENCH_SCRATCH)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, table and plots go")
    p.add_argument("--keep", action="store_true", help="keep the scratch state dirs and server logs")
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the server with py-spy during each benchmark; top frames go into the JSON",
    )
    p.add_argument("--log-level", default="INFO", help="the server's --log-level (default INFO, as users run it)")
    p.add_argument("--table-only", action="store_true", help="print the table of the results already written")
    args = p.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    opts = Options(
        quick=args.quick,
        scratch=args.scratch.resolve(),
        results=args.results.resolve(),
        keep=args.keep,
        profile=args.profile,
        log_level=args.log_level,
    )
    if args.table_only:
        names = []
    return names, opts


def main(argv: list[str] | None = None) -> int:
    names, opts = parse(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench: jobsvc needs root (it makes cgroups); run as root", file=sys.stderr)
        return 2
    opts.scratch.mkdir(parents=True, exist_ok=True)
    # the jobctl agents the benchmarks start live in a runtime dir of this run's own, and end with it
    runtime = opts.scratch / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    t0 = time.monotonic()
    try:
        failed = run_all(names, opts)
    finally:
        end_agents(runtime)
    docs = []
    for name in BENCHMARKS:
        path = opts.results / f"{name}.json"
        if path.exists():
            docs.append(json.loads(path.read_text()))
    text = table(docs)
    print()
    print(text)
    (opts.results / "summary.txt").write_text(text + "\n")
    plot_all(docs, opts.results)
    if names:
        print(f"\nbench: {len(names)} benchmark(s) in {time.monotonic() - t0:.0f} s; results in {opts.results}")
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_all(names: list[str], opts: Options) -> list[str]:
    """Run each benchmark and write its result; the names of those that failed."""
    failed: list[str] = []
    for name in names:
        print(f"== {name}{' (quick)' if opts.quick else ''}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        try:
            result: Result = module.run(opts)
        except Exception:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            result = Result(name)
            result.note("the benchmark failed: " + traceback.format_exc().strip().splitlines()[-1])
        path = write_result(result, opts)
        print(f"   {name}: {result.seconds:.0f} s -> {path}", flush=True)
    return failed


def end_agents(runtime: Path) -> None:
    """SIGTERM the jobctl agents started under runtime (by the pid each wrote; ours, by construction)."""
    for pid_file in (runtime / "jobctl").glob("*.pid"):
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:  # an agent holds its pid file's lock while it lives: a lock we get means it is gone
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue
            except BlockingIOError:
                pass
            pid = int(os.read(fd, 64).split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
