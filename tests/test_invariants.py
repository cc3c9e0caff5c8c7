"""The repository's invariants (issue #23), through the real CLI on the simulator:
``verify`` names each breach (orchestrate/xencbt_cli/repo/invariants.py), ``repair`` mends what
it provably can (mend.py), and the tests' own check (tests/invariants.py, run after every
repository-writing command by cli_support.xencbt) sees the same breaches."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import invariants
import pytest
from cli_support import BLOCK, Vm, rand, xencbt
from encrypt_support import make_key
from qemu_images import corrupt_data_cluster
from tally import tally


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,512K", in_use_wait=0.5)


def backup(sim, repo: Path, *extra: str) -> str:
    """One backup of demo-vm; its point id."""
    r = xencbt(sim, *extra, "--json", "backup", "demo-vm", "--repo", str(repo))
    (vm,) = json.loads(r.stdout)["vms"]
    assert vm["ok"], vm
    return vm["point"]


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def header(path: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", str(path)))["format-specific"]["data"]


def compressed_clusters(path: Path) -> int:
    return json.loads(qemu_img("check", "--output=json", "-U", str(path))).get(
        "compressed-clusters", 0
    )


def breaches(repo: Path) -> list[str]:
    return invariants.breaches(repo)


def test_verify_names_a_clear_image_in_an_encrypted_repository(sim, tmp_path):
    repo, key = tmp_path / "repo", make_key(tmp_path / "repo.key")
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK)})
    point = backup(sim, repo, "--key-file", str(key))
    image = repo / vm.uuid / vm.uuids[0] / (point + ".qcow2")
    assert header(image)["encrypt"]["format"] == "luks"
    xencbt(sim, "--key-file", str(key), "verify", "--repo", str(repo))

    # The same data, in clear (what a writer that forgot the key would leave): it reads
    # back as recorded, so only the repository's promise tells.
    clear = tmp_path / "clear.qcow2"
    qemu_img("convert", "--object", "secret,id=k,file=%s" % key, "--image-opts",
             "driver=qcow2,file.filename=%s,encrypt.key-secret=k" % image,
             "-O", "qcow2", str(clear))  # fmt: skip
    os.replace(clear, image)
    os.chmod(image, 0o600)
    tally("faults injected")
    r = xencbt(sim, "--key-file", str(key), "verify", "--repo", str(repo), check=4)
    assert (
        "FAILED VDI %s point %s: image %s.qcow2 is NOT encrypted, in an encrypted repository"
        % (vm.uuids[0], point, point)
        in r.stdout
    ), r.stdout
    assert "1 of 2 points failed verification" in r.stderr
    assert any("is not LUKS-encrypted in an encrypted repository" in b for b in breaches(repo))


def test_verify_names_an_uncompressed_image_in_a_zstd_repository(sim, tmp_path):
    repo = tmp_path / "repo"
    xencbt(sim, "init", "--repo", str(repo), "--compression", "zstd")
    vm = Vm(sim)
    vm.write(
        0, {i * BLOCK: b"compressible " * (BLOCK // 13) + b"x" * (BLOCK % 13) for i in range(4)}
    )
    first = backup(sim, repo)
    vm.write(0, {8 * BLOCK: b"A" * BLOCK})
    second = backup(sim, repo)
    chain = repo / vm.uuid / vm.uuids[0]
    # Backup writes zstd clusters, compressed where they shrink (full and incremental) ...
    for point in (first, second):
        image = chain / (point + ".qcow2")
        assert header(image)["compression-type"] == "zstd"
        assert compressed_clusters(image) > 0, point
    # ... and so does prune's rewrite of the kept point.
    vm.write(0, {9 * BLOCK: b"B" * BLOCK})
    third = backup(sim, repo)
    xencbt(sim, "prune", "--repo", str(repo), "--keep", "1")
    kept = chain / (third + ".qcow2")
    assert header(kept)["compression-type"] == "zstd" and compressed_clusters(kept) > 0

    # The same data rewritten without compression (zlib is qemu's default type).
    plain = tmp_path / "plain.qcow2"
    qemu_img("convert", "-O", "qcow2", str(kept), str(plain))
    os.replace(plain, kept)
    os.chmod(kept, 0o600)
    tally("faults injected")
    r = xencbt(sim, "verify", "--repo", str(repo), vm.uuids[0], check=4)
    assert (
        "FAILED VDI %s point %s: image %s.qcow2 has compression-type zlib, not the zstd its "
        "manifest records" % (vm.uuids[0], third, third) in r.stdout
    ), r.stdout
    assert any("compression-type zlib in a zstd repository" in b for b in breaches(repo))


def test_verify_names_open_modes_and_repair_mends_them(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    point = backup(sim, repo)
    sums = repo / vm.uuid / vm.uuids[1] / (point + ".sums")
    os.chmod(sums, 0o644)
    tally("faults injected")
    r = xencbt(sim, "verify", "--repo", str(repo))
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("WARN")]
    assert (
        "1 directories and files are open to other users: %s/%s/%s.sums (0644)"
        % (
            vm.uuid,
            vm.uuids[1],
            point,
        )
        in line
        and "xencbt repair makes them so" in line
    )
    assert breaches(repo) == ["%s has mode 0644, not 0600" % sums]

    r = xencbt(sim, "repair", "--repo", str(repo))
    assert "made 1 directories and files of %s private" % repo in r.stderr
    assert sums.stat().st_mode & 0o777 == 0o600 and breaches(repo) == []
    r = xencbt(sim, "verify", "--repo", str(repo))
    assert "WARN" not in r.stdout and "2 points verified" in r.stdout


def test_verify_names_a_manifest_without_its_image(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    backup(sim, repo)
    vm.write(0, {0: rand(BLOCK)})
    point = backup(sim, repo)
    (repo / vm.uuid / vm.uuids[0] / (point + ".qcow2")).unlink()
    tally("faults injected")
    r = xencbt(sim, "verify", "--repo", str(repo), check=4)
    assert (
        "FAILED VDI %s point %s: its manifest is there but its image %s.qcow2 is missing"
        % (vm.uuids[0], point, point)
        in r.stdout
    )
    # The VM point of that run is not "ok": one of its disks failed.
    assert (
        "FAILED VM %s point %s: its configuration is sound, but its disk 0"
        % (
            vm.uuid,
            point,
        )
        in r.stdout
    )
    assert "ok     VM %s point %s" % (vm.uuid, point) not in r.stdout
    assert any("has no image %s.qcow2" % point in b for b in breaches(repo))


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
def test_repair_rebuilds_a_missing_sums_only_from_an_intact_image(sim, tmp_path, encrypted):
    repo = tmp_path / "repo"
    keys = ["--key-file", str(make_key(tmp_path / "repo.key"))] if encrypted else []
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK), 5 * BLOCK: rand(BLOCK)})
    older = backup(sim, repo, *keys)
    vm.write(0, {2 * BLOCK: rand(BLOCK)})
    newest = backup(sim, repo, *keys)
    chain = repo / vm.uuid / vm.uuids[0]
    recorded = {p: (chain / (p + ".sums")).read_bytes() for p in (older, newest)}
    for p in (older, newest):
        (chain / (p + ".sums")).unlink()
    tally("faults injected", 2)

    r = xencbt(sim, *keys, "verify", "--repo", str(repo), check=4)
    lines = {
        p: [x for x in r.stdout.splitlines() if "%s point %s:" % (vm.uuids[0], p) in x]
        for p in (older, newest)
    }
    for p in (older, newest):
        (line,) = lines[p]
        assert "its checksum file %s.sums is missing" % p in line
        assert "the data itself matches the manifest: xencbt repair rebuilds it" in line
    # #24 finding 8: only the newest point's sums decide whether the next backup is full.
    assert "next backup" not in lines[older][0]
    assert "until then the next backup of this VDI is a full one" in lines[newest][0]

    r = xencbt(sim, *keys, "--json", "repair", "--repo", str(repo))
    done = json.loads(r.stdout)
    assert sorted(done["sums_rebuilt"]) == ["%s/%s" % (vm.uuids[0], p) for p in (older, newest)]
    assert done["not_mended"] == []
    assert "rebuilt from the image, which reads back as recorded" in r.stderr
    if encrypted:  # sealed again: a new nonce, the same content
        assert all(
            (chain / (p + ".sums")).read_bytes()[:16] == b"XENCBT-SEALED-1\n" for p in recorded
        )
    else:
        assert {p: (chain / (p + ".sums")).read_bytes() for p in recorded} == recorded
    r = xencbt(sim, *keys, "verify", "--repo", str(repo))
    assert "4 points verified" in r.stdout

    # An image that no longer reads back as recorded gets no sums made up.
    if encrypted:
        return  # (a LUKS cluster cannot be hit blindly; the clear case shows the rule)
    corrupt_data_cluster(chain / (older + ".qcow2"))
    (chain / (older + ".sums")).unlink()
    tally("faults injected", 2)
    r = xencbt(sim, "repair", "--repo", str(repo), check=1)
    assert (
        "VDI %s point %s: its checksum file %s.sums is missing, and it cannot be rebuilt: the "
        "image no longer reads back as recorded at backup time"
        % (vm.uuids[0], older, older)
        in r.stderr
    )
    assert "1 point(s) could not be mended" in r.stderr
    assert not (chain / (older + ".sums")).exists()


def test_verify_and_prune_report_on_stdout_and_take_vms(sim, tmp_path):
    repo, key = tmp_path / "repo", make_key(tmp_path / "repo.key")
    vm = Vm(sim)
    p0 = backup(sim, repo, "--key-file", str(key))
    vm.write(0, {0: rand(BLOCK)})
    p1 = backup(sim, repo, "--key-file", str(key))

    # verify by VM name: both disks and the VM points; the report on stdout.
    r = xencbt(sim, "--key-file", str(key), "verify", "--repo", str(repo), "demo-vm")
    assert "4 points verified" in r.stdout and "ok     VM %s point %s" % (vm.uuid, p1) in r.stdout
    assert "points verified" not in r.stderr
    r = xencbt(sim, "--key-file", str(key), "verify", "--repo", str(repo), vm.uuid[:8])
    assert "4 points verified" in r.stdout
    r = xencbt(sim, "--key-file", str(key), "repair", "--repo", str(repo), "demo-vm")
    assert "nothing to repair" in r.stderr

    # A plan needs no key: it reads only the manifests.
    before = sorted(p.name for p in repo.rglob("*"))
    r = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1", "--dry-run")
    assert "would go %s" % p0 in r.stdout and "would remove 2 points of 2 VDIs" in r.stdout
    assert not r.stderr.strip(), r.stderr
    assert sorted(p.name for p in repo.rglob("*")) == before

    # Every point of a VDI damaged: said once for the VDI, not once per point.
    for p in (repo / vm.uuid / vm.uuids[1]).glob("*.qcow2"):
        p.unlink()
    tally("faults injected", 2)
    r = xencbt(sim, "--key-file", str(key), "verify", "--repo", str(repo), check=4)
    assert r.stdout.count("FAILED VDI %s" % vm.uuids[1]) == 2
    assert r.stdout.count("no point of this VDI is intact") == 1
