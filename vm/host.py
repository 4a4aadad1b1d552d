"""Host side of the VM harness: packages, a network namespace, libvirt daemons, storage pool, box.

Two libvirt modes:
- external: a libvirt already answers on qemu:///system (a workstation): use it as it is.
- managed: nothing answers (this host has no systemd): create a network namespace, start
  virtlogd and libvirtd inside it (so the vagrant-libvirt bridge 192.168.121.0/24, dnsmasq and
  qemu never appear in the host's namespace), and later stop exactly those processes by PID.
The run state (netns name, pidfiles, what was added) lives in <cache>/run so that a kept VM
(VM_KEEP=1) can be reused or torn down by a later run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from util import StepError, cache_dir, run, say

HOST_PACKAGES = [
    "vagrant",
    "vagrant-libvirt",
    "libvirt-daemon-system",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    "debootstrap",
    "dnsmasq-base",
    "iptables",
    "ebtables",
    "rsync",
    "openssh-client",
    "fdisk",
    "e2fsprogs",
    "netcat-openbsd",
    "iproute2",
]
MGMT_NET = "192.168.121.0/24"  # vagrant-libvirt's management network
LIBVIRT_URI = "qemu:///system"


def ensure_packages(log: Path) -> None:
    """apt-get install whatever of HOST_PACKAGES is missing (root, Debian/Ubuntu hosts)."""
    step = "host packages"
    if shutil.which("dpkg-query") is None:
        missing_cmds = [
            c
            for c in ("vagrant", "virsh", "qemu-system-x86_64", "qemu-img", "nc", "debootstrap", "rsync")
            if shutil.which(c) is None
        ]
        if missing_cmds:
            raise StepError(
                step,
                f"not a Debian host and missing: {' '.join(missing_cmds)}",
                "install vagrant, vagrant-libvirt, libvirt, qemu, debootstrap, rsync, nc",
            )
        return
    missing = []
    for pkg in HOST_PACKAGES:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    if not missing:
        say("host packages: all present")
        return
    fix = "apt-get install -y " + " ".join(missing)
    if os.geteuid() != 0:
        raise StepError(step, f"missing host packages: {' '.join(missing)}", f"as root: {fix}")
    say(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], log=log, step=step, env=env, fix="check the host's apt sources and network")
    run(["apt-get", "install", "-y", "-q", *missing], log=log, step=step, env=env, fix=fix)


def kvm_usable() -> bool:
    """Hardware KVM only: a PVM /dev/kvm (no vmx/svm flags) exists, but a stock kernel hangs under it.

    Mirrors kvm_usable? in the Vagrantfile.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    if "vmx" not in flags and "svm" not in flags:
        return False
    return Path("/sys/module/kvm_intel").is_dir() or Path("/sys/module/kvm_amd").is_dir()


def vm_driver() -> str:
    """libvirt domain type: JOBSVC_VM_DRIVER (kvm|qemu) or the probe."""
    forced = os.environ.get("JOBSVC_VM_DRIVER", "")
    if forced:
        if forced not in ("kvm", "qemu"):
            raise StepError("libvirt", f"JOBSVC_VM_DRIVER={forced!r}", "use kvm or qemu (TCG)")
        return forced
    return "kvm" if kvm_usable() else "qemu"


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(["virsh", "-c", LIBVIRT_URI, *args], capture=True, check=check, step="libvirt", timeout=timeout)


def libvirt_answers() -> bool:
    try:
        return virsh("-q", "version", check=False, timeout=10).returncode == 0
    except StepError:
        return False


@dataclass
class RunState:
    """What this harness created on the host; persisted in <cache>/run/state.json."""

    mode: str = ""  # "managed" or "external"
    netns: str = ""
    pidfiles: dict[str, str] = field(default_factory=dict)  # daemon name -> pidfile
    route_added: bool = False
    pool: str = "default"
    pool_created: bool = False

    @staticmethod
    def path() -> Path:
        return cache_dir() / "run" / "state.json"

    @classmethod
    def load(cls) -> RunState:
        try:
            return cls(**json.loads(cls.path().read_text()))
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self) -> None:
        p = self.path()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.__dict__, indent=1) + "\n")
        # The Vagrantfile reads these so that `vagrant ssh` works by hand on a kept VM.
        (p.parent / "netns").write_text(self.netns)
        (p.parent / "pool").write_text(self.pool)

    def clear(self) -> None:
        for name in ("state.json", "netns", "pool"):
            (self.path().parent / name).unlink(missing_ok=True)


def _pid_alive(pidfile: str, name: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # Guard against a recycled PID: it must still be the daemon we started.
    return pid if name.encode() in cmdline else None


def _netns_exists(name: str) -> bool:
    return bool(name) and Path(f"/run/netns/{name}").exists()


def _kill(pid: int, grace: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # Reap it if it is our child (virtlogd/libvirtd daemonize, so normally not).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Libvirt:
    """Brings up (or adopts) the libvirt the harness uses, and tears down what it started."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.run_dir = cache_dir() / "run"
        self.state = RunState.load()

    # -- up -------------------------------------------------------------------------------------
    def up(self) -> RunState:
        step = "libvirt"
        st = self.state
        if st.mode == "managed" and self._daemons_alive():
            say(f"libvirt: reusing the harness's libvirtd in netns {st.netns} (kept from a previous run)")
        elif st.mode == "managed" and (st.netns or st.pidfiles):
            say("libvirt: cleaning up what a previous run left behind")
            self.down()
            st = self.state = RunState()
        if not st.mode:
            if libvirt_answers():
                st.mode = "external"
                say(f"libvirt: using the running libvirt at {LIBVIRT_URI} as it is")
            else:
                if os.geteuid() != 0:
                    raise StepError(
                        step,
                        "no libvirt answers and starting one needs root",
                        "run as root, or start libvirtd (systemctl start libvirtd)",
                    )
                st.mode = "managed"
                st.netns = os.environ.get("JOBSVC_VM_NETNS", "jobsvc-vm")
                self._start_managed()
        self._ensure_pool()
        st.save()
        return st

    def _daemons_alive(self) -> bool:
        pf = self.state.pidfiles
        return _netns_exists(self.state.netns) and bool(pf) and all(_pid_alive(p, name) for name, p in pf.items())

    def _start_managed(self) -> None:
        st = self.state
        step = "libvirt (managed)"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if _netns_exists(st.netns):
            raise StepError(
                step,
                f"network namespace {st.netns} already exists and is not this harness's (no state for it)",
                f"check `ip netns pids {st.netns}`, stop those, then `ip netns del {st.netns}`; "
                "or set JOBSVC_VM_NETNS to another name",
            )
        st.save()  # record the mode before creating anything, so a crash can be cleaned up
        run(
            ["ip", "netns", "add", st.netns],
            log=self.log,
            step=step,
            fix="the host must allow network namespaces (root, CAP_SYS_ADMIN)",
        )
        run(["ip", "-n", st.netns, "link", "set", "lo", "up"], log=self.log, step=step)
        st.save()
        # Safety net: the management range must never be routed from the host's namespace.
        existing = run(["ip", "route", "show", MGMT_NET], capture=True, check=False).stdout.strip()
        if not existing:
            run(["ip", "route", "add", "blackhole", MGMT_NET], log=self.log, step=step)
            st.route_added = True
            st.save()
        # Under TCG, hide /dev/kvm from the daemons (in their own mount namespace): with a /dev/kvm
        # that its probe can open but the qemu user cannot, libvirt 9 re-probes qemu's capabilities
        # on every call ("KVM was enabled when probing ... but it is not available now"), which
        # cost ~110 s per `vagrant up` here. A root-only empty file stands in for /dev/kvm, and
        # a qemu.conf with `namespaces = []` keeps libvirt from moving that mount into a private
        # /dev per domain (it fails on a file mount).
        hide_kvm = vm_driver() == "qemu" and Path("/dev/kvm").exists()
        prelude = ""
        if hide_kvm:
            blocker = self.run_dir / "no-kvm"
            blocker.write_bytes(b"")
            blocker.chmod(0o600)
            prelude = f"mount --bind {blocker} /dev/kvm; "
            qemu_conf = Path("/etc/libvirt/qemu.conf")
            if qemu_conf.exists():
                override = self.run_dir / "qemu.conf"
                override.write_text(
                    qemu_conf.read_text()
                    + "\n# jobsvc VM harness: /dev/kvm is hidden (TCG); no private /dev per domain.\n"
                    + "namespaces = []\n"
                )
                prelude += f"mount --bind {override} {qemu_conf}; "
        for name in ("virtlogd", "libvirtd"):
            binary = shutil.which(name) or f"/usr/sbin/{name}"
            pidfile = str(self.run_dir / f"{name}.pid")
            Path(pidfile).unlink(missing_ok=True)
            st.pidfiles[name] = pidfile
            st.save()
            daemon = [binary, "-d", "-p", pidfile]
            if prelude:
                daemon = [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-ec",
                    prelude + 'exec "$@"',
                    "sh",
                    *daemon,
                ]
            run(
                ["ip", "netns", "exec", st.netns, *daemon],
                log=self.log,
                step=step,
                fix=f"see {self.log}; is libvirt-daemon-system installed?",
            )
            deadline = time.monotonic() + 30
            while not _pid_alive(pidfile, name):
                if time.monotonic() > deadline:
                    raise StepError(
                        step,
                        f"{name} did not start (no live pid in {pidfile})",
                        f"see {self.log} and /var/log/libvirt/",
                    )
                time.sleep(0.2)
        deadline = time.monotonic() + 60
        while not libvirt_answers():
            if time.monotonic() > deadline:
                raise StepError(
                    step,
                    "libvirtd started but does not answer on qemu:///system",
                    "see /var/log/libvirt/ and the libvirtd process",
                )
            time.sleep(0.5)
        say(f"libvirt: started virtlogd and libvirtd in netns {st.netns}")

    def _ensure_pool(self) -> None:
        st = self.state
        if st.mode == "managed":
            st.pool = os.environ.get("JOBSVC_VM_POOL", "jobsvc")
            pool_dir = cache_dir() / "pool"
        else:
            st.pool = os.environ.get("JOBSVC_VM_POOL", "default")
            pool_dir = Path("/var/lib/libvirt/images")
        info = virsh("pool-info", st.pool, check=False)
        if info.returncode == 0 and st.mode == "managed":
            # libvirtd restores a transient pool that was active when it stopped: it may point at
            # another cache dir.
            xml = virsh("pool-dumpxml", st.pool, check=False).stdout
            if f"<path>{pool_dir}</path>" not in xml:
                virsh("pool-destroy", st.pool, check=False)
                virsh("pool-undefine", st.pool, check=False)
                info = virsh("pool-info", st.pool, check=False)
        if info.returncode == 0:
            if "running" not in info.stdout:
                virsh("pool-start", st.pool)
            virsh("pool-refresh", st.pool, check=False)
            return
        pool_dir.mkdir(parents=True, exist_ok=True)
        _check_traversable(pool_dir)
        # Transient: it disappears with the libvirtd that the harness stops; the images stay.
        virsh("pool-create-as", st.pool, "dir", "--target", str(pool_dir))
        st.pool_created = True
        say(f"storage pool {st.pool} at {pool_dir}")

    def volumes(self) -> list[str]:
        """Names of the volumes in the harness's pool (virsh 9 has no vol-list --name)."""
        out = virsh("vol-list", self.state.pool, check=False).stdout.splitlines()
        return [ln.split()[0] for ln in out[2:] if ln.strip()]

    # -- down -----------------------------------------------------------------------------------
    def down(self) -> None:
        """Stop what the harness started (managed mode), by PID; delete the namespace and route."""
        st = self.state
        if st.mode != "managed":
            self.state.clear()
            return
        alive = {n: _pid_alive(p, n) for n, p in st.pidfiles.items()}
        if alive.get("libvirtd"):
            # Networks keep their dnsmasq running after libvirtd exits: stop them first.
            nets = virsh("net-list", "--name", check=False, timeout=30).stdout.split()
            for net in nets:
                virsh("net-destroy", net, check=False, timeout=30)
            if st.pool_created:
                # Transient, but libvirtd would restore it at its next start if left active.
                virsh("pool-destroy", st.pool, check=False, timeout=30)
        for name in ("libvirtd", "virtlogd"):
            pid = alive.get(name)
            if pid:
                say(f"stopping {name} (pid {pid})")
                _kill(pid)
            Path(st.pidfiles.get(name, "/nonexistent")).unlink(missing_ok=True)
        if _netns_exists(st.netns):
            # Anything still in the namespace was started by those daemons (dnsmasq, qemu).
            left = run(["ip", "netns", "pids", st.netns], capture=True, check=False).stdout.split()
            for pid in left:
                say(f"stopping leftover pid {pid} in netns {st.netns}")
                _kill(int(pid), grace=5)
            run(["ip", "netns", "del", st.netns], check=False, log=self.log)
        if st.route_added:
            run(["ip", "route", "del", "blackhole", MGMT_NET], check=False, log=self.log)
        for name in ("no-kvm", "qemu.conf"):
            (self.run_dir / name).unlink(missing_ok=True)
        st.clear()
        self.state = RunState()


def _check_traversable(path: Path) -> None:
    """qemu runs as an unprivileged user: every parent of the pool dir must be searchable."""
    for p in [path, *path.parents]:
        if not (p.stat().st_mode & 0o001):
            raise StepError(
                "storage pool",
                f"{p} is not searchable by others, so qemu cannot reach the images under {path}",
                f"chmod o+x {p}, or set JOBSVC_VM_CACHE to a path under /var/cache",
            )
