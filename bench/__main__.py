"""`python -m bench [NAME...] [--quick]`: run the benchmarks, write bench/results/<name>.json, print the table."""

from __future__ import annotations

import argparse
import importlib
import json
import os
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
    failed: list[str] = []
    t0 = time.monotonic()
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


if __name__ == "__main__":
    sys.exit(main())
