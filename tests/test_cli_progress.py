"""Progress (issue #13 item 9): on a terminal one line per disk in flight, with its VM and
disk, bytes, rate and ETA, for the copy, the digest, verify and restore; with --jobs 3
the VMs' lines stand one under the other; on a pipe or with --json, none of it.

The terminal is a real pty (python's pty module); what xencbt drew is read back from it."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import threading
from pathlib import Path

import pytest
from cli_support import BLOCK, XENCBT, Vm, cli_env, rand, xencbt

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# "demo-vm-2 disk 0: copy ━━━━━━━━ 1.2/4.0 MiB 1.1 MiB/s 0:00:03"
LINE = re.compile(
    r"^(?P<label>\S+ disk \d+: (?:copy|digest|check|(?:verify|restore) \S+)) .*?"
    r"(?P<bytes>[\d.]+(?:/[\d.]+)? (?:bytes|KiB|MiB|GiB)) +(?P<rate>[\d.?]+ ?\S*/s|\?) +"
    r"(?P<eta>[-\d:]+)\s*$"
)
NAMES = ["demo-vm", "demo-vm-2", "demo-vm-3"]


def on_a_terminal(sim, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run xencbt with its stderr on a pty (80 columns wide is too narrow to check: 160);
    returns the run and the lines drawn, escape sequences removed."""
    master, slave = pty.openpty()
    os.set_blocking(master, True)
    subprocess.run(["stty", "cols", "160", "rows", "50"], stdin=slave, check=True)
    env = cli_env(sim)
    env.pop("NO_COLOR", None)
    env["TERM"] = "xterm-256color"
    env.pop("COLUMNS", None)
    drawn = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the pty
                return
            if not data:
                return
            drawn.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        r = subprocess.run(
            [*XENCBT, "--xapi-cafile", sim.info["ca_file"], *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=300,
        )
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    text = ANSI.sub("", drawn.decode(errors="replace"))
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return r, lines


def progress_lines(lines: list[str]) -> dict[str, list[re.Match]]:
    found: dict[str, list[re.Match]] = {}
    for line in lines:
        m = LINE.match(line)
        if m:
            found.setdefault(m["label"], []).append(m)
    return found


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(vms=3, disk_sizes="64M", in_use_wait=0.2)


def test_one_line_per_disk_in_flight_on_a_terminal(sim, tmp_path):
    repo = str(tmp_path / "repo")
    for name in NAMES:  # data to copy all over the disk (holes cost nothing)
        Vm(sim, name).write(0, {i * BLOCK: rand(BLOCK) for i in range(0, 1024, 32)})
    # Copies long enough to be drawn a few times, overlapping: a read of 0.5 s in each of
    # 32 chunks of 2 MiB, which qemu-img copies 8 at a time.
    sim.control.set_faults(read_latency=0.5)
    args = ("--repo", repo, "--jobs", "3", "--connections", "1")
    r, lines = on_a_terminal(sim, "backup", *NAMES, *args)
    assert r.returncode == 0, "\n".join(lines)
    assert r.stdout.strip()  # the summary table: stdout stays the command's
    found = progress_lines(lines)
    for name in NAMES:
        assert "%s disk 0: copy" % name in found, "\n".join(lines)
    # Lines never overwrite each other: no drawn line holds two VMs' labels.
    for line in lines:
        assert sum(line.count("%s disk" % n) for n in NAMES) <= 1 + line.count("demo-vm-"), line
        assert len(re.findall(r"disk \d+: \w+", line)) <= 1, line
    # The three copies were drawn at once, one line each, in one frame: rich redraws
    # every line of a frame together, so three consecutive lines are the three VMs.
    copy = [n for n in (LINE.match(x) for x in lines) if n]
    frames = [{m["label"] for m in copy[i : i + 3]} for i in range(len(copy) - 2)]
    assert {"%s disk 0: copy" % n for n in NAMES} in frames, "\n".join(lines)
    # The copy's figures move: a line part-way, with a rate and an ETA.
    moving = [
        m
        for m in found["demo-vm disk 0: copy"]
        if not m["bytes"].startswith(("0.0/", "64.0/")) and m["rate"] != "?"
    ]
    assert moving and moving[0]["bytes"].endswith("/64.0 MiB") and ":" in moving[0]["eta"], lines

    sim.control.set_faults(read_latency=0.0)
    digests = {label for label in found if label.endswith(": digest")}
    assert digests == {"%s disk 0: digest" % n for n in NAMES}, "\n".join(lines)

    r, lines = on_a_terminal(sim, "verify", "--repo", repo)
    assert r.returncode == 0
    labels = set(progress_lines(lines))
    assert {label.split(": verify")[0] for label in labels} == {"%s disk 0" % n for n in NAMES}

    vdi = json.loads(xencbt(sim, "--json", "list", "--repo", repo).stdout)[0]["vdi_uuid"]
    out = tmp_path / "disk.raw"
    r, lines = on_a_terminal(sim, "restore", vdi, "--repo", repo, "--to-file", str(out))
    assert r.returncode == 0
    labels = set(progress_lines(lines))
    assert any(label.endswith(": check") for label in labels), "\n".join(lines)

    # Into the pool: a new VDI, then in place over it (only the differing blocks).
    x = Vm(sim, NAMES[0]).x
    sr = x.SR.get_uuid(x.VDI.get_SR(x.VDI.get_by_uuid(vdi)))
    r, lines = on_a_terminal(sim, "--json", "restore", vdi, "--repo", repo, "--to-sr", sr)
    assert r.returncode == 0, "\n".join(lines)
    assert not progress_lines(lines)  # --json: nothing drawn
    r, lines = on_a_terminal(sim, "restore", vdi, "--repo", repo, "--to-sr", sr)
    assert r.returncode == 0, "\n".join(lines)
    assert any(": restore " in label for label in progress_lines(lines)), "\n".join(lines)


def test_nothing_of_it_on_a_pipe_or_with_json(sim, tmp_path):
    repo = str(tmp_path / "repo")
    r = xencbt(sim, "backup", *NAMES, "--repo", repo, "--jobs", "3")
    assert not progress_lines(r.stderr.splitlines()) and "━" not in r.stderr
    assert "/s" not in r.stderr and "/100%" not in r.stderr
    r, lines = on_a_terminal(sim, "--json", "backup", *NAMES, "--repo", repo, "--jobs", "3")
    assert r.returncode == 0
    assert json.loads(r.stdout)["ok"]
    assert not progress_lines(lines) and not any("━" in line for line in lines), lines
    r, lines = on_a_terminal(sim, "verify", "--repo", repo, "--json")
    assert r.returncode == 0 and not progress_lines(lines)
    assert Path(repo).is_dir()
