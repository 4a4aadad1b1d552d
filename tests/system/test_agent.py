"""jobctl's command server (cli/agent.py) against a real server: concurrent commands each with their own
environment and output, certificate files read anew when they change, and the front end's fallbacks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.system.conftest import Agent, agent_pids, agent_socket, wait_for_agent
from tests.system.server import BIN, Server

JOBCTL = str(BIN / "jobctl")


def test_concurrent_commands_each_have_their_own_environment_and_stdout(server: Server, jobctl_agent: Agent) -> None:
    alice = json.loads(
        subprocess.run(
            [JOBCTL, "start", "--json", "--", "true"],
            env=server.env("alice"),
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    bob = json.loads(
        subprocess.run(
            [JOBCTL, "start", "--json", "--", "true"],
            env=server.env("bob"),
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    procs = [
        (user, subprocess.Popen([JOBCTL, "list", "--json"], env=server.env(user), stdout=subprocess.PIPE))
        for user in ["alice", "bob"] * 5
    ]
    for user, proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        owners = {r["owner"] for r in json.loads(out)}
        assert owners == {f"CN={user}"}, (user, owners)
    assert alice["owner"] == "CN=alice" and bob["owner"] == "CN=bob"
    assert jobctl_agent.proc.poll() is None


def test_a_changed_certificate_file_is_read_anew(server: Server, jobctl_agent: Agent, tmp_path: Path) -> None:
    cert, key = tmp_path / "me.pem", tmp_path / "me-key.pem"
    shutil.copy(server.pki.cert("alice"), cert)
    shutil.copy(server.pki.key("alice"), key)
    env = {**server.env(), "JOBCTL_CLIENT_CERT": str(cert), "JOBCTL_CLIENT_KEY": str(key)}

    def whoami() -> str:
        proc = subprocess.run([JOBCTL, "start", "--json", "--", "true"], env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return str(json.loads(proc.stdout)["owner"])

    assert whoami() == "CN=alice"
    assert whoami() == "CN=alice"  # the spare's warm channel, made for these files
    shutil.copy(server.pki.cert("bob"), cert)
    shutil.copy(server.pki.key("bob"), key)
    assert whoami() == "CN=bob"


def test_a_directory_others_may_enter_is_not_used(server: Server, jobctl_runtime_dir: Path) -> None:
    shared = jobctl_runtime_dir / "jobctl"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    for _ in range(2):
        proc = subprocess.run([JOBCTL, "list"], env=server.env(), capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert not agent_pids(jobctl_runtime_dir) and not list(shared.iterdir())


def test_a_stale_socket_is_replaced_and_the_command_runs(server: Server, jobctl_runtime_dir: Path) -> None:
    import socket

    path = agent_socket(jobctl_runtime_dir)
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening, then closed: what a killed agent leaves
    proc = subprocess.run([JOBCTL, "list", "--json"], env=server.env(), capture_output=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) is not None
    wait_for_agent(jobctl_runtime_dir)  # the front end started one, which replaced the stale socket
    assert agent_pids(jobctl_runtime_dir)
    again = subprocess.run([JOBCTL, "list", "--json"], env=server.env(), capture_output=True, timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout) is not None


def test_an_idle_agent_leaves(jobctl_runtime_dir: Path) -> None:
    from tests.system.conftest import start_agent

    agent = start_agent(jobctl_runtime_dir, env={"JOBCTL_AGENT_IDLE": "1"})
    assert agent.proc.wait(60) == 0  # by itself
    assert agent.stop() == 0
    assert not os.path.exists(agent_socket(jobctl_runtime_dir))


def _own_jobs(server: Server) -> list[str]:
    proc = subprocess.run([JOBCTL, "list", "--json"], env=server.env(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [r["id"] for r in json.loads(proc.stdout)]


def test_a_stopped_agent_holds_up_no_command_nor_runs_it_later(server: Server, jobctl_agent: Agent) -> None:
    before = _own_jobs(server)  # through the agent: it is warm
    os.kill(jobctl_agent.proc.pid, signal.SIGSTOP)
    try:
        proc = subprocess.run(
            [JOBCTL, "start", "--json", "--", "true"], env=server.env(), capture_output=True, timeout=60
        )
    finally:
        os.kill(jobctl_agent.proc.pid, signal.SIGCONT)
    assert proc.returncode == 0, proc.stderr  # run in-process once the agent had not answered
    started = json.loads(proc.stdout)["id"]
    after = _own_jobs(server)  # through the agent again, which has now read the request the front end gave up on
    assert [j for j in after if j not in before] == [started]
    assert jobctl_agent.stop() == 2  # the two lists; the start it never ran


def test_a_socket_that_never_answers_holds_up_no_command(server: Server, jobctl_runtime_dir: Path) -> None:
    import socket

    path = agent_socket(jobctl_runtime_dir)
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wedged:
        wedged.bind(str(path))
        wedged.listen(8)  # connections queue; nothing reads them
        proc = subprocess.run([JOBCTL, "list", "--json"], env=server.env(), capture_output=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) is not None, proc.stderr
