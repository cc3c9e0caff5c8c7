"""Helpers (no tests) for serving disks to mount: an ext4 file system written into a simulated
VDI as its guest would, ``xencbt serve`` run as a process until the block ends, the
processes it started, and a served disk read whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
from pathlib import Path

import nbd
from cli_support import BLOCK, xencbt
from secretwatch import WATCH

READY_TIMEOUT = 60.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Ext4:
    """An ext4 image made by ``mkfs.ext4 -d`` from ``files`` ({path: bytes}), changed
    later with debugfs (no mount needed), written into a VDI block by block."""

    def __init__(self, work: Path, size: int, files: dict[str, bytes]) -> None:
        self.work, self.files = work, dict(files)
        self.image = work / "guest-fs.img"
        self.written = bytes(size)
        content = work / "content"
        for path, data in files.items():
            (content / path).parent.mkdir(parents=True, exist_ok=True)
            (content / path).write_bytes(data)
        mkfs = ["mkfs.ext4", "-q", "-F", "-d", str(content), "-L", "xencbt", str(self.image)]
        subprocess.run([*mkfs, "%dK" % (size // 1024)], check=True, capture_output=True)

    def sums(self) -> dict[str, str]:
        """What the mounted file system must show: {path: sha256} of every file."""
        return {path: sha(data) for path, data in self.files.items()}

    def edit(self, changes: dict[str, bytes | None], extra: list[str] = ()) -> None:
        """Replace, add (bytes) or remove (None) files; ``extra`` debugfs commands after."""
        lines = []
        for n, (path, data) in enumerate(sorted(changes.items())):
            parent, _, name = ("/" + path).rpartition("/")
            lines.append("cd %s" % (parent or "/"))
            if path in self.files:
                lines.append("rm %s" % name)
            if data is not None:
                local = self.work / ("edit-%d" % n)
                local.write_bytes(data)
                lines.append("write %s %s" % (local, name))
                self.files[path] = data
            else:
                del self.files[path]
        script = self.work / "debugfs.cmd"
        script.write_text("\n".join([*lines, "cd /", *extra]) + "\n")
        done = subprocess.run(
            ["debugfs", "-w", "-f", str(script), str(self.image)], capture_output=True, text=True
        )
        assert done.returncode == 0 and "rror" not in done.stderr, done.stderr

    def write_to(self, sim, vdi_uuid: str) -> int:
        """Write the 64 KiB blocks that differ from what the VDI holds; return their count."""
        data = self.image.read_bytes()
        blocks = [
            b
            for b in range(0, len(data), BLOCK)
            if data[b : b + BLOCK] != self.written[b : b + BLOCK]
        ]
        with sim.guest_disk(vdi_uuid) as uri:
            h = nbd.NBD()
            h.connect_uri(uri)
            for b in blocks:
                h.pwrite(data[b : b + BLOCK], b)
            h.flush()
            h.shutdown()
        self.written = data
        return len(blocks)


def ready_line(proc, timeout: float = READY_TIMEOUT) -> dict:
    """The JSON line ``xencbt --json serve`` prints once it serves (bounded wait)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate()
        WATCH.output("xencbt serve (stderr)", err)
        raise AssertionError("xencbt serve did not start (exit %s): %s" % (proc.returncode, err))
    return json.loads(line)


@contextlib.contextmanager
def serving(sim, *args: str):
    """``xencbt --json serve ARGS`` until the block ends; yields (ready info, process).
    Stopped with SIGTERM, which must end it with exit 0."""
    proc = xencbt(sim, "--json", "serve", *args, popen=True)
    try:
        yield ready_line(proc), proc
    except BaseException:
        stop(proc)
        raise
    code, err = stop(proc)
    assert code == 0, "xencbt serve exit %d: %s" % (code, err)


def stop(proc) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        WATCH.output("xencbt serve (stderr)", err)
        raise AssertionError("xencbt serve ignored SIGTERM for 60 s: %s" % err) from None
    WATCH.output("xencbt serve (stderr)", err)
    return proc.returncode, err


GUARD = "sh -c trap"  # xencbt's guard of its children's process group (children.py)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, argv as one line) of the processes whose parent is ``pid``, but the guard."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
            argv = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and not argv.startswith(GUARD):
            found.append((int(entry), argv))
    return found


def read(uri: str) -> bytes:
    return subprocess.run(["nbdcopy", "--", uri, "-"], capture_output=True, check=True).stdout
