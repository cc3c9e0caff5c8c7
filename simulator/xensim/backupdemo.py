"""``make demo``: the main job of xencbt, on the simulator, start to finish.

Starts xensim, puts a real ext4 file system on the demo VM's first disk, runs a full
backup, changes files through the guest-write path (only the blocks a guest would
write), runs two incrementals showing how few bytes moved, verifies the repository,
restores the latest and the first point of that disk to files, proves them
byte-identical to the disk at those moments, prints a summary, and restores the whole
VM beside the original (``restore-vm``). The product is driven only through its command
line (``xencbt``), as an administrator would, and each command is printed as it runs
(``$ xencbt …``) for a newcomer to copy; the password is never on it: it is read from the
file that ``XENCBT_PASSWORD_FILE`` names (printed once, with ``XENCBT_XAPI``).  Everything
started is stopped, even on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from .demo import XENSIM, DemoError, process, run, step

BLOCK = 64 * 1024
XENCBT = [str(Path(sys.executable).with_name("xencbt"))]  # the installed console script


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DemoGuest:
    """The guest's view of disk 0: a local image, copied to the VDI block by block."""

    def __init__(self, work: Path, state_dir: str, vdi: str, log: Path) -> None:
        self.work, self.state_dir, self.vdi, self.log = work, state_dir, vdi, log
        self.image = work / "guest-fs.img"
        self.written = b""

    def mkfs(self, size: int) -> None:
        content = self.work / "content"
        content.mkdir()
        (content / "hello.txt").write_text("Hello from a guest file system.\n")
        (content / "big.bin").write_bytes(os.urandom(6 << 20))
        (content / "notes.txt").write_text("version 1\n")
        run(
            "mkfs.ext4",
            "-q",
            "-F",
            "-d",
            str(content),
            "-L",
            "demo",
            str(self.image),
            "%dK" % (size // 1024),
        )
        self.sync()

    def edit(self, commands: list[str], files: dict[str, bytes]) -> None:
        """Change files with debugfs (no mount needed), then write the changed blocks."""
        script = self.work / "debugfs.cmd"
        lines = []
        for name, data in files.items():
            local = self.work / ("new-" + name)
            local.write_bytes(data)
            lines += ["rm /%s" % name, "write %s %s" % (local, name)]
        script.write_text("\n".join(commands + lines) + "\n")
        run("debugfs", "-w", "-f", str(script), str(self.image))
        self.sync()

    def sync(self) -> int:
        """Write what differs from the disk (whole 64 KiB blocks), as the guest would."""
        import nbd

        data = self.image.read_bytes()
        old = self.written or bytes(len(data))
        blocks = [
            b for b in range(0, len(data), BLOCK) if data[b : b + BLOCK] != old[b : b + BLOCK]
        ]
        argv = [*XENSIM, "guest-disk", "--state-dir", self.state_dir, self.vdi]
        with process(argv, self.log) as uri:
            h = nbd.NBD()
            h.connect_uri(uri)
            for b in blocks:
                h.pwrite(data[b : b + BLOCK], b)
            h.flush()
            h.shutdown()
        self.written = data
        return len(blocks)


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / "repo"
        self.log = work / "xensim.log"
        self.rows: list[dict] = []
        self.expected: dict[str, str] = {}  # point -> sha256 of disk 0 at that point

    def xencbt(self, *args: str) -> str:
        env = {
            **os.environ,
            "XENCBT_XAPI": self.info["xapi"],
            "XENCBT_PASSWORD_FILE": self.info["password_file"],
        }
        argv = [*XENCBT, "--xapi-cafile", self.info["ca_file"], *args]
        print("    $ %s" % shlex.join(["xencbt", *argv[1:]]), flush=True)
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise DemoError("xencbt %s failed: %s" % (args[0], done.stderr.strip()))
        return done.stdout

    def run(self) -> None:
        state_dir = self.work / "state"
        step("starting the simulated pool: xensim serve --state-dir %s" % state_dir)
        with process([*XENSIM, "serve", "--state-dir", str(state_dir)], self.log) as ready:
            self.info = json.loads(ready)
            from .control import Control

            self.control = Control(self.info)
            step(
                "xencbt finds the pool and the password file in its environment (the "
                "password itself is never on a command line):"
            )
            print(
                "    $ export XENCBT_XAPI=%s XENCBT_PASSWORD_FILE=%s"
                % (shlex.quote(self.info["xapi"]), shlex.quote(self.info["password_file"]))
            )
            self.story()

    def story(self) -> None:
        disk0 = self.first_disk()
        self.size_total = self.vm_size
        self.guest = DemoGuest(self.work, self.info["state_dir"], disk0["uuid"], self.log)
        step("writing a fresh ext4 file system onto demo-vm's disk 0 (as its guest)")
        self.guest.mkfs(disk0["size"])
        self.backup("full backup of demo-vm (both disks)")

        step("the guest edits notes.txt and adds report.txt (debugfs, then block writes)")
        self.guest.edit(["write /dev/null report.txt"], {"notes.txt": b"version 2\n" * 100})
        self.backup("incremental backup #1")

        step("the guest replaces hello.txt")
        self.guest.edit([], {"hello.txt": b"Hello again, changed contents.\n"})
        self.backup("incremental backup #2")

        step("verifying the repository (qemu-img check, chains, checksums)")
        verified = json.loads(self.xencbt("--json", "verify", "--repo", str(self.repo)))
        print("    %d points verified" % verified["points"])
        self.restore_and_compare(disk0["uuid"])
        self.summary()
        self.whole_vm()

    def whole_vm(self) -> None:
        """restore-vm beside the original: same configuration, new MACs, its own disks."""
        step("restoring the whole VM from its newest VM point, beside the original")
        out = self.xencbt(
            "--json",
            "restore-vm",
            "--repo",
            str(self.repo),
            "demo-vm",
            "--to-sr",
            "Local storage",
            "--name",
            "demo-vm (restored)",
        )
        restored = json.loads(out)
        print("    new VM %s (point %s)" % (restored["vm_uuid"], restored["point"]))
        with self.api() as (api, s):
            fmt = "    %-20s %-8s %-6s %-8s %-5s %-32s %s"
            print(
                fmt % ("VM", "power", "VCPUs", "memory", "vTPM", "disks (userdevice: VDI)", "VIFs")
            )
            for name in ("demo-vm", "demo-vm (restored)"):
                print(fmt % vm_row(api, s, name))

    @contextlib.contextmanager
    def api(self):
        import ssl
        import xmlrpc.client

        ctx = ssl.create_default_context(cafile=self.info["ca_file"])
        api = xmlrpc.client.ServerProxy(self.info["xapi"], context=ctx)
        password = Path(self.info["password_file"]).read_text().strip()
        s = api.session.login_with_password("root", password, "1.1", "demo")["Value"]
        try:
            yield api, s
        finally:
            api.session.logout(s)

    def first_disk(self) -> dict:
        import ssl
        import xmlrpc.client

        ctx = ssl.create_default_context(cafile=self.info["ca_file"])
        api = xmlrpc.client.ServerProxy(self.info["xapi"], context=ctx)
        password = Path(self.info["password_file"]).read_text().strip()
        s = api.session.login_with_password("root", password, "1.1", "demo")["Value"]
        try:
            vm = api.VM.get_by_name_label(s, "demo-vm")["Value"][0]
            disks = {}
            for vbd in api.VM.get_VBDs(s, vm)["Value"]:
                vdi = api.VBD.get_VDI(s, vbd)["Value"]
                disks[api.VBD.get_userdevice(s, vbd)["Value"]] = {
                    "uuid": api.VDI.get_uuid(s, vdi)["Value"],
                    "size": int(api.VDI.get_virtual_size(s, vdi)["Value"]),
                }
            self.vm_size = sum(d["size"] for d in disks.values())
            if "0" in disks:
                return disks["0"]
        finally:
            api.session.logout(s)
        raise DemoError("demo-vm has no disk 0")

    def backup(self, title: str) -> None:
        step(title)
        self.control.reset_counters()
        summary = json.loads(self.xencbt("--json", "backup", "demo-vm", "--repo", str(self.repo)))
        moved = sum(c["bytes_served"] for c in self.control.counters().values())
        disks = summary["vms"][0]["disks"]
        for disk in disks:
            reason = "  (%s)" % disk["reason"] if disk["type"] == "full" else ""
            print(
                "    disk %s: %-11s changed %s%s"
                % (disk["userdevice"], disk["type"], human(disk["changed_bytes"]), reason)
            )
            if disk["userdevice"] == "0":
                self.expected[disk["point"]] = sha256(self.guest.written)
                point, kind = disk["point"], disk["type"]
        changed = sum(d["changed_bytes"] for d in disks)
        # An incremental also reads the CBT canary's sample of unchanged blocks (64 per
        # disk): said apart, so what the changes cost stays visible.
        sample = sum((d.get("canary") or {}).get("bytes", 0) for d in disks)
        line = "    read from the host's NBD server: %s" % human(moved)
        if sample:
            line += " (the changes %s, the CBT canary's sample of unchanged blocks %s)" % (
                human(moved - sample),
                human(sample),
            )
        print(line)
        self.rows.append({"point": point, "type": kind, "changed": changed, "moved": moved})

    def restore_and_compare(self, vdi: str) -> None:
        for row in (self.rows[-1], self.rows[0]):
            out = self.work / ("restored-%s.raw" % row["point"])
            step("restoring disk 0 at %s to %s" % (row["point"], out.name))
            self.xencbt(
                "restore",
                "--repo",
                str(self.repo),
                vdi,
                "--at",
                row["point"],
                "--to-file",
                str(out),
            )
            same = sha256(out.read_bytes()) == self.expected[row["point"]]
            row["restored"] = "byte-identical" if same else "DIFFERENT"
            print("    %s to the disk as it was at that backup" % row["restored"])
            if not same:
                raise DemoError("restored point %s differs from the guest disk" % row["point"])

    def summary(self) -> None:
        step("summary (demo-vm: 2 disks, %s in all)" % human(self.size_total))
        fmt = "    %-26s %-12s %12s %15s  %s"
        print(fmt % ("point", "type", "changed", "read from host", "restore of disk 0"))
        for row in self.rows:
            print(
                fmt
                % (
                    row["point"],
                    row["type"],
                    human(row["changed"]),
                    human(row["moved"]),
                    row.get("restored", "-"),
                )
            )


def vm_row(api, s, name: str) -> tuple:
    def get(method, *args):
        target = api
        for part in method.split("."):
            target = getattr(target, part)
        return target(s, *args)["Value"]

    vm = get("VM.get_by_name_label", name)[0]
    rec = get("VM.get_record", vm)
    disks = []
    for vbd in rec["VBDs"]:
        vdi = get("VBD.get_VDI", vbd)
        if get("VBD.get_type", vbd) == "Disk":
            disks.append("%s: %s" % (get("VBD.get_userdevice", vbd), get("VDI.get_uuid", vdi)[:8]))
    vifs = []
    for vif in rec["VIFs"]:
        net = get("network.get_name_label", get("VIF.get_network", vif))
        vifs.append("%s %s on %s" % (get("VIF.get_device", vif), get("VIF.get_MAC", vif), net))
    return (
        name,
        rec["power_state"],
        rec["VCPUs_at_startup"],
        human(int(rec["memory_static_max"])),
        "yes" if rec["VTPMs"] else "no",
        ", ".join(sorted(disks)),
        "; ".join(sorted(vifs)),
    )


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "bytes" else ("%.1f %s" % (n, unit))
        n /= 1024
    return str(n)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xencbt-demo-") as tmp:
        try:
            Demo(Path(tmp)).run()
        except DemoError as e:
            print("demo failed: %s" % e, file=sys.stderr)
            return 1
    step("done: everything started by the demo is stopped and removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
