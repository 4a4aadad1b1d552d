"""`make vm-test`: run jobsvc's system tests in a clean Debian VM, then tear it down.

The guest boots with cgroup v1 (default) or, with JOBSVC_VM_CGROUP=v2 (`make vm-test CGROUP=v2`),
the same box with the unified hierarchy.

Steps: host packages -> box (built once, cached) -> libvirt (inside a network namespace when the
host runs none) -> box added to Vagrant -> wheelhouse -> vagrant up (+ provisioning) -> guest
checks with testinfra -> system tests in the guest -> junit copied back -> destroy.
Exit status: the guest test verdict (0 green, 1 failed tests or checks); 2 a harness step failed;
130 interrupted.

Subcommands:
  test     the whole run (default). VM_KEEP=1 keeps the VM (and libvirt) for the next run.
  up       bring the VM up, provisioned and checked, and keep it (like VM_KEEP=1, no system tests)
  ssh [COMMAND ...]
           a shell in the kept VM (or: ssh -F <cache>/run/ssh_config default); with a COMMAND,
           run it there (joined and run by the guest's shell, as ssh does) and exit with its status
  down     destroy the kept VM and stop what the harness started
  box      build (if needed) and add the box only
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import FrameType

from util import StepError, Timings, cache_dir, relayed_output, run, say

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GUEST_JUNIT = "/tmp/jobsvc-system-junit.xml"
GUEST_VENV = "/opt/jobsvc/venv"
# The Vagrantfile's domain name (default_prefix + machine), then the name vagrant-libvirt gave it before that prefix.
STALE_DOMAIN_NAMES = ("jobsvc-default", "vm_default")


def _out_dir() -> Path:
    out = Path(os.environ.get("JOBSVC_VM_OUT", HERE / ".out"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _logs() -> Path:
    d = cache_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _custom_box() -> str:
    return os.environ.get("JOBSVC_BOX", "")


CGROUPS = ("v1", "v2")


def requested_cgroup() -> str:
    """The hierarchy the guest must boot with: JOBSVC_VM_CGROUP (v1 | v2), default v1."""
    value = os.environ.get("JOBSVC_VM_CGROUP", "") or "v1"
    if value not in CGROUPS:
        raise StepError("cgroup", f"JOBSVC_VM_CGROUP={value!r}", "use v1 or v2 (make vm-test CGROUP=v2)")
    return value


def _kept_cgroup_file() -> Path:
    """The hierarchy of the VM the harness brought up (the Vagrantfile reads it too)."""
    return cache_dir() / "run" / "cgroup"


class Harness:
    def __init__(self) -> None:
        import box
        import host

        self.box_mod = box
        self.host_mod = host
        self.timings = Timings()
        self.log = _logs() / "harness.log"
        self.log.write_text("")
        self.libvirt: host.Libvirt | None = None
        self.vagrant = None  # vagrant.Vagrant, once libvirt is up
        self.ssh_config = cache_dir() / "run" / "ssh_config"
        try:
            self.cgroup = requested_cgroup()
        except StepError:  # main() refuses it for test and up; down and box do not care
            self.cgroup = "v1"

    # -- steps ----------------------------------------------------------------------------------
    def host_packages(self) -> None:
        with self.timings.step("host packages"):
            self.host_mod.ensure_packages(self.log)

    def box(self) -> None:
        if _custom_box():
            say(f"JOBSVC_BOX={_custom_box()}: using it instead of the local box")
            return
        with self.timings.step("box (build or cache)"):
            path = self.box_mod.ensure_box(timings=self.timings)
        with self.timings.step("box add"):
            self._box_add(path)

    def _box_add(self, path: Path) -> None:
        name = self.box_mod.BOX_NAME
        marker = path.parent / "added-to-vagrant"
        listed = run(["vagrant", "box", "list", "--machine-readable"], capture=True, step="box add").stdout
        present = any(line.split(",")[3:4] == [name] for line in listed.splitlines() if ",box-name," in line)
        if present and marker.exists() and marker.read_text().strip() == path.name:
            say(f"box {name} already added")
            return
        run(
            ["vagrant", "box", "add", "--force", "--name", name, path],
            log=self.log,
            step="box add",
            fix=f"see {self.log}; try `vagrant box remove --force {name}`",
        )
        marker.write_text(path.name + "\n")

    def start_libvirt(self) -> None:
        from vagrant import Vagrant

        with self.timings.step("libvirt"):
            self.libvirt = self.host_mod.Libvirt(self.log)
            st = self.libvirt.up()
            if not _custom_box():
                self._prune_box_volumes()
        env = dict(os.environ)
        env.update(
            VAGRANT_DEFAULT_PROVIDER="libvirt",
            JOBSVC_VM_CACHE=str(cache_dir()),
            JOBSVC_VM_NETNS=st.netns if st.mode == "managed" else "",
            JOBSVC_VM_POOL=st.pool,
            JOBSVC_WHEELHOUSE=str(self.wheelhouse_dir()),
            JOBSVC_VM_DRIVER=self.host_mod.vm_driver(),
            JOBSVC_VM_CGROUP=self.cgroup,
        )
        how = "JOBSVC_VM_DRIVER" if os.environ.get("JOBSVC_VM_DRIVER") else "probe"
        say(f"domain type: {env['JOBSVC_VM_DRIVER']} ({how}; kvm = hardware KVM, qemu = TCG)")
        self.vagrant = Vagrant(root=str(HERE), env=env, out_cm=relayed_output, err_cm=relayed_output)

    def _prune_box_volumes(self) -> None:
        """vagrant-libvirt names the uploaded box volume after box.img's mtime: drop older ones."""
        assert self.libvirt is not None
        name = self.box_mod.BOX_NAME
        vagrant_home = Path(os.environ.get("VAGRANT_HOME", Path.home() / ".vagrant.d"))
        img = vagrant_home / "boxes" / name.replace("/", "-VAGRANTSLASH-") / "0" / "libvirt" / "box.img"
        prefix = name.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"
        current = f"{prefix}0_{int(img.stat().st_mtime)}_box.img" if img.exists() else ""
        for vol in self.libvirt.volumes():
            if vol.startswith(prefix) and vol != current:
                say(f"deleting stale box volume {vol}")
                self.host_mod.virsh("vol-delete", vol, "--pool", self.libvirt.state.pool, check=False)

    def wheelhouse_dir(self) -> Path:
        return Path(os.environ.get("JOBSVC_WHEELHOUSE", cache_dir() / "wheelhouse"))

    def wheelhouse(self) -> None:
        import wheelhouse

        with self.timings.step("wheelhouse"):
            wheelhouse.fill(REPO, self.wheelhouse_dir(), self.log)

    def _vagrant_cmd(self, *args: str, step: str, fix: str = "") -> None:
        assert self.vagrant is not None
        try:
            self.vagrant._call_vagrant_command(list(args))
        except subprocess.CalledProcessError as e:
            raise StepError(step, f"`vagrant {' '.join(args)}` exited {e.returncode} (output above)", fix) from None

    def _remove_stale_domains(self) -> None:
        """A domain this checkout's vagrant does not know (a run of another clone killed before its teardown, or a
        name from before the fixed prefix) would make `vagrant up` fail with "name already taken": remove it."""
        assert self.libvirt is not None
        names = [STALE_DOMAIN_NAMES[0]]
        if self.libvirt.state.mode == "managed":  # the harness's own libvirtd: every domain in it is the harness's
            names += STALE_DOMAIN_NAMES[1:]
        for name in names:
            if self.host_mod.virsh("domstate", name, check=False).returncode != 0:
                continue
            say(f"removing domain {name}, left defined by an earlier run this checkout does not know")
            self.host_mod.virsh("destroy", name, check=False)
            self.host_mod.virsh("undefine", name, "--remove-all-storage", "--nvram", check=False)
            if self.host_mod.virsh("domstate", name, check=False).returncode == 0:
                self.host_mod.virsh("undefine", name, "--remove-all-storage", check=False)

    def vm_up(self) -> None:
        assert self.vagrant is not None
        state = self.vagrant.status()[0].state
        fix = (
            f"read vagrant's message above; the domain's console log is in "
            f"/var/log/libvirt/qemu/; VAGRANT_LOG=info gives more; harness log: {self.log}"
        )
        kept = _kept_cgroup_file()
        if state == "running":
            # A kept VM booted before this file existed was a v1 one.
            kept_cgroup = kept.read_text().strip() if kept.exists() else "v1"
            if kept_cgroup != self.cgroup:
                say(f"the kept VM runs cgroup {kept_cgroup}, cgroup {self.cgroup} is asked for: destroying it")
                with self.timings.step("vagrant destroy (kept VM, other hierarchy)"):
                    self._vagrant_cmd("destroy", "--force", step="vagrant destroy", fix=fix)
                state = "not_created"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(self.cgroup + "\n")
        if state == "running":
            with self.timings.step("vagrant rsync + provision (kept VM)"):
                self._vagrant_cmd("rsync", step="vagrant rsync", fix=fix)
                self._vagrant_cmd(
                    "provision", step="vagrant provision", fix="the provisioning output above names the problem"
                )
        else:
            self._remove_stale_domains()
            with self.timings.step(f"vagrant up (cgroup {self.cgroup} boot, rsync, provision)"):
                self._vagrant_cmd("up", "--provider=libvirt", step="vagrant up", fix=fix)
        self.ssh_config.parent.mkdir(parents=True, exist_ok=True)
        self.ssh_config.write_text(self.vagrant.ssh_config())

    def guest_checks(self) -> int:
        with self.timings.step("guest checks (testinfra)") as result:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-c",
                    str(HERE / "tests" / "pytest.ini"),
                    "--rootdir",
                    str(HERE / "tests"),
                    str(HERE / "tests"),
                    "--hosts=paramiko://default",
                    f"--ssh-config={self.ssh_config}",
                    f"--junitxml={_out_dir() / f'junit-guest-checks-{self.cgroup}.xml'}",
                ],
                cwd=HERE,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, JOBSVC_VM_CGROUP=self.cgroup),
            )
            if proc.returncode:
                result["status"] = f"FAILED (pytest exit {proc.returncode})"
        return proc.returncode

    def _ssh(self, command: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "default", command], stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]

    def system_tests(self) -> int:
        timeout = float(os.environ.get("JOBSVC_VM_TEST_TIMEOUT", "5400"))
        # The emulated guest runs the suite ~6x slower than this host (1518 s vs ~240 s), more while other work
        # shares the host's cores: the tests' wait bounds scale by this much there (pytest's per-test timeout by
        # up to 4x).
        scale = float(os.environ.get("JOBSVC_VM_TIME_SCALE", "8"))
        # CI=true: the system tests fail rather than skip when root or a usable cgroup hierarchy is
        # missing, so a green verdict means every one of them ran. No bytecode or cache written into
        # /vagrant. In a scope of its own with the controllers delegated (both guests): on cgroup v2
        # the engines pytest starts in-process must be alone in a group that may give controllers to
        # its children; on v1 it changes nothing. systemd-run --scope execs pytest itself, so the
        # environment set by `sudo env` reaches it.
        command = (
            f"cd /vagrant && rm -f {GUEST_JUNIT} && sudo env CI=true PYTHONDONTWRITEBYTECODE=1 "
            f"JOBSVC_TEST_TIME_SCALE={scale:g} "
            f"PATH={GUEST_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
            f"systemd-run --scope -p Delegate=yes --quiet -- "
            f"{GUEST_VENV}/bin/python -m pytest -p no:cacheprovider -v -rfEs tests/system "
            f"--timeout={300 * min(scale, 4):.0f} --junitxml={GUEST_JUNIT} "
            f"{os.environ.get('JOBSVC_VM_PYTEST_ARGS', '')}"
        )
        with self.timings.step(f"system tests in the guest (cgroup {self.cgroup})") as result:
            try:
                rc = self._ssh(command, timeout=timeout).returncode
                if rc:
                    result["status"] = f"FAILED (pytest exit {rc})"
            except subprocess.TimeoutExpired:
                raise StepError(
                    "system tests in the guest",
                    f"no verdict after {timeout:.0f} s",
                    "raise JOBSVC_VM_TEST_TIMEOUT or look for a hung test (VM_KEEP=1)",
                ) from None
        junit = _out_dir() / f"junit-system-{self.cgroup}.xml"
        got = self._ssh(f"cat {GUEST_JUNIT}", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if got.returncode == 0 and got.stdout:
            junit.write_bytes(got.stdout)
            say(f"junit XML: {junit}")
            rc = self._summarize(junit, rc, self.cgroup)
        else:
            say("no junit XML came back from the guest")
            rc = rc or 1
        return rc

    @staticmethod
    def _summarize(junit: Path, rc: int, cgroup: str) -> int:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        say(
            f"system tests in the guest (cgroup {cgroup}): {passed} passed, {n['failures']} failed, "
            f"{n['errors']} errors, {n['skipped']} skipped (pytest exit {rc})"
        )
        if n["tests"] == 0:
            say("no system test ran: that is not a green verdict")
            return rc or 1
        return rc

    def teardown(self) -> None:
        if self.vagrant is not None:
            with self.timings.step("vagrant destroy"):
                try:
                    self.vagrant.destroy()
                except subprocess.CalledProcessError as e:
                    say(f"vagrant destroy exited {e.returncode}; the libvirt stop below removes the rest")
        if self.libvirt is None:
            self.libvirt = self.host_mod.Libvirt(self.log)
        with self.timings.step("stop libvirt, delete netns"):
            self.libvirt.down()
        self.ssh_config.unlink(missing_ok=True)
        _kept_cgroup_file().unlink(missing_ok=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_test(keep: bool, run_tests: bool = True) -> int:
    h = Harness()
    rc = 2
    try:
        h.host_packages()
        h.box()
        h.start_libvirt()
        h.wheelhouse()
        h.vm_up()
        checks = h.guest_checks()
        if run_tests:
            rc = h.system_tests()
            rc = rc or (1 if checks else 0)
        else:
            rc = 1 if checks else 0
    except StepError as e:
        say(str(e))
        rc = 2
    except KeyboardInterrupt:
        say("interrupted")
        rc = 130
    finally:
        # A second Ctrl-C must not leave a VM, daemons or a namespace behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if keep and rc != 130:
            say("VM kept: `python vm/harness.py ssh` for a shell, `python vm/harness.py down` to remove it")
        else:
            try:
                h.teardown()
            except StepError as e:
                say(f"teardown: {e}")
                rc = rc or 2
        say("timings:\n" + h.timings.table())
        verdict = {0: "GREEN", 1: "RED (tests or checks failed)", 130: "INTERRUPTED"}.get(
            rc, "HARNESS FAILURE" if rc == 2 else f"RED (exit {rc})"
        )
        say(f"verdict: {verdict}")
    return rc


def cmd_down() -> int:
    import host
    from vagrant import Vagrant

    h = Harness()
    st = host.RunState.load()
    env = dict(
        os.environ,
        VAGRANT_DEFAULT_PROVIDER="libvirt",
        JOBSVC_VM_CACHE=str(cache_dir()),
        JOBSVC_VM_NETNS=st.netns,
        JOBSVC_VM_POOL=st.pool,
    )
    if st.mode == "managed" and not host.libvirt_answers():
        say("the harness's libvirt is not running: nothing to destroy in it")
    elif st.mode or host.libvirt_answers():
        h.vagrant = Vagrant(root=str(HERE), env=env, out_cm=relayed_output, err_cm=relayed_output)
    h.teardown()
    return 0


def cmd_ssh(command: list[str]) -> int:
    """A shell in the kept VM, or COMMAND run there; ssh's exit status is the command's (255: ssh failed)."""
    cfg = cache_dir() / "run" / "ssh_config"
    if not cfg.exists():
        say("no kept VM: run `python vm/harness.py up` (or VM_KEEP=1 make vm-test) first")
        return 2
    if command and command[0] == "--":
        command = command[1:]
    os.execvp("ssh", ["ssh", "-F", str(cfg), "default", *(["--", *command] if command else [])])


def cmd_box() -> int:
    h = Harness()
    try:
        h.host_packages()
        h.box()
    except StepError as e:
        say(str(e))
        return 2
    say("timings:\n" + h.timings.table())
    return 0


def _one_run_at_a_time() -> bool:
    """Hold the harness's lock until this process ends: runs share the cache dir's libvirt, network namespace, pool
    and domain name, and a second one would take the first one's VM for a stale one and remove it."""
    path = cache_dir() / "run" / "harness.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.with_suffix(".pid")
        pid = holder.read_text().strip() if holder.exists() else "?"
        say(f"another vm/harness.py run (pid {pid}) holds {path}: wait for it to end, or end it, then run this again")
        return False
    path.with_suffix(".pid").write_text(f"{os.getpid()}\n")
    return True  # fd stays open (and locked) for the rest of this process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", nargs="?", default="test", choices=["test", "up", "ssh", "down", "box"])
    ap.add_argument("args", nargs=argparse.REMAINDER, help="ssh only: the command to run in the VM")
    args = ap.parse_args()
    if args.args and args.command != "ssh":
        ap.error(f"{args.command} takes no arguments")
    if args.command in ("test", "up"):
        try:
            say(f"guest hierarchy: cgroup {requested_cgroup()} (JOBSVC_VM_CGROUP, default v1)")
        except StepError as e:
            say(str(e))
            return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    if args.command in ("test", "up", "down", "box") and not _one_run_at_a_time():
        return 2
    if args.command == "test":
        return cmd_test(keep=os.environ.get("VM_KEEP", "") not in ("", "0"))
    if args.command == "up":
        return cmd_test(keep=True, run_tests=False)
    if args.command == "ssh":
        return cmd_ssh(args.args)
    if args.command == "down":
        return cmd_down()
    return cmd_box()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
