"""xencbt stopped by a signal (issue #13 items 1–3), through the real command.

SIGKILL of the xencbt process alone (the OOM killer, a scheduler's timeout): within 2 s
nothing it started runs any more and the host stops serving it.  SIGINT (Ctrl-C: the
terminal signals the foreground process group), SIGTERM (systemctl stop) and SIGHUP
(the terminal went away): the copies are stopped, the snapshot destroyed, partial files
removed; one line per VM says what was undone, nothing else is printed; exit 128 + the
signal.
"""

from __future__ import annotations

import fcntl
import os
import pty
import random
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from cli_support import XENCBT, Vm, cli_env, content, rand, served, xencbt
from crash_support import (
    files,
    gate,
    listing,
    reads_at_gate,
    session_members,
    start,
    wait_gone,
    wait_until,
)
from tally import tally

pytestmark = pytest.mark.reliability

# SIGKILLs at random moments of a full backup; XENCBT_KILLS overrides (CI: the default).
KILLS = int(os.environ.get("XENCBT_KILLS", 20))
GONE_WITHIN = 2.0  # seconds, the requirement
LATENCY = 0.3  # per read the simulated host answers: with one connection, 12 reads of
ONE = ("--connections", "1")  # 2 MiB, the copy takes more than the 2 s a kill is given


@pytest.fixture
def slow(xensim_factory, tmp_path):
    """A VM whose full backup spends seconds copying (each read waits LATENCY)."""
    sim = xensim_factory(disk_sizes="24M,1M+512", in_use_wait=0.2)
    vm = Vm(sim)
    vm.write(0, {0: rand(1 << 20), 20 << 20: rand(1 << 16)})
    sim.control.set_faults(read_latency=LATENCY)
    return sim, vm, tmp_path / "repo"


def connections(sim) -> int:
    return sum(c["connections_now"] for c in sim.control.counters().values())


def eventually(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within %.0f s" % timeout
        time.sleep(0.02)


def host_snapshots(vm: Vm) -> dict:
    """Snapshot VMs of the VM and snapshot VDIs of its disks on the host."""
    x = vm.x
    vdis = [
        r["uuid"]
        for r in x.VDI.get_all_records().values()
        if r["is_a_snapshot"] and r["snapshot_of"] in vm.vdis
    ]
    return {"vms": x.VM.get_snapshots(vm.ref), "vdis": vdis}


def test_sigkill_leaves_no_process_and_no_reader(slow):
    sim, vm, repo = slow
    args = ("backup", "demo-vm", "--repo", str(repo), "--full", *ONE)
    t0 = time.monotonic()
    xencbt(sim, *args)
    duration = time.monotonic() - t0
    strays = killed = 0
    for _ in range(KILLS):
        proc = start(sim, *args)
        time.sleep(random.uniform(0, duration))
        if proc.poll() is not None:  # it was faster: not a kill
            assert proc.wait() == 0, proc.stderr.read()
            continue
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.communicate()
        left = wait_gone(proc.pid, t_kill + GONE_WITHIN)
        strays += len(left)
        for entry in left:  # the report names them; the next run must not meet them
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        assert not left, "still running %.1f s after the kill: %s" % (GONE_WITHIN, left)
        # The host notices the dead connections after at most one read's latency; from
        # then on nothing reads from it.
        eventually(lambda: connections(sim) == 0, 5.0)
        before = served(sim)
        time.sleep(2 * LATENCY + 0.1)  # two reads' time: a reader left would be seen
        assert served(sim) == before, "the host still serves the killed run"
        killed += 1
    tally("kills at random moments", killed)
    tally("stray processes after a kill", strays)
    print("%d of %d runs killed, %d stray processes" % (killed, KILLS, strays))
    assert killed >= (KILLS + 1) // 2, "most runs ended before the kill: the test proves little"
    # The runs killed left snapshots; the next backup cleans them up and succeeds.
    sim.control.clear()
    xencbt(sim, *args)


class Terminal:
    """A pseudo-terminal as xencbt's stderr (progress and all, as a user sees it), read
    by a thread until the last writer is gone."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        # Wide enough that no message is wrapped by the display (rich wraps at the width).
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer closed the other side
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        os.close(self.slave)
        self.reader.join(10)
        os.close(self.master)
        return b"".join(self.chunks).decode(errors="replace")


# What the display draws and erases (progress.py, rich) and what a run says before the
# signal: the disks' announcements, the defaults a new repository gets.
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"^(VM )?\S+ disk \d+: (copy|digest|verify|restore|check)\b")
ANNOUNCED = re.compile(r"^VM demo-vm(-\d+)? disk \d+ \(|^xencbt: repository .* has no settings yet")


def said(text: str) -> list[str]:
    """What xencbt said on the terminal, progress and the disks' announcements apart."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", ESCAPE.sub("", text))]
    return [line for line in lines if line and not (PROGRESS.match(line) or ANNOUNCED.match(line))]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_undoes_the_backup(slow, signum):
    """The signal comes somewhere in the copy: after a random number of its 13 reads, the
    next ones held at the simulator's gate until the signal was handled."""
    sim, vm, repo = slow
    sim.control.clear()  # no latency: the gate holds the window
    tty = Terminal()
    argv = [*XENCBT, "--xapi-cafile", sim.info["ca_file"], "backup", "demo-vm"]
    # SIGHUP at its default, whatever this run inherited: under nohup (which xencbt
    # honours, signals.catch) it would be ignored, and the backup end normally.
    argv = ["env", "--default-signal=HUP", *argv]
    with gate(sim, after=random.randrange(1, 12)):
        proc = subprocess.Popen(
            [*argv, "--repo", str(repo), *ONE],
            env=cli_env(sim),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=tty.slave,
            start_new_session=True,
        )
        held = lambda: files(repo, vm, ".partial") and reads_at_gate(sim)  # noqa: E731
        assert wait_until(held, proc), "the run ended before its copy was held"
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the foreground group
        else:
            os.kill(proc.pid, signum)
        release(sim)
        code = proc.wait(60)
    lines = said(tty.text())
    assert code == 128 + signum, (code, lines)
    name = signal.Signals(signum).name
    assert len(lines) == 1, lines
    assert lines[0].startswith("VM demo-vm: interrupted by %s: " % name), lines
    assert "snapshot xencbt-" in lines[0] and "destroyed" in lines[0], lines
    assert ".partial removed" in lines[0], lines
    assert session_members(proc.pid) == []
    # Undone by the run itself, not left for the next one.
    assert host_snapshots(vm) == {"vms": [], "vdis": []}
    assert not files(repo, vm, ".partial") and not files(repo, vm, ".qcow2")
    sim.control.clear()
    r = xencbt(sim, "backup", "demo-vm", "--repo", str(repo))
    assert "interrupted run" not in r.stderr, r.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_says_one_line_per_vm(xensim_factory, tmp_path, jobs):
    """Two VMs: with --jobs 1 the second has not started, with --jobs 2 both copy.  The
    copies are held mid-flight at the simulator's gate (a read answered, the next ones
    held) until the signal was sent, so it lands inside them however loaded the machine
    (a 10 s copy timed by read latency once ended first under 3 xdist workers)."""
    sim = xensim_factory(disk_sizes="16M", vms=2, in_use_wait=0.2)
    vms = [Vm(sim), Vm(sim, "demo-vm-2")]
    repo = tmp_path / "repo"
    args = ("backup", "demo-vm", "demo-vm-2", "--repo", str(repo), "--jobs", jobs, *ONE)
    copying = vms[: int(jobs)]
    with gate(sim, after=1):
        proc = start(sim, *args)

        def held() -> bool:  # each copy's one connection waits at the gate
            partial = all(files(repo, vm, ".partial") for vm in copying)
            return partial and reads_at_gate(sim) >= len(copying)

        assert wait_until(held, proc), "the run ended before its copies were held"
        os.kill(proc.pid, signal.SIGTERM)
        release(sim)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = said(err)
    assert len(lines) == 2, (lines, err)
    for vm in vms:
        mine = [x for x in lines if x.startswith("VM %s: interrupted by SIGTERM: " % vm.name)]
        assert len(mine) == 1, (vm.name, lines)
        (line,) = mine
        assert ("snapshot xencbt-" in line) == (vm in copying), line
        assert line.endswith("not started, nothing to undo") == (vm not in copying), line
        assert host_snapshots(vm) == {"vms": [], "vdis": []}
        assert not files(repo, vm, ".partial") and not files(repo, vm, ".qcow2")
    assert session_members(proc.pid) == []


def test_sigterm_after_a_vm_completed_says_so(xensim_factory, tmp_path, hold):
    """The signal comes once the first VM's point is committed, its thread not yet done
    (held by the test hook until the signal was handled): that VM says its point was kept,
    the next one that it never started; exit 143 all the same."""
    sim = xensim_factory(disk_sizes="4M", vms=2, in_use_wait=0.2)
    vms = [Vm(sim), Vm(sim, "demo-vm-2")]
    repo = tmp_path / "repo"
    args = ("backup", "demo-vm", "demo-vm-2", "--repo", str(repo), "--jobs", "1")
    proc = start(sim, *args, pause=hold("backup-vm-done"))

    def vm_points() -> list[str]:  # the VM manifests (written last), not the configurations
        found = repo.glob("*/points/*.json")
        return [p.name.removesuffix(".json") for p in found if ".config." not in p.name]

    assert wait_until(vm_points, proc), "the run ended before the first VM's point was seen"
    os.kill(proc.pid, signal.SIGTERM)
    # A guard, not a wait: the run ends as soon as its VM thread has finished its clean-up
    # (once seen to take over 60 s on a loaded CI machine, in a full parallel run).
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    (point,) = vm_points()
    assert sorted(said(err)) == sorted(  # a VM still running says its line first
        [
            "VM demo-vm: interrupted by SIGTERM after its backup completed: point %s kept" % point,
            "VM demo-vm-2: interrupted by SIGTERM: not started, nothing to undo",
        ]
    )
    assert files(repo, vms[0], ".qcow2") and not files(repo, vms[1], ".qcow2")
    assert session_members(proc.pid) == []


def release(sim) -> None:
    """The gate opened once the signal is sent: the reads held go on, as on a host that
    is slow, not hung (nbdkit stops once its plugin's reads in flight are answered; on a
    hung host it is killed after children.STOP_TIMEOUT, with a warning)."""
    sim.control.set_faults(gate_after_reads=None)


def vdi_uuids(vm: Vm) -> set[str]:
    return {r["uuid"] for r in vm.x.VDI.get_all_records().values()}


@pytest.mark.parametrize("to", ["--to-file", "--to-sr", "mid-call"])
def test_sigterm_undoes_a_restore(xensim_factory, tmp_path, to):
    """Mid-restore (data is being written, or a XAPI call is waiting for its reply): the
    partial file is removed, the new VDI destroyed."""
    sim = xensim_factory(disk_sizes="128M", in_use_wait=0.2)
    vm = Vm(sim)
    vm.write(0, {0: rand(1 << 20)})
    repo = tmp_path / "repo"
    xencbt(sim, "backup", "demo-vm", "--repo", str(repo))
    vdis = vdi_uuids(vm)
    out = tmp_path / "restored.raw"
    sr = vm.x.SR.get_uuid(vm.x.VDI.get_SR(vm.vdis[0]))
    if to == "mid-call":  # the VDI exists, the reply to VDI.get_uuid is held back
        sim.control.set_api_latency({"VDI.get_uuid": 2.0})
    target = ("--to-file", str(out)) if to == "--to-file" else ("--to-sr", sr)
    proc = start(sim, "restore", "--repo", str(repo), vm.uuids[0], *target)

    def writing() -> bool:
        if to == "--to-file":
            return out.with_name(out.name + ".partial").exists()
        if to == "mid-call":
            return bool(vdi_uuids(vm) - vdis)
        raws = [sim.state_dir / "vdis" / (uuid + ".raw") for uuid in vdi_uuids(vm) - vdis]
        return any(raw.exists() and raw.stat().st_blocks for raw in raws)

    assert wait_until(writing, proc), "the restore ended before it was seen writing"
    if to == "mid-call":  # past VDI.create's reply (an interruption there leaves the VDI
        time.sleep(random.uniform(0.2, 1.5))  # named "… (restore incomplete)")
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert said(err) == ["xencbt: interrupted by SIGTERM; nothing half-done was kept"]
    assert list(tmp_path.glob("restored*")) == []
    sim.control.set_api_latency({})
    assert vdi_uuids(vm) == vdis
    assert session_members(proc.pid) == []


def stopped(sid: int) -> bool:
    """Every process of the session is stopped (state T, or t under strace), xencbt's guard
    and the secret watch's strace apart."""
    states = []
    for entry in session_members(sid):
        pid = entry.split()[0]
        try:
            argv = Path("/proc", pid, "cmdline").read_bytes()
            stat = Path("/proc", pid, "stat").read_text()
        except OSError:
            continue
        # The guard, and the secret watch's strace (tests/execwatch.sh), are not ours to stop.
        if b"trap" not in argv and not argv.startswith(b"strace\0"):
            states.append(stat[stat.rindex(")") + 2])
    # T: stopped; t: stopped while traced (the secret watch's strace).
    return bool(states) and set(states) <= {"T", "t"}


def test_ctrl_z_pauses_the_copies_and_fg_resumes_them(slow):
    sim, vm, repo = slow
    proc = start(sim, "backup", "demo-vm", "--repo", str(repo), *ONE, untraced=True)
    wait_until(lambda: files(repo, vm, ".partial"), proc)
    os.killpg(proc.pid, signal.SIGTSTP)  # Ctrl-Z: the terminal signals the foreground group
    eventually(lambda: stopped(proc.pid), 5.0)
    time.sleep(2 * LATENCY)  # the reads in flight when it stopped are answered
    before = served(sim)
    time.sleep(3 * LATENCY)
    assert served(sim) == before, "the host is still read while xencbt is stopped"
    os.killpg(proc.pid, signal.SIGCONT)  # fg
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (row,) = [r for r in listing(sim, repo) if r["vdi_uuid"] == vm.uuids[0]]
    assert row["digest"] == content(bytes(vm.models[0]))
