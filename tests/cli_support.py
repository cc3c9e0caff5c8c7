"""Helpers (no tests) for the xencbt command's end-to-end tests: run the real command against the
simulator, write through the guest's disk, keep a model of every disk (and of every point a
run of backups took), and check a repository's points against it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import invariants
import nbd
from secretwatch import WATCH, traced
from tally import tally

BLOCK = 64 * 1024
# Every xencbt run of the tests digests in chunks of 4 blocks (XENCBT_CHUNK_SIZE), so the
# small simulated disks have many chunks: carried-over and rehashed ones, a short last one.
CHUNK = 4 * BLOCK
# Every run is seen exec by exec by the secret watch (tests/execwatch.sh).
XENCBT = traced([sys.executable, "-m", "xencbt_cli.main"])


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def content(data: bytes | bytearray) -> str:
    """A whole disk's digest as xencbt's manifests record it (digest.py), computed here
    the slow, obvious way."""
    sums = b"".join(
        hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)
    )
    return hashlib.sha256(sums + len(data).to_bytes(8, "big")).hexdigest()


def rand(n: int) -> bytes:
    return os.urandom(n)


def cli_env(sim) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XENCBT_XAPI=sim.info["xapi"], XENCBT_PASSWORD_FILE=sim.info["password_file"])
    env.pop("XENCBT_USER", None)
    env["XENCBT_CHUNK_SIZE"] = str(CHUNK)
    env["HOME"] = str(sim.state_dir)  # no stray ~/.config/xencbt/xencbt.conf
    return env


class WatchedPopen(subprocess.Popen):
    """A run whose output, once collected with ``communicate``, goes to the secret watch."""

    def communicate(self, *args, **kwargs):
        out, err = super().communicate(*args, **kwargs)
        WATCH.output(" ".join(map(str, self.args[-3:])), out, err)
        return out, err


# Commands that write to a repository (--repo; copy's --to): the repository's invariants
# are checked after each (tests/invariants.py).
WRITERS = ("init", "backup", "prune", "copy", "repair", "forget", "drill")


def written(args: tuple[str, ...]) -> list[Path]:
    """The repositories a run of xencbt with ``args`` may write to."""
    command = next((a for a in args if a in WRITERS), None)
    if command is None:
        return []
    names = ("--repo", "--to") if command == "copy" else ("--repo",)
    found = []
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            found.append(Path(args[i + 1]))
        elif a.split("=", 1)[0] in names and "=" in a:
            found.append(Path(a.split("=", 1)[1]))
    return found


def xencbt(sim, *args: str, check: int | None = 0, popen: bool = False, timeout: float = 120):
    """Run xencbt; a run that may write to a repository is followed by the check of its
    invariants: any breach it introduced (one already there before it ran, e.g. damage a
    test planted, is not its doing) fails the test; leftovers of an interrupted run count
    only after a run that succeeded."""
    argv = [*XENCBT, "--xapi-cafile", sim.info["ca_file"], *args]
    if popen:
        return WatchedPopen(
            argv, env=cli_env(sim), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    repos = written(args)
    before = {repo: set(invariants.breaches(repo)) for repo in repos}
    r = subprocess.run(argv, env=cli_env(sim), capture_output=True, text=True, timeout=timeout)
    WATCH.output("xencbt %s" % " ".join(args), r.stdout, r.stderr)
    if check is not None:
        assert r.returncode == check, "exit %d\n%s\n%s" % (r.returncode, r.stdout, r.stderr)
    for repo in repos:
        tally("invariant checks after a command")
        new = [b for b in invariants.breaches(repo, r.returncode == 0) if b not in before[repo]]
        assert not new, "xencbt %s broke the invariants of repository %s:\n  %s" % (
            " ".join(args),
            repo,
            "\n  ".join(new),
        )
    return r


def backup(sim, repo: Path, *args: str) -> dict:
    r = xencbt(sim, "--json", "backup", *args, "--repo", str(repo))
    summary = json.loads(r.stdout)
    # Clean-up calls retried while dom0 still held NBD VBDs: a reliability figure.
    tally("VDI_IN_USE retries", sum(vm.get("in_use_retries", 0) for vm in summary["vms"]))
    return summary


def initial(sim, vdi_uuid: str, size: int) -> bytearray:
    data = (Path(sim.state_dir) / "vdis" / (vdi_uuid + ".raw")).read_bytes()[:size]
    return bytearray(data + bytes(size - len(data)))


class Vm:
    """A simulated VM, its disks and a model of what the guest wrote on each."""

    def __init__(self, sim, name: str = "demo-vm"):
        self.sim = sim
        self.x = sim.session().xenapi
        self.ref = self.x.VM.get_by_name_label(name)[0]
        self.uuid = self.x.VM.get_uuid(self.ref)
        self.name = name
        vbds = [self.x.VBD.get_record(v) for v in self.x.VM.get_VBDs(self.ref)]
        self.vdis = [v["VDI"] for v in sorted(vbds, key=lambda v: v["userdevice"])]
        self.uuids = [self.x.VDI.get_uuid(v) for v in self.vdis]
        # What each disk holds now (demo-vm's boot disk starts with a boot sector): the
        # simulator's own data file, the independent truth.
        self.models = [
            initial(sim, u, int(self.x.VDI.get_virtual_size(v)))
            for u, v in zip(self.uuids, self.vdis)
        ]

    def write(self, disk: int, changes: dict[int, bytes | None]) -> None:
        with self.sim.guest_disk(self.uuids[disk]) as uri:
            h = nbd.NBD()
            h.connect_uri(uri)
            for offset, data in changes.items():
                if data is None:
                    h.zero(BLOCK, offset)
                    data = bytes(BLOCK)
                else:
                    h.pwrite(data, offset)
                self.models[disk][offset : offset + len(data)] = data
            h.flush()
            h.shutdown()

    def resize(self, disk: int, size: int) -> None:
        self.x.VDI.resize(self.vdis[disk], str(size))
        size = int(self.x.VDI.get_virtual_size(self.vdis[disk]))
        self.models[disk].extend(bytes(size - len(self.models[disk])))

    def digests(self) -> list[str]:
        """sha256 of each disk as the guest wrote it."""
        return [sha(m) for m in self.models]

    def contents(self) -> list[str]:
        """Each disk's digest as xencbt's manifests record it."""
        return [content(m) for m in self.models]


def restored(sim, repo: Path, tmp: Path, vdi: str, point: str | None = None) -> bytes:
    """What ``xencbt restore --to-file`` (raw) gives."""
    out = tmp / ("r-%s-%s.raw" % (vdi[:8], point or "latest"))
    args = ["restore", "--repo", str(repo), vdi, "--to-file", str(out)]
    xencbt(sim, *args, *(["--at", point] if point else []))
    data = out.read_bytes()
    out.unlink()
    return data


def restored_sha(sim, repo: Path, tmp: Path, vdi: str, point: str | None = None) -> str:
    return sha(restored(sim, repo, tmp, vdi, point))


def served(sim) -> int:
    return sum(c["bytes_served"] for c in sim.control.counters().values())


def sampled(disks: list[dict]) -> int:
    """The bytes the CBT canary of these disk points read from the host (its sample of
    unchanged blocks: jobs/canary.py)."""
    return sum((d.get("canary") or {}).get("bytes", 0) for d in disks)


def disk_rows(listed: dict) -> list[dict]:
    """Every disk point of ``xencbt list --json`` (VMs > points > disks), one row each."""
    assert set(listed) >= {"repository", "vms"}, listed
    return [d for vm in listed["vms"] for p in vm["points"] for d in p["disks"]]


def backups(sim, repo, vm: Vm, n: int, history: dict, data=rand) -> None:
    """``n`` backups, each after a block of ``data(BLOCK)`` written on each disk."""
    for _ in range(n):
        vm.write(0, {random.randrange(16) * BLOCK: data(BLOCK)})
        vm.write(1, {random.randrange(8) * BLOCK: data(BLOCK)})
        (got,) = backup(sim, repo, "demo-vm")["vms"]
        assert got["ok"], got
        history[got["point"]] = [bytes(m) for m in vm.models]


def manifests(repo, vm: Vm) -> list[dict[str, dict]]:
    found = []
    for vdi in vm.uuids:
        chain = repo / vm.uuid / vdi
        found.append({p.stem: json.loads(p.read_text()) for p in sorted(chain.glob("2*.json"))})
    return found


def same_as_model(sim, repo, vm: Vm, history: dict, tmp_path) -> None:
    for disk, points in enumerate(manifests(repo, vm)):
        for point in points:
            assert restored(sim, repo, tmp_path, vm.uuids[disk], point) == history[point][disk]


def same_vm_points(src, dst, vm: Vm, points: list[str]) -> None:
    """DST has exactly ``points`` as VM points, each configuration byte-identical to SRC's
    and private, each manifest naming DST's disk points (what restore-vm needs)."""
    there = dst / vm.uuid / "points"
    assert sorted(p.name for p in there.iterdir()) == sorted(
        name for point in points for name in (point + ".json", point + ".config.json")
    )
    for point in points:
        config = there / (point + ".config.json")
        assert config.read_bytes() == (src / vm.uuid / "points" / config.name).read_bytes()
        assert config.stat().st_mode & 0o077 == 0
        for d in json.loads((there / (point + ".json")).read_text())["disks"]:
            assert (dst / vm.uuid / d["vdi_uuid"] / (d["point"] + ".json")).exists()


def fill(sim, uuid: str, size: int) -> str:
    """Random data in every 4th block of the source VDI (as the host stores it, under the
    simulator's lock); returns the whole disk's digest as a manifest records it."""
    from xensim import disks

    path = disks.data_path(sim.state_dir, uuid)
    with disks.locked(sim.state_dir, uuid), open(path, "r+b") as f:
        for offset in range(0, size - BLOCK + 1, 4 * BLOCK):
            f.seek(offset)
            f.write(os.urandom(BLOCK))
    data = path.read_bytes()
    return content(data + bytes(size - len(data)))
