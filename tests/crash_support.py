"""Helpers (no tests) for killing ``xencbt`` at chosen moments and checking the aftermath.

A kill point is a trigger (something observable: a snapshot VM appearing on the simulated
host, a ``.partial`` file, a manifest temp file) plus a random delay after it.  Then the
run is stopped (SIGSTOP) and the window is *confirmed*: the state that defines it still
holds (the temp file is there, the journal is in place, the VDI is partly rewritten…).
Only then is it killed with SIGKILL and the kill counted; a run that left the window
first is continued (SIGCONT), must succeed, and is tried again (``Kills``).  Short
windows are held open by injected latency: the simulator's API and read latency, and
the product's test-only ``XENCBT_TEST_PAUSE`` (orchestrate/xencbt_cli/proc/testhook.py).
After a kill its session is watched until every child is gone, and ``Aftermath``
checks what the issue promises: verify passes, no half-written point is listed, the
next backup succeeds byte-identical and the host keeps no snapshot of ours beyond the
CBT bases the repository needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cli_support import BLOCK, XENCBT, Vm, cli_env, content, disk_rows, rand, xencbt
from secretwatch import WATCH
from tally import tally

KILLS_DEFAULT = 2  # confirmed kills per window in `make check`; XENCBT_KILLS=20 for more
ATTEMPTS = 4  # runs allowed per confirmed kill before the window counts as missed


def kills_per_point() -> int:
    return int(os.environ.get("XENCBT_KILLS", KILLS_DEFAULT))


class Kills:
    """Runs until ``kills_per_point()`` kills were confirmed inside the window (at most
    ``ATTEMPTS`` runs per kill); ``done`` asserts they all were."""

    def __init__(self, window: str):
        self.window, self.wanted = window, kills_per_point()
        self.confirmed = self.runs = 0

    def __iter__(self):
        while self.confirmed < self.wanted and self.runs < ATTEMPTS * self.wanted:
            self.runs += 1
            yield self.runs

    def count(self, confirmed: bool) -> None:
        if confirmed:
            self.confirmed += 1
            tally("kills confirmed: " + self.window)

    def done(self) -> None:
        print(
            "%s: %d confirmed kills in %d runs (%d wanted)"
            % (self.window, self.confirmed, self.runs, self.wanted)
        )
        assert self.confirmed == self.wanted, (
            "%s: only %d of %d kills landed inside the window in %d runs: the test proves little"
            % (self.window, self.confirmed, self.wanted, self.runs)
        )


# -- processes ---------------------------------------------------------------------------
def start(sim, *args: str, pause: str = "", untraced: bool = False) -> subprocess.Popen:
    """``xencbt ARGS`` in a session of its own, so that its children can be found after
    it is killed (they keep the session when re-parented).  ``pause``: the product's
    XENCBT_TEST_PAUSE (testhook.py), which holds a short window open.  ``untraced``:
    not under the secret watch's strace, whose ptrace changes job control (a stopped
    tracee is resumed by its tracer, not by SIGCONT alone); /proc sampling still runs."""
    cli = [sys.executable, "-m", "xencbt_cli.main"] if untraced else XENCBT
    argv = [*cli, "--xapi-cafile", sim.info["ca_file"], *args]
    env = cli_env(sim)
    if pause:
        env["XENCBT_TEST_PAUSE"] = pause
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def session_members(sid: int) -> list[str]:
    """Live processes of the session ``sid`` ("pid (name)"): everything a run started in
    a session of its own left, whatever process group xencbt put it in."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path("/proc", pid, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in "ZX" and int(fields[3]) == sid:
            found.append("%s %s" % (pid, stat[stat.index("(") : stat.rindex(")") + 1]))
    return found


def state(pid: int) -> str:
    """The process's state letter (T: stopped, Z: zombie), "" once it is gone."""
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """SIGSTOP the xencbt process alone (its children run on, but nothing it does itself
    (a rename, a call) can happen while it is stopped); whether it was still running."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while (s := state(proc.pid)) not in ("T", "t", "Z", ""):
        assert time.monotonic() < deadline, "xencbt did not stop"
        time.sleep(0.001)
    return s in ("T", "t")


def kill_if(proc: subprocess.Popen, confirm: Callable[[], object]) -> bool:
    """Stop the run; when it is still inside the window (``confirm()`` true while it is
    stopped), SIGKILL it (``kill``) and return True.  Otherwise continue it: it must then
    finish with exit 0.  A run that already ended is a miss too."""
    if stop(proc) and confirm():
        assert "Traceback" not in kill(proc)
        return True
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=180)
    WATCH.output("xencbt run (continued, not killed)", out, err)
    assert proc.returncode == 0, err
    return False


def wait_gone(sid: int, deadline: float) -> list[str]:
    """Wait (on pidfds, no polling) until the session ``sid`` is empty or ``deadline``
    (time.monotonic()) passes; return what is left."""
    while (left := session_members(sid)) and time.monotonic() < deadline:
        fds = []
        for entry in left:
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(int(entry.split()[0])))
        try:
            select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
        finally:
            for fd in fds:
                os.close(fd)
    return left


def kill(proc: subprocess.Popen, linger: float = 15.0) -> str:
    """SIGKILL the xencbt process alone (as the OOM killer or a timeout would), reap it,
    and wait for its children to go by themselves; return its stderr (which the secret
    watch scans).  Children still there after ``linger`` seconds fail the test (and are
    then killed)."""
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    WATCH.output("xencbt run killed with SIGKILL", out, err)
    left = wait_gone(proc.pid, time.monotonic() + linger)
    for entry in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.split()[0]), signal.SIGKILL)
    assert not left, "children of the killed xencbt still run: %s" % left
    return err


def wait_until(predicate: Callable[[], object], proc: subprocess.Popen, timeout: float = 60.0):
    """Poll ``predicate`` (cheap: a stat or one API call) until true; None if the run ended
    first (it was faster than the trigger)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    raise AssertionError("trigger not seen within %.0f s" % timeout)


def reads_at_gate(sim) -> int:
    """Reads waiting at the simulator's gate (fault gate_after_reads): the copy is held."""
    return sim.control.faults()["reads_at_gate"]


@contextlib.contextmanager
def gate(sim, after: int):
    """Within the block, the simulator answers ``after`` more reads, then holds every read
    until the block ends: a copy is held mid-flight for exactly as long as the test needs
    it, however loaded the machine (events, not timers)."""
    sim.control.set_faults(gate_after_reads=after)
    try:
        yield
    finally:
        sim.control.set_faults(gate_after_reads=None)


class Inotify:
    """Wake up the moment a file is created or renamed into a directory (no polling),
    for windows too short to poll: a manifest's temp file lives for one fsync."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80
    _HEADER = struct.Struct("iIII")

    def __init__(self, *dirs: Path):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for d in dirs:
            wd = libc.inotify_add_watch(self.fd, str(d).encode(), self.IN_CREATE | self.IN_MOVED_TO)
            assert wd >= 0, os.strerror(ctypes.get_errno())

    def wait(self, match: Callable[[str], bool], proc: subprocess.Popen, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                for name in self._read():
                    if match(name):
                        return name
        raise AssertionError("no matching file within %.0f s" % timeout)

    def drain(self) -> list[str]:
        """Names seen so far (not waiting)."""
        names = []
        while select.select([self.fd], [], [], 0)[0]:
            names += self._read()
        return names

    def _read(self) -> list[str]:
        data = os.read(self.fd, 65536)
        names, pos = [], 0
        while pos < len(data):
            _, _, _, length = self._HEADER.unpack_from(data, pos)
            names.append(data[pos + 16 : pos + 16 + length].rstrip(b"\0").decode())
            pos += 16 + length
        return names

    def close(self) -> None:
        os.close(self.fd)


# -- the pool and the repository ---------------------------------------------------------
def source_sha(sim, vm: Vm, disk: int) -> str:
    """Digest of the whole source VDI as the simulated host stores it (sparse file, read
    to its virtual size), cross-checked with the test's model of what the guest wrote."""
    size = int(vm.x.VDI.get_virtual_size(vm.vdis[disk]))
    data = (sim.state_dir / "vdis" / (vm.uuids[disk] + ".raw")).read_bytes()
    data += bytes(size - len(data))
    assert data == bytes(vm.models[disk]), "the simulator's VDI differs from the model"
    return content(data)


def scribble(vm: Vm) -> None:
    """A guest write at a random block of disk 0, so each backup has news (the other disk
    gets an empty incremental, which goes through the same steps)."""
    block = random.randrange(len(vm.models[0]) // BLOCK)
    vm.write(0, {block * BLOCK: rand(BLOCK)})


def listing(sim, repo: Path) -> list[dict]:
    return disk_rows(json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout))


def chain_dirs(repo: Path, vm: Vm) -> list[Path]:
    return [repo / vm.uuid / uuid for uuid in vm.uuids]


def files(repo: Path, vm: Vm, suffix: str) -> list[Path]:
    return [p for d in chain_dirs(repo, vm) if d.is_dir() for p in d.glob("*" + suffix)]


class Aftermath:
    """What must hold after any kill, and the bookkeeping between kills."""

    def __init__(self, sim, repo: Path, vm: Vm, tmp: Path):
        self.sim, self.repo, self.vm, self.tmp = sim, repo, vm, tmp
        self.expected: dict[tuple[str, str], str] = {}  # (vdi, point) -> source sha
        self.pending: list[str] = []  # source shas at the start of the killed run

    def backup(self, *extra: str) -> dict:
        """A backup that must succeed and be byte-identical to the source VDIs."""
        shas = [source_sha(self.sim, self.vm, d) for d in range(len(self.vm.uuids))]
        r = xencbt(self.sim, "--json", "backup", "demo-vm", "--repo", str(self.repo), *extra)
        (result,) = json.loads(r.stdout)["vms"]
        assert result["ok"], result
        for d in result["disks"]:
            disk = self.vm.uuids.index(d["vdi_uuid"])
            assert d["digest"] == shas[disk], "backup of disk %d differs from the source" % disk
            self.expected[(d["vdi_uuid"], d["point"])] = d["digest"]
        return r

    def before_kill(self) -> None:
        self.pending = [source_sha(self.sim, self.vm, d) for d in range(len(self.vm.uuids))]

    def tree(self) -> dict[str, int]:
        return {
            str(p.relative_to(self.repo)): p.stat().st_mtime_ns
            for p in self.repo.rglob("*")
            if p.is_file()
        }

    def check_repository(self) -> list[dict]:
        """verify passes and changes nothing; every listed point is complete and known:
        one made before, or the killed run's, fully committed and equal to the source.
        Returns the listing."""
        self.sim.control.clear()
        self.sim.control.set_api_latency({})
        before = self.tree()
        xencbt(self.sim, "verify", "--repo", str(self.repo))
        assert self.tree() == before, "verify changed the repository"
        rows = listing(self.sim, self.repo)
        for row in rows:
            key = (row["vdi_uuid"], row["point"])
            if key not in self.expected:
                disk = self.vm.uuids.index(row["vdi_uuid"])
                assert self.pending and row["digest"] == self.pending[disk], key
                self.expected[key] = row["digest"]
            assert row["digest"] == self.expected[key]
        return rows

    def check_host(self, rows: list[dict]) -> None:
        """No snapshot VM of ours; the only snapshot VDIs of the VM's disks are the CBT
        bases of the newest points, as metadata only."""
        x = self.vm.x
        assert not x.VM.get_snapshots(self.vm.ref), "a snapshot VM was left on the host"
        latest = {r["vdi_uuid"]: r["snapshot_uuid"] for r in rows}  # oldest first
        snaps = {
            rec["uuid"]: rec["type"]
            for rec in x.VDI.get_all_records().values()
            if rec["is_a_snapshot"] and rec["snapshot_of"] in self.vm.vdis
        }
        assert set(snaps) == set(latest.values()), "snapshot VDIs left: %s" % snaps
        assert set(snaps.values()) == {"cbt_metadata"}, snaps

    def check_files(self) -> None:
        for suffix in (".partial", ".tmp"):
            assert not files(self.repo, self.vm, suffix), "leftover %s files" % suffix
        for d in chain_dirs(self.repo, self.vm):
            images = {p.stem for p in d.glob("*.qcow2")}
            manifests = {p.stem for p in d.glob("*.json")}
            sums = {p.stem for p in d.glob("*.sums")}
            assert images == manifests, "images without manifest: %s" % (images - manifests)
            assert sums == manifests, "sums without manifest or missing: %s" % (sums ^ manifests)

    def after_kill(self) -> None:
        """All the promises; then the next backup, which must clean up after the kill."""
        self.check_repository()
        r = self.backup()
        assert "Traceback" not in r.stderr
        self.check_host(listing(self.sim, self.repo))
        self.check_files()
