"""xencbt copy keeps the repository's promises on every path (issue #23, #24 finding 6),
through the real CLI on the simulator: DST's settings apply to every image it gets (a
clear SRC copied into an encrypted DST is LUKS throughout, into a zstd DST compressed,
incrementals too); a damaged point of SRC is refused whether full or incremental; a
damaged chain of DST holds back that chain only, is named, and ``copy --full`` is the way
on.  Ground truth: the test's model of what the guest wrote, and qemu-img's own reading
of each image's header."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from cli_support import BLOCK, Vm, backup, backups, manifests, restored, same_as_model, xencbt
from encrypt_support import assert_marker_nowhere, make_key, marked
from qemu_images import compressed_clusters, corrupt_data_cluster

pytestmark = pytest.mark.reliability


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,512K", in_use_wait=0.5)


def header(path: Path, key: Path | None = None) -> dict:
    """``qemu-img info`` of the image alone; with ``key``, opened through it (qemu then
    proves the LUKS header takes that key)."""
    if key is None:
        argv = ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(path)]
    else:
        node = {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(path)},
            "encrypt": {"key-secret": "k"},
            "backing": None,
        }
        argv = ["qemu-img", "info", "-U", "--output=json", "--object"]
        argv += ["secret,id=k,file=%s" % key, "json:" + json.dumps(node)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def text(n: int) -> bytes:
    """Guest data that compresses: words, not random bytes (a cluster that does not
    shrink is stored as is, and would prove nothing)."""
    words = [random.choice((b"copy", b"zstd", b"cluster", b"point", b"chain")) for _ in range(n)]
    return b" ".join(words)[:n]


def first_in_uuid_order(vm: Vm) -> tuple[int, int]:
    """(the disk whose chain copy takes first, the other): chains go in uuid order, and
    uuids are random, so the damage goes where it is met first, every run (a copy that
    gave up on every chain at the first damaged one would pass half the time else)."""
    hit = vm.uuids.index(min(vm.uuids))
    return hit, 1 - hit


def images(repo: Path, vm: Vm) -> list[Path]:
    found = [p for vdi in vm.uuids for p in sorted((repo / vm.uuid / vdi).glob("*.qcow2"))]
    assert found
    return found


def test_copy_of_a_clear_repository_into_an_encrypted_one_is_luks_throughout(
    sim, tmp_path, monkeypatch
):
    """#23: every image of an encrypted repository is LUKS, whichever command wrote it,
    copy's incrementals included; the sums and VM configurations sealed; each point reads
    back as the guest wrote it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    key = make_key(tmp_path / "dst.key")
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    vm.write(0, {0: marked(4096)})
    backups(sim, src, vm, 3, history)
    listed = json.loads(xencbt(sim, "--json", "list", "--repo", str(src)).stdout)
    assert listed["settings"]["encryption"] == "none"
    xencbt(sim, "--key-file", str(key), "init", "--repo", str(dst), "--encrypt")
    xencbt(sim, "copy", "--repo", str(src), "--to", str(dst), "--to-key-file", str(key))
    kinds = set()
    for path in images(dst, vm):
        info = header(path, key)
        assert info["encrypted"], path.name
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks", path.name
        kinds.add("incremental" if info.get("backing-filename") else "full")
    assert kinds == {"full", "incremental"}
    for chain in manifests(dst, vm):
        assert [m["type"] for m in chain.values()] == ["full", "incremental", "incremental"]
    assert_marker_nowhere(dst)
    for sums in dst.rglob("*.sums"):
        assert sums.read_bytes().startswith(b"XENCBT-SEALED-1\n"), sums.name
    for config in dst.rglob("*.config.json"):
        assert config.read_bytes().startswith(b"XENCBT-SEALED-1\n"), config.name
    monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    xencbt(sim, "verify", "--repo", str(dst))
    same_as_model(sim, dst, vm, history, tmp_path)


def test_copy_into_a_zstd_repository_compresses_every_image(sim, tmp_path):
    """#23: every image of a zstd repository has compression-type zstd and compressed
    clusters, copy's incrementals included, whatever SRC's own compression."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    xencbt(sim, "init", "--repo", str(src), "--compression", "none")
    backups(sim, src, vm, 3, history, data=text)
    assert all(compressed_clusters(p) == 0.0 for p in images(src, vm))
    xencbt(sim, "init", "--repo", str(dst), "--compression", "zstd")
    xencbt(sim, "copy", "--repo", str(src), "--to", str(dst))
    kinds = set()
    for path in images(dst, vm):
        info = header(path)
        assert info["format-specific"]["data"].get("compression-type") == "zstd", path.name
        assert compressed_clusters(path) > 0.0, path.name
        kinds.add("incremental" if info.get("backing-filename") else "full")
    assert kinds == {"full", "incremental"}
    for chain in manifests(dst, vm):
        assert {m["compression"] for m in chain.values()} == {"zstd"}
    xencbt(sim, "verify", "--repo", str(dst))
    same_as_model(sim, dst, vm, history, tmp_path)


@pytest.mark.parametrize("damaged", ["full", "incremental"])
def test_copy_refuses_a_damaged_source_point_full_or_incremental(sim, tmp_path, damaged):
    """#23: a point of SRC that does not read back as recorded is not copied, nor anything
    that needs it; SRC is named as the place to look; the other disk is copied."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    vm = Vm(sim)
    hit, other = first_in_uuid_order(vm)
    history: dict[str, list[bytes]] = {}
    xencbt(sim, "init", "--repo", str(src), "--compression", "none")
    backups(sim, src, vm, 2, history)
    full, incremental = sorted(history)
    bad = full if damaged == "full" else incremental
    corrupt_data_cluster(src / vm.uuid / vm.uuids[hit] / (bad + ".qcow2"))
    r = xencbt(sim, "copy", "--repo", str(src), "--to", str(dst), check=4)
    assert "point %s of VDI %s does not read back as recorded" % (bad, vm.uuids[hit]) in r.stderr
    assert "verify --repo %s" % src in r.stderr, r.stderr
    hit_chain = dst / vm.uuid / vm.uuids[hit]
    kept = sorted(p.name for p in hit_chain.glob("2*"))
    # Nothing of the damaged point, nor of any point whose view holds it.
    assert kept == ([] if damaged == "full" else [full + ".json", full + ".qcow2", full + ".sums"])
    # The other disk's points were copied; the VM points whose disks DST has (the full's,
    # when the incremental is damaged), not the others.
    assert list(manifests(dst, vm)[other]) == [full, incremental]
    vm_points = sorted(p.stem for p in (dst / vm.uuid / "points").glob("*Z.json"))
    assert vm_points == ([] if damaged == "full" else [full])


def corrupt_first_data_cluster(path: Path) -> int:
    """``corrupt_data_cluster`` of an uncompressed image; returns the guest offset of the
    cluster it damaged."""
    entries = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(path)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    entry = next(e for e in entries if e["data"] and e["depth"] == 0)
    corrupt_data_cluster(path)
    return entry["start"]


@pytest.mark.parametrize("damage", ["flipped bytes", "image missing"])
def test_a_damaged_target_chain_holds_back_that_chain_alone_and_full_copies_past_it(
    sim, tmp_path, damage
):
    """#24 finding 6: one damaged chain in DST does not block the copy of the VM's other
    disks; the message names DST's damaged chain (not SRC: SRC is intact) and the way on,
    ``copy --full``, which copies that chain's next point standalone."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    vm = Vm(sim)
    hit, other = first_in_uuid_order(vm)
    history: dict[str, list[bytes]] = {}
    xencbt(sim, "init", "--repo", str(src), "--compression", "none")
    backups(sim, src, vm, 2, history)
    xencbt(sim, "init", "--repo", str(dst), "--compression", "none")  # bytes to flip
    xencbt(sim, "copy", "--repo", str(src), "--to", str(dst))
    old = max(history)
    damaged = dst / vm.uuid / vm.uuids[hit] / (old + ".qcow2")
    spared = 0
    if damage == "flipped bytes":
        spared = corrupt_first_data_cluster(damaged)
    else:
        damaged.unlink()
    # The next point writes elsewhere: DST's damage stays in its view.
    away = (spared // BLOCK + 1) % 8 * BLOCK
    for disk in (0, 1):
        vm.write(disk, {away: text(BLOCK)})
    (got,) = backup(sim, src, "demo-vm")["vms"]
    new = got["point"]
    history[new] = [bytes(m) for m in vm.models]

    r = xencbt(sim, "--json", "copy", "--repo", str(src), "--to", str(dst), check=4)
    out = json.loads(r.stdout)
    assert out["copied"] == {vm.uuids[other]: [new]}
    assert list(out["held"]) == [vm.uuids[hit]]
    (line,) = [x for x in r.stderr.splitlines() if "not copied on" in x]
    assert vm.uuids[hit] in line and str(dst) in line and old in line, line
    assert "copy --repo %s --to %s %s --full" % (src, dst, vm.uuid) in line, line
    assert "verify --repo %s %s" % (dst, vm.uuids[hit]) in line, line
    assert "verify --repo %s" % src not in line, line
    chains = manifests(dst, vm)
    assert new not in chains[hit] and new in chains[other]
    assert not [p for p in dst.rglob("*") if p.name.startswith(new) and vm.uuids[hit] in str(p)]
    assert not (dst / vm.uuid / "points" / (new + ".json")).exists()

    # The way on: a forced full copy of that chain; the VM point follows.
    out = json.loads(
        xencbt(
            sim, "--json", "copy", "--repo", str(src), "--to", str(dst), "demo-vm", "--full"
        ).stdout
    )
    assert out["copied"] == {vm.uuids[hit]: [new]} and out["held"] == {}
    assert out["vm_points"] == {vm.uuid: [new]}
    m = manifests(dst, vm)[hit][new]
    assert m["base_point"] is None
    assert header(dst / vm.uuid / vm.uuids[hit] / (new + ".qcow2")).get("backing-filename") is None
    for disk, vdi in enumerate(vm.uuids):
        assert restored(sim, dst, tmp_path, vdi, new) == history[new][disk]
    # DST's damaged point stays, named by verify, until prune retires it.
    r = xencbt(sim, "verify", "--repo", str(dst), check=4)
    assert old in r.stdout and vm.uuids[hit] in r.stdout  # the report is on stdout
    xencbt(sim, "prune", "--repo", str(dst), "--keep-last", "1")
    xencbt(sim, "verify", "--repo", str(dst))
