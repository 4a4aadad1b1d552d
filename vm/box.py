"""Build the jobsvc Vagrant box offline-capable, packer-free: debootstrap -> raw disk -> qcow2 -> .box.

The box is Debian bookworm with the packages of box/packages.txt and the files of box/rootfs/. Its
grub.cfg (box/grub.cfg.in) has two entries for one kernel: cgroup v1 (the default) and the unified
hierarchy (cgroup v2), which a VM boots when its SMBIOS system family is V2_FAMILY (the Vagrantfile sets it
for JOBSVC_VM_CGROUP=v2): the hierarchy is picked per VM at its first boot, with no reboot.
It is cached under the cache dir by a hash of that recipe (and BUILD_VERSION below), so it is rebuilt
only when the recipe changes.

Usage (root): python vm/box.py [--force]     prints the path of the .box file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from util import StepError, Timings, cache_dir, run, say, tail

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "box"
SUITE = "bookworm"
DISK_GIB = 10
PART_OFFSET = 1024 * 1024  # one MBR partition starting at sector 2048
# Bump when the build steps below change in a way that changes the box.
BUILD_VERSION = "5"
# The name says the default hierarchy; the same box boots cgroup v2 on request (V2_FAMILY).
BOX_NAME = "jobsvc/debian12-cgv1"
# SMBIOS system family that makes the box's grub boot the cgroup v2 entry; vm/Vagrantfile has the same string.
V2_FAMILY = "jobsvc-cgroup-v2"
# Kernel options that select cgroup v1 under systemd 252: the v2 entry has none of them.
V1_OPTIONS = ("systemd.unified_cgroup_hierarchy=", "systemd.legacy_systemd_cgroup_controller=", "cgroup_no_v1=")
INSECURE_KEY_GLOBS = (
    "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub",
    "/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub",
    "/opt/vagrant/embedded/gems/*/gems/vagrant-*/keys/vagrant.pub",
)
STEP = "box build"


def packages() -> list[str]:
    lines = (RECIPE / "packages.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def recipe_hash() -> str:
    # Everything box.py puts into the box besides box/: its build steps (BUILD_VERSION), the v2 family and
    # the options left out of the v2 entry.
    head = f"build={BUILD_VERSION} suite={SUITE} disk={DISK_GIB} v2family={V2_FAMILY} v1opts={','.join(V1_OPTIONS)}\n"
    h = hashlib.sha256(head.encode())
    for p in sorted(RECIPE.rglob("*")):
        if p.is_file():
            rel = p.relative_to(RECIPE).as_posix()
            mode = "x" if os.access(p, os.X_OK) else "-"
            h.update(f"{rel} {mode}\n".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def box_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "boxes" / f"jobsvc-debian12-cgv1-{recipe_hash()}.box"


def host_mirror() -> str:
    """The Debian mirror the host already uses (JOBSVC_VM_MIRROR overrides)."""
    if env := os.environ.get("JOBSVC_VM_MIRROR"):
        return env.rstrip("/")
    candidates: list[str] = []
    for src in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = src.read_text()
        except OSError:
            continue
        if src.suffix == ".sources":
            for stanza in text.split("\n\n"):
                uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and SUITE in suites.group(1).split():
                    candidates.append(uris.group(1))
        else:
            for m in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):
                candidates.append(m.group(1))
    for c in candidates:
        if "security" not in c:
            return c.rstrip("/")
    return "http://deb.debian.org/debian"


def insecure_key() -> str:
    import glob

    for pattern in INSECURE_KEY_GLOBS:
        for path in sorted(glob.glob(pattern)):
            return Path(path).read_text().strip()
    raise StepError(
        STEP,
        "Vagrant's insecure public key (keys/vagrant.pub in the vagrant gem) was not found",
        "install vagrant (apt-get install vagrant) before building the box",
    )


def ensure_box(force: bool = False, timings: Timings | None = None) -> Path:
    """Return the cached .box for the current recipe, building it when missing."""
    path = box_path()
    if path.exists() and not force:
        say(f"box cached: {path}")
        return path
    if os.geteuid() != 0:
        raise StepError(
            STEP,
            "building the box needs root (debootstrap, loop devices, mounts)",
            "run as root, e.g. sudo make vm-box",
        )
    for tool in ("debootstrap", "losetup", "sfdisk", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            raise StepError(STEP, f"{tool} not found", "apt-get install debootstrap fdisk e2fsprogs qemu-utils")
    path.parent.mkdir(parents=True, exist_ok=True)
    _Builder(path, timings or Timings()).build()
    for old in path.parent.glob("jobsvc-debian12-cgv1-*.box"):
        if old != path:
            say(f"removing the outdated box {old.name}")
            old.unlink()
    return path


class _Builder:
    def __init__(self, out: Path, timings: Timings) -> None:
        self.out = out
        self.timings = timings
        logs = cache_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"box-{recipe_hash()}.log"
        self.log.write_text("")
        self.work = Path(tempfile.mkdtemp(prefix="box-build-", dir=out.parent))
        self.mnt = self.work / "mnt"
        self.raw = self.work / "disk.raw"
        self.loops: list[str] = []
        self.mounts: list[Path] = []
        self.uuid = str(uuid.uuid4())

    def sh(self, *cmd: str | os.PathLike[str], **kw: object) -> None:
        run(cmd, log=self.log, step=STEP, fix=f"see the log {self.log}", **kw)  # type: ignore[arg-type]

    def chroot(self, script: str) -> None:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8",
            "HOME": "/root",
        }
        run(
            ["chroot", self.mnt, "/bin/sh", "-ec", script],
            log=self.log,
            step=STEP,
            fix=f"see the log {self.log}",
            env=env,
        )

    def build(self) -> None:
        say(f"building box {self.out.name} (log: {self.log})")
        try:
            with self.timings.step("box: disk + debootstrap"):
                self.make_disk()
                self.debootstrap()
            with self.timings.step("box: packages in chroot"):
                self.install_packages()
                self.prune_modules()
            with self.timings.step("box: configure + bootloader"):
                self.configure()
                self.bootloader()
                self.clean_rootfs()
            self.unmount_all()
            with self.timings.step("box: fsck + qcow2 + pack"):
                self.verify_fs()
                self.pack()
        finally:
            self.unmount_all()
            shutil.rmtree(self.work, ignore_errors=True)

    # -- disk ---------------------------------------------------------------------------------
    def make_disk(self) -> None:
        with self.raw.open("wb") as f:
            f.truncate(DISK_GIB * 1024**3)
        self.sh("sfdisk", "--quiet", self.raw, input="label: dos\nstart=2048, type=83, bootable\n")
        # The host kernel does not scan partitions of loop devices: one loop for the whole disk
        # (grub-install writes its MBR), one at the partition's offset for the filesystem.
        self.loops.append(self.losetup("--show", "-f", self.raw))
        size = DISK_GIB * 1024**3 - PART_OFFSET
        self.loops.append(self.losetup("--show", "-f", "-o", str(PART_OFFSET), "--sizelimit", str(size), self.raw))
        self.sh("mkfs.ext4", "-q", "-F", "-L", "jobsvc-root", "-U", self.uuid, self.part_loop)
        self.mnt.mkdir()
        self.sh("mount", self.part_loop, self.mnt)
        self.mounts.append(self.mnt)

    def losetup(self, *args: str | os.PathLike[str]) -> str:
        proc = run(
            ["losetup", *args], capture=True, step=STEP, fix="free loop devices: losetup -a; losetup -d /dev/loopN"
        )
        return proc.stdout.strip()

    @property
    def disk_loop(self) -> str:
        return self.loops[0]

    @property
    def part_loop(self) -> str:
        return self.loops[1]

    # -- rootfs -------------------------------------------------------------------------------
    def debootstrap(self) -> None:
        mirror = host_mirror()
        say(f"debootstrap {SUITE} from {mirror}")
        self.sh("debootstrap", "--variant=minbase", "--include=ca-certificates", SUITE, self.mnt, mirror)
        sources = [f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main"]
        if mirror.endswith("/debian"):
            sources.append(f"deb {mirror}-security {SUITE}-security main")
        (self.mnt / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")

    def bind_mounts(self) -> None:
        for src, kind in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "bind"), ("/dev/pts", "bind")):
            target = self.mnt / src.lstrip("/")
            target.mkdir(exist_ok=True)
            if kind == "bind":
                self.sh("mount", "--bind", src, target)
            else:
                self.sh("mount", "-t", kind, kind, target)
            self.mounts.append(target)

    def install_packages(self) -> None:
        self.bind_mounts()
        shutil.copy("/etc/resolv.conf", self.mnt / "etc/resolv.conf")
        # Nothing installed in the chroot may start a daemon on the host.
        policy = self.mnt / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        pkgs = " ".join(packages())
        self.chroot(
            "echo 'grub-pc grub-pc/install_devices multiselect' | debconf-set-selections\n"
            "echo 'grub-pc grub-pc/install_devices_empty boolean true' | debconf-set-selections\n"
            "apt-get update -qq\n"
            f"apt-get install -y -q --no-install-recommends {pkgs}\n"
        )

    def prune_modules(self) -> None:
        lines = (RECIPE / "prune-modules.txt").read_text().splitlines()
        trees = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
        for moddir in sorted((self.mnt / "usr/lib/modules").iterdir()):
            for tree in trees:
                shutil.rmtree(moddir / "kernel" / tree, ignore_errors=True)
            self.chroot(f"depmod -a {moddir.name}\nupdate-initramfs -u -k {moddir.name}\n")

    def configure(self) -> None:
        root = self.mnt
        # Overlay the recipe's files; git keeps only the executable bit, so fix modes here.
        shutil.copytree(RECIPE / "rootfs", root, dirs_exist_ok=True, symlinks=True)
        (root / "etc/sudoers.d/vagrant").chmod(0o440)
        (root / "etc/fstab").write_text(f"UUID={self.uuid} / ext4 errors=remount-ro 0 1\n")
        key = insecure_key()
        self.chroot(
            "useradd -m -s /bin/bash -U vagrant\n"
            "echo vagrant:vagrant | chpasswd\n"
            "install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh\n"
            f"echo '{key}' > /home/vagrant/.ssh/authorized_keys\n"
            "chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys\n"
            "chmod 600 /home/vagrant/.ssh/authorized_keys\n"
            "systemctl enable systemd-networkd.service jobsvc-firstboot.service\n"
            # DHCP comes up quickly; never hold boot for 2 minutes waiting for "online".
            "systemctl mask systemd-networkd-wait-online.service\n"
            "visudo -cf /etc/sudoers.d/vagrant\n"
        )

    def bootloader(self) -> None:
        root = self.mnt
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise StepError(STEP, "no kernel in /boot after installing linux-image-amd64", f"see the log {self.log}")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        cmdline = ""
        for line in (root / "etc/default/grub").read_text().splitlines():
            if line.startswith("GRUB_CMDLINE_LINUX="):
                cmdline = line.split("=", 1)[1].strip('"')
        self.chroot(f"grub-install --target=i386-pc --modules='part_msdos ext2 biosdisk' {self.disk_loop}\n")
        if "systemd.unified_cgroup_hierarchy=0" not in cmdline.split():
            raise StepError(STEP, "box/rootfs/etc/default/grub does not select cgroup v1", "keep v1 the default")
        v2_cmdline = " ".join(o for o in cmdline.split() if not o.startswith(V1_OPTIONS))
        # update-grub writes no entries on a loop device: a minimal grub.cfg instead (two entries, see
        # box/grub.cfg.in). It is not regenerated on first boot (that cost ~20 s of TCG CPU in every
        # fresh VM); a kernel upgrade in the guest runs update-grub, which then uses /etc/default/grub.
        cfg = (RECIPE / "grub.cfg.in").read_text()
        for key, value in (
            ("UUID", self.uuid),
            ("VERSION", version),
            ("CMDLINE_V1", cmdline),
            ("CMDLINE_V2", v2_cmdline),
            ("V2_FAMILY", V2_FAMILY),
        ):
            cfg = cfg.replace(f"@{key}@", value)
        if left := sorted(set(re.findall(r"@[A-Z0-9_]+@", cfg))):
            raise StepError(STEP, f"box/grub.cfg.in: placeholders left {left}", "fill them in in box.py")
        (root / "boot/grub/grub.cfg").write_text(cfg)

    def clean_rootfs(self) -> None:
        root = self.mnt
        (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        self.chroot("apt-get clean\nrm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*\n")
        # Every VM made from the box gets its own identity on first boot.
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (root / "etc/machine-id").write_text("")
        dbus_id = root / "var/lib/dbus/machine-id"
        if dbus_id.exists() or dbus_id.is_symlink():
            dbus_id.unlink()
        (root / "etc/resolv.conf").write_text("")
        # Deleted files (debootstrap's and apt's .debs) still hold data blocks: discard them so
        # the compressed image carries only live data.
        self.sh("fstrim", root)

    def unmount_all(self) -> None:
        while self.mounts:
            target = self.mounts.pop()
            run(["umount", target], check=False, log=self.log)
            if os.path.ismount(target):
                run(["umount", "-l", target], check=False, log=self.log)
        while self.loops:
            loop = self.loops.pop()
            run(["blockdev", "--flushbufs", loop], check=False, log=self.log)
            run(["losetup", "-d", loop], check=False, log=self.log)

    def verify_fs(self) -> None:
        """The root filesystem in the raw disk must be clean and consistent before it is packed.

        Once here a box came out with its last writes missing (the superblock still "needs_recovery",
        bitmaps not matching): every VM from it then booted into a read-only root without sshd, which
        showed only as vagrant's 15-minute boot timeout. A read-only e2fsck (~2 s) catches that here.
        """
        os.sync()
        loop = self.losetup("--show", "-f", "-r", "-o", str(PART_OFFSET), self.raw)
        self.loops.append(loop)
        try:
            check = run(["e2fsck", "-f", "-n", loop], log=self.log, check=False)
        finally:
            self.loops.remove(loop)
            run(["losetup", "-d", loop], check=False, log=self.log)
        if check.returncode != 0:
            raise StepError(
                STEP,
                f"the box's root filesystem is not clean after unmounting (e2fsck -fn exit {check.returncode}): "
                f"a write to the raw disk was lost\n{tail(self.log, 15)}",
                "build it again (make vm-box); if it recurs, check `losetup -a` for loop devices used by others",
            )

    # -- pack ---------------------------------------------------------------------------------
    def pack(self) -> None:
        img = self.work / "box.img"
        self.sh("qemu-img", "convert", "-c", "-O", "qcow2", self.raw, img)
        self.raw.unlink()
        (self.work / "metadata.json").write_text(
            json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}) + "\n"
        )
        (self.work / "Vagrantfile").write_text(
            f"# Box of jobsvc (vm/box.py): Debian bookworm, cgroup v1 (v2 with the SMBIOS system family {V2_FAMILY}).\n"
            'Vagrant.configure("2") do |config|\nend\n'
        )
        tmp = self.out.with_suffix(".box.part")
        self.sh("tar", "-C", self.work, "-cf", tmp, "metadata.json", "Vagrantfile", "box.img")
        tmp.rename(self.out)
        say(f"box written: {self.out} ({self.out.stat().st_size / 2**20:.0f} MiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--print-path", action="store_true", help="only print the cached box path")
    args = ap.parse_args()
    if args.print_path:
        print(box_path())
        return 0
    timings = Timings()
    try:
        path = ensure_box(force=args.force, timings=timings)
    except StepError as e:
        say(str(e))
        return 2
    print(path)
    if timings.rows:
        say("timings:\n" + timings.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
