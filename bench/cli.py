"""jobctl as a fresh process, through its warm command server (the default) and in-process (JOBCTL_NO_AGENT=1).

Targets (issue 19.2), against a bare `python -c pass` on the same interpreter in the same run, interleaved so that
noise hits both alike: `jobctl get` p50 <= 2.5x, `jobctl start /bin/true` p50 <= 3x; 10 `jobctl stream` processes
started together all have their first byte within 0.5 s (baseline: 10 `python -c "print()"` started together).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RUNNING_QUOTAS, Options, Result, Server, dist_ms, run_server_bench

GET_RATIO = 2.5
START_RATIO = 3.0
STREAM_FIRST_BYTE_MS = 500.0
STREAMS = 10


def _once(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def _all_first_bytes(cmd: list[str], env: dict[str, str], n: int) -> float:
    """Seconds from starting n copies of cmd together until each has written its first byte."""
    sel = selectors.DefaultSelector()
    procs = []
    t0 = time.perf_counter()
    for _ in range(n):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, p)
        procs.append(p)
    waiting, last = n, t0
    deadline = t0 + 60
    while waiting and time.perf_counter() < deadline:
        for key, _ in sel.select(1.0):
            if os.read(key.fd, 1):
                last = time.perf_counter()
            sel.unregister(key.fileobj)
            waiting -= 1
    for p in procs:  # stop watching (Ctrl-C; the job runs on), by PID
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        assert p.stdout is not None
        p.stdout.close()
    if waiting:
        raise RuntimeError(f"{waiting} of {n} processes wrote nothing within 60 s")
    return last - t0


def start_agent(runtime: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    from jobctl import front

    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "jobctl.agent"],
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sock = front.paths(str(runtime / "jobctl"))[0]
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the jobctl agent did not start")
        time.sleep(0.05)
    return proc


def run(opts: Options) -> Result:
    n = 10 if opts.quick else 30
    rounds = 3 if opts.quick else 7

    async def body(server: Server, result: Result) -> None:
        runtime = opts.scratch / "cli-run"
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
        env.pop("JOBCTL_NO_AGENT", None)
        in_process = {**env, "JOBCTL_NO_AGENT": "1"}
        agent = start_agent(runtime, env)
        result.params = {"runs": n, "stream_rounds": rounds, "streams": STREAMS, "agent_pid": agent.pid}
        try:
            job_id = subprocess.run(
                server.jobctl("start", "--", "true"), env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
            bare = [sys.executable, "-c", "pass"]
            get = server.jobctl("get", job_id)
            start = server.jobctl("start", "--", "/bin/true")
            cmds = {"bare": (bare, env), "get": (get, env), "start": (start, env)}
            cmds |= {"get_in_process": (get, in_process), "start_in_process": (start, in_process)}
            for cmd, e in cmds.values():  # warm-up: page cache, the agent's spare channel
                _once(cmd, e)
                _once(cmd, e)
            times: dict[str, list[float]] = {k: [] for k in cmds}
            for _ in range(n):
                for k, (cmd, e) in cmds.items():
                    times[k].append(_once(cmd, e))
            streamer = subprocess.run(
                server.jobctl("start", "--", "sh", "-c", "echo ready; exec sleep 3600"),
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            stream = server.jobctl("stream", streamer)
            printer = [sys.executable, "-c", "print('ready')"]
            first: dict[str, list[float]] = {"bare": [], "agent": [], "in_process": []}
            for _ in range(rounds):
                first["bare"].append(_all_first_bytes(printer, env, STREAMS))
                first["agent"].append(_all_first_bytes(stream, env, STREAMS))
                first["in_process"].append(_all_first_bytes(stream, in_process, STREAMS))
            subprocess.run(server.jobctl("stop", streamer, "--grace", "0"), env=env, capture_output=True, check=True)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        d: dict[str, Any] = {k: dist_ms(v) for k, v in times.items()}
        d["first_byte_all_ms"] = {k: dist_ms(v) for k, v in first.items()}
        result.data = d
        base = d["bare"]["p50"]
        rows = (
            ("jobctl get, fresh process, through the agent, p50", "get", GET_RATIO),
            ("jobctl start /bin/true, fresh process, through the agent, p50", "start", START_RATIO),
            ("jobctl get, fresh process, JOBCTL_NO_AGENT=1, p50", "get_in_process", None),
            ("jobctl start /bin/true, fresh process, JOBCTL_NO_AGENT=1, p50", "start_in_process", None),
        )
        for metric, k, target in rows:
            ratio = round(d[k]["p50"] / base, 3)
            result.check(
                metric,
                d[k]["p50"],
                "ms",
                baseline=base,
                baseline_name="python -c pass",
                ratio=ratio,
                target=f"ratio <= {target:g}" if target else "",
                ok=ratio <= target if target else None,
            )
        fb = d["first_byte_all_ms"]
        together = f"{STREAMS} jobctl stream started together: all have a first byte"
        for metric, k, target_ms in (
            (f"{together} (through the agent)", "agent", STREAM_FIRST_BYTE_MS),
            (f"{together} (JOBCTL_NO_AGENT=1)", "in_process", None),
        ):
            result.check(
                metric,
                fb[k]["p50"],
                "ms",
                baseline=fb["bare"]["p50"],
                baseline_name=f"{STREAMS} python -c print() started together",
                target=f"<= {target_ms:g} ms" if target_ms else "",
                ok=fb[k]["p50"] <= target_ms if target_ms else None,
            )
        print(
            f"  python -c pass p50 {base} ms; jobctl get {d['get']['p50']} ms (in-process "
            f"{d['get_in_process']['p50']} ms); start {d['start']['p50']} ms (in-process "
            f"{d['start_in_process']['p50']} ms); {STREAMS} streams' first bytes {fb['agent']['p50']} ms (in-process "
            f"{fb['in_process']['p50']} ms, bare {fb['bare']['p50']} ms)",
            flush=True,
        )

    return run_server_bench("cli", opts, body, raise_quotas=RUNNING_QUOTAS)
