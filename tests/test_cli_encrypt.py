"""Encryption at rest (#15) through the real CLI against the simulator: qcow2 LUKS images,
sealed sidecars, the key check.  Ground truth: the test's model of what the guest wrote;
the repository's bytes are searched for the guest's own marker."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import BLOCK, Vm, backup, backups, manifests, restored, same_as_model, xencbt
from crash_support import start, wait_gone
from encrypt_support import assert_marker_nowhere, init_encrypted, make_key, marked, tree_bytes
from qemu_images import image_info
from tally import tally
from vm_restore import check_disks, destroy_vm_and_disks, prepared, restore_vm, snapshot_of_vm
from vmdisk import serving

SEALED = b"XENCBT-SEALED-1\n"


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="2M+512", in_use_wait=0.5)


def test_encrypted_chain_backs_up_restores_verifies_prunes(sim, tmp_path, monkeypatch):
    key = make_key(tmp_path / "repo.key")
    repo = tmp_path / "repo"
    init_encrypted(sim, repo, key)
    k = ["--key-file", str(key)]
    monkeypatch.setenv("XENCBT_KEY_FILE", str(key))  # restored() gives no option
    vm = Vm(sim)
    models, points = [], []
    # The second point of Jan 2 goes with --keep-daily: a kept incremental is rebased
    # onto the kept full (encrypted rebase); --keep-last 1 then flattens the newest.
    days = ["2026-01-01T10:00:00", "2026-01-02T10:00:00", "2026-01-02T11:00:00"]
    for step, when in enumerate([*days, "2026-01-03T10:00:00"]):
        vm.write(0, {step * 3 * BLOCK: marked(2 * BLOCK), 20 * BLOCK: None})
        models.append(bytes(vm.models[0]))
        monkeypatch.setenv("XENCBT_NOW", when)
        points.append(backup(sim, repo, *k, "demo-vm")["vms"][0]["disks"][0])
    monkeypatch.delenv("XENCBT_NOW")
    assert [p["type"] for p in points] == ["full"] + ["incremental"] * 3
    chain = repo / vm.uuid / vm.uuids[0]
    for p in points:
        info = image_info(chain / (p["point"] + ".qcow2"))
        assert info["encrypted"] is True
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        assert (chain / (p["point"] + ".sums")).read_bytes().startswith(SEALED)
    # Restores read the whole encrypted chain: byte-identical with the guest's model.
    for p, model in zip(points, models, strict=True):
        assert restored(sim, repo, tmp_path, vm.uuids[0], p["point"]) == model
    xencbt(sim, *k, "verify", "--repo", str(repo))
    assert assert_marker_nowhere(repo) >= 12

    xencbt(sim, "prune", "--repo", str(repo), "--keep-daily", "3")
    gone = points.pop(1)
    models.pop(1)
    assert sorted(p.stem for p in chain.glob("*.qcow2")) == [p["point"] for p in points]
    assert image_info(chain / (points[1]["point"] + ".qcow2"))["backing-filename"] == (
        points[0]["point"] + ".qcow2"
    )
    assert gone["point"] not in xencbt(sim, "list", "--repo", str(repo)).stdout
    for p, model in zip(points, models, strict=True):
        assert image_info(chain / (p["point"] + ".qcow2"))["encrypted"] is True
        assert restored(sim, repo, tmp_path, vm.uuids[0], p["point"]) == model
    xencbt(sim, "verify", "--repo", str(repo))

    xencbt(sim, *k, "prune", "--repo", str(repo), "--keep-last", "1")
    (kept,) = chain.glob("*.qcow2")
    assert kept.stem == points[-1]["point"] and "backing-filename" not in image_info(kept)
    assert image_info(kept)["encrypted"] is True
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == models[-1]
    vm.write(0, {5 * BLOCK: marked(BLOCK)})
    after = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    assert after["type"] == "incremental"
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == bytes(vm.models[0])
    xencbt(sim, "verify", "--repo", str(repo))
    assert_marker_nowhere(repo)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_init_refuses_compression_and_weak_keys(sim, tmp_path):
    key = make_key(tmp_path / "repo.key")
    repo = tmp_path / "repo"
    init = ["init", "--repo", str(repo), "--encrypt"]
    # qemu cannot compress and encrypt one qcow2: a usage error, nothing created.
    r = xencbt(sim, "--key-file", str(key), *init, "--compression", "zstd", check=2)
    assert "uncompressed" in one_line(r.stderr) and not repo.exists()
    r = xencbt(sim, *init, check=2)
    assert "--key-file" in one_line(r.stderr) and not repo.exists()
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")
    r = xencbt(sim, "--key-file", str(short), *init, check=2)
    assert "fewer than 32" in one_line(r.stderr) and not repo.exists()
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe" + os.urandom(40))
    r = xencbt(sim, "--key-file", str(binary), *init, check=2)
    assert "not UTF-8" in one_line(r.stderr) and not repo.exists()
    xencbt(sim, "--key-file", str(key), *init, "--compression", "none")
    assert "encryption = luks" in (repo / "repository.conf").read_text()


def test_wrong_or_missing_key_fails_before_anything_is_written(sim, tmp_path):
    key = make_key(tmp_path / "repo.key")
    wrong = make_key(tmp_path / "wrong.key")
    repo = tmp_path / "repo"
    init_encrypted(sim, repo, key)
    vm = Vm(sim)
    vm.write(0, {0: marked(BLOCK)})
    (point,) = [backup(sim, repo, "--key-file", str(key), "demo-vm")["vms"][0]["disks"][0]]
    before = tree_bytes(repo)
    vdis, vms = len(vm.x.VDI.get_all()), len(vm.x.VM.get_all())
    vm.write(0, {BLOCK: marked(BLOCK)})
    out = tmp_path / "restored.raw"
    dst = tmp_path / "dst"
    runs = [
        ["backup", "demo-vm", "--repo", str(repo)],
        ["backup", "demo-vm", "--repo", str(repo), "--full"],
        ["restore", "--repo", str(repo), vm.uuids[0], "--to-file", str(out)],
        ["verify", "--repo", str(repo)],
        ["prune", "--repo", str(repo), "--keep-last", "1"],
        ["repair", "--repo", str(repo)],
        ["copy", "--repo", str(repo), "--to", str(dst)],
        ["serve", "--repo", str(repo), vm.uuids[0]],
        ["files", "ls", "--repo", str(repo), "demo-vm"],
        ["restore-vm", "--repo", str(repo), "demo-vm", "--to-sr", "Local storage"],
    ]
    for args in runs:
        r = xencbt(sim, "--key-file", str(wrong), *args, check=6)
        line = one_line(r.stderr)
        assert "is not the key of repository" in line and str(wrong) in line, line
        r = xencbt(sim, *args, check=2)
        assert "is encrypted: give its key file" in one_line(r.stderr)
        # Nothing written: not a byte, not a mode; no snapshot taken on the host.
        assert tree_bytes(repo) == before, args
        assert (len(vm.x.VDI.get_all()), len(vm.x.VM.get_all())) == (vdis, vms)
        assert not out.exists() and not dst.exists()
    # list reads only the clear manifests: no key needed (nor shown: no key check).
    assert point["point"] in xencbt(sim, "list", "--repo", str(repo)).stdout
    listed = json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout)
    assert listed["settings"] == {"compression": "none", "encryption": "luks"}
    # key_file= in the config file is the third way to give the key.
    conf = tmp_path / "xencbt.conf"
    conf.write_text("[xencbt]\nkey_file = %s\n" % key)
    xencbt(sim, "--config", str(conf), "verify", "--repo", str(repo))
    conf.write_text("[xencbt]\nkey_file = %s\n" % wrong)
    r = xencbt(sim, "--config", str(conf), "verify", "--repo", str(repo), check=6)
    assert "is not the key of repository" in one_line(r.stderr)
    assert tree_bytes(repo) == before
    # A sealed checksum file changed by one bit no longer opens: verify names it.
    (sums,) = repo.rglob("*.sums")
    data = bytearray(sums.read_bytes())
    data[-1] ^= 1
    sums.write_bytes(bytes(data))
    r = xencbt(sim, "--key-file", str(key), "verify", "--repo", str(repo), check=4)
    assert "checksum file" in r.stdout and "does not decrypt" in r.stdout


def test_serve_copy_and_vm_configuration_of_an_encrypted_repository(sim, tmp_path):
    key, other = make_key(tmp_path / "a.key"), make_key(tmp_path / "b.key")
    src, dst, plain = tmp_path / "src", tmp_path / "dst", tmp_path / "plain"
    init_encrypted(sim, src, key)
    init_encrypted(sim, dst, other)
    vm = Vm(sim)
    models = []
    for step in range(2):
        vm.write(0, {step * 4 * BLOCK: marked(2 * BLOCK)})
        models.append(bytes(vm.models[0]))
        backup(sim, src, "--key-file", str(key), "demo-vm")
    # The VM configuration (vTPM, NVRAM) is sealed; manifests are clear.
    configs = sorted((src / vm.uuid / "points").glob("*.config.json"))
    assert len(configs) == 2
    for c in configs:
        data = c.read_bytes()
        assert data.startswith(SEALED) and b"demo-vm" not in data
    listed = json.loads(xencbt(sim, "--json", "list", "--repo", str(src)).stdout)
    assert listed["settings"]["encryption"] == "luks"

    # serve: qemu-nbd opens the encrypted chain; nbdinfo and qemu-img read it.
    with serving(sim, "--key-file", str(key), "--repo", str(src), vm.uuids[0]) as (info, _):
        size = subprocess.run(
            ["nbdinfo", "--size", info["uri"]], capture_output=True, text=True, timeout=60
        )
        assert int(size.stdout) == len(models[-1])
        out = tmp_path / "served.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", info["uri"], str(out)],
            check=True,
            timeout=120,
        )
        assert out.read_bytes() == models[-1]

    # copy re-encrypts with DST's key, and decrypts into a clear DST.
    xencbt(
        sim,
        "--key-file",
        str(key),
        "copy",
        "--repo",
        str(src),
        "--to",
        str(dst),
        "--to-key-file",
        str(other),
    )
    xencbt(
        sim, "--key-file", str(key), "copy", "--repo", str(src), "--to", str(plain),
        "--to-encryption", "none",
    )  # fmt: skip
    chain = dst / vm.uuid / vm.uuids[0]
    images = sorted(chain.glob("*.qcow2"))
    assert len(images) == 2 and all(image_info(p)["encrypted"] for p in images)
    assert_marker_nowhere(dst)
    # Read with qemu-img alone and DST's key: the images are LUKS under that key.
    newest = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(images[1])},
        "encrypt": {"key-secret": "k"},
        "backing": {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(images[0])},
            "encrypt": {"key-secret": "k"},
        },
    }
    for secret, ok in ((other, True), (key, False)):
        out = tmp_path / "direct.raw"
        r = subprocess.run(
            [
                "qemu-img",
                "convert",
                "--object",
                "secret,id=k,file=%s" % secret,
                "json:" + json.dumps(newest),
                "-O",
                "raw",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (r.returncode == 0) == ok, r.stderr
        if ok:
            assert out.read_bytes() == models[-1]
            out.unlink()
    for repo, k in ((dst, other), (plain, None)):
        args = ["--key-file", str(k)] if k else []
        for point, model in zip(sorted(p.stem for p in images), models, strict=True):
            got = tmp_path / "r.raw"
            xencbt(
                sim,
                *args,
                "restore",
                "--repo",
                str(repo),
                vm.uuids[0],
                "--at",
                point,
                "--to-file",
                str(got),
            )
            assert got.read_bytes() == model
            got.unlink()
        xencbt(sim, *args, "verify", "--repo", str(repo))
    # The VM points came along: DST's configuration sealed under DST's key, the clear
    # copy's in clear; each copy checked the configuration's sha256 as read and written.
    for c in sorted((dst / vm.uuid / "points").glob("*.config.json")):
        assert c.read_bytes().startswith(SEALED)
    for c in sorted((plain / vm.uuid / "points").glob("*.config.json")):
        assert json.loads(c.read_bytes())["vm"]
    r = xencbt(sim, "--key-file", str(key), "verify", "--repo", str(dst), check=6)
    assert "is not the key of repository" in one_line(r.stderr)


def test_restore_vm_from_an_encrypted_repository(xensim, tmp_path, monkeypatch):
    """The VM configuration (vTPM, NVRAM) is sealed, and restore-vm rebuilds the same VM
    from it, with disks restored to the SR through the encrypted chains."""
    key = make_key(tmp_path / "repo.key")
    repo = tmp_path / "repo"
    init_encrypted(xensim, repo, key)
    monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    vm, before, truth = prepared(xensim, repo)
    (config,) = (repo / vm.uuid / "points").glob("*.config.json")
    vtpm = before["vtpm"][0].encode()
    for name, (_, data) in tree_bytes(repo).items():
        assert vtpm not in data, name
    assert config.read_bytes().startswith(SEALED)
    destroy_vm_and_disks(vm.x, vm.ref)
    out, r = restore_vm(xensim, repo)
    new = snapshot_of_vm(vm.x, vm.x.VM.get_by_uuid(out["vm_uuid"]))
    for what in ("name", "config", "vifs", "vtpm"):
        assert new[what] == before[what], what
    check_disks(xensim, vm.x, new, truth)
    xencbt(xensim, "verify", "--repo", str(repo))
    # A sealed configuration changed by one bit no longer opens: verify names it.
    data = bytearray(config.read_bytes())
    data[-1] ^= 1
    config.write_bytes(bytes(data))
    r = xencbt(xensim, "verify", "--repo", str(repo), check=4)
    assert "configuration" in r.stdout


@pytest.mark.reliability
@pytest.mark.timeout(900)  # every new LUKS image costs qemu's PBKDF benchmark (1-3 s)
def test_reencrypting_copy_killed_at_random_moments_then_rerun_is_complete(
    xensim_factory, tmp_path, monkeypatch
):
    """copy from a repository under key A into one under key B, SIGKILLed at random
    moments: the re-run leaves DST complete, verifying under B, restoring as the guest
    wrote, with nothing half-written and no marker in clear."""
    sim = xensim_factory(disk_sizes="1M,512K", in_use_wait=0.5)
    key, other = make_key(tmp_path / "a.key"), make_key(tmp_path / "b.key")
    src, scratch, dst = tmp_path / "src", tmp_path / "scratch", tmp_path / "dst"
    init_encrypted(sim, src, key)
    for repo in (scratch, dst):
        init_encrypted(sim, repo, other)
    monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    to = ["--to-key-file", str(other)]
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    vm.write(0, {0: marked(BLOCK)})
    backups(sim, src, vm, 2, history)
    xencbt(sim, "copy", "--repo", str(src), "--to", str(scratch), *to)
    # The time a copy of one new point per disk takes (see test_cli_copy).
    backups(sim, src, vm, 1, history)
    t0 = time.monotonic()
    xencbt(sim, "copy", "--repo", str(src), "--to", str(scratch), *to)
    duration = time.monotonic() - t0
    rng = random.Random(1516)
    killed = 0
    for _ in range(4):
        backups(sim, src, vm, 1, history)
        proc = start(sim, "copy", "--repo", str(src), "--to", str(dst), *to)
        time.sleep(rng.uniform(0, duration))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        left = wait_gone(proc.pid, time.monotonic() + 5.0)
        for entry in left:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        assert not left, "still running 5 s after the kill: %s" % left
    tally("kills survived", killed)
    assert killed >= 2
    # Every point the kills left uncopied, each new LUKS image 2-3 s of qemu's PBKDF
    # benchmark: more than the usual 120 s on a loaded machine (it once was, in CI).
    xencbt(sim, "copy", "--repo", str(src), "--to", str(dst), *to, timeout=600)
    r = xencbt(sim, "copy", "--repo", str(src), "--to", str(dst), *to)
    assert "nothing to copy" in r.stderr
    assert [list(c) for c in manifests(dst, vm)] == [sorted(history)] * 2
    assert not [p for p in dst.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert all(image_info(p)["encrypted"] for p in dst.rglob("*.qcow2"))
    assert_marker_nowhere(dst)
    monkeypatch.setenv("XENCBT_KEY_FILE", str(other))
    xencbt(sim, "verify", "--repo", str(dst))
    same_as_model(sim, dst, vm, history, tmp_path)


def settings_of(repo: Path) -> str:
    return (repo / "repository.conf").read_text()


def test_a_key_given_never_leaves_a_new_repository_clear(sim, tmp_path, monkeypatch):
    """#24 finding 1: a copy of an encrypted repository is encrypted unless
    --to-encryption none says otherwise; a key given to init or to the first backup of a
    repository (option, config file, environment) means an encrypted repository."""
    key = make_key(tmp_path / "repo.key")
    src = tmp_path / "src"
    init_encrypted(sim, src, key)
    vm = Vm(sim)
    vm.write(0, {0: marked(BLOCK)})
    backup(sim, src, "--key-file", str(key), "demo-vm")
    k = ["--key-file", str(key)]

    # copy into a new DST: encrypted under the key at hand (here SRC's), said so.
    new = tmp_path / "new"
    r = xencbt(sim, *k, "copy", "--repo", str(src), "--to", str(new))
    assert "encryption luks" in r.stderr and "encryption none" not in r.stderr
    assert "encryption = luks" in settings_of(new)
    assert all(image_info(p)["encrypted"] for p in new.rglob("*.qcow2"))
    configs = list(new.rglob("*.config.json"))
    assert configs and all(c.read_bytes().startswith(SEALED) for c in configs)
    assert_marker_nowhere(new)
    xencbt(sim, *k, "verify", "--repo", str(new))

    # An existing clear DST is refused, nothing copied; --to-encryption none is the way.
    clear = tmp_path / "clear"
    xencbt(sim, "init", "--repo", str(clear))
    r = xencbt(sim, *k, "copy", "--repo", str(src), "--to", str(clear), check=2)
    assert "--to-encryption none" in one_line(r.stderr)
    assert [p.name for p in clear.iterdir()] == ["repository.conf"]
    to_none = ["copy", "--repo", str(src), "--to", str(clear), "--to-encryption", "none"]
    # ... but not with a key for DST: a key given where nothing would be encrypted.
    r = xencbt(sim, *k, *to_none, "--to-key-file", str(key), check=2)
    assert "--to-key-file" in one_line(r.stderr)
    assert [p.name for p in clear.iterdir()] == ["repository.conf"]
    xencbt(sim, *k, *to_none)
    assert (clear / vm.uuid).is_dir()

    # The first backup of a repository with a key (option, then config file): encrypted.
    conf = tmp_path / "xencbt.conf"
    conf.write_text("[xencbt]\nkey_file = %s\n" % key)
    for name, how in (("by-option", k), ("by-config", ["--config", str(conf)])):
        repo = tmp_path / name
        r = xencbt(sim, *how, "backup", "demo-vm", "--repo", str(repo))
        assert "encryption luks" in r.stderr, r.stderr
        assert "encryption = luks" in settings_of(repo)
        assert all(image_info(p)["encrypted"] for p in repo.rglob("*.qcow2"))
        assert_marker_nowhere(repo)
        xencbt(sim, *k, "verify", "--repo", str(repo))

    # init with a key (here from the environment) and no --encrypt: encrypted too;
    # --encryption none is the explicit way to a clear one, said plainly.
    monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    r = xencbt(sim, "init", "--repo", str(tmp_path / "init"))
    assert "encryption luks" in r.stderr
    assert "encryption = luks" in settings_of(tmp_path / "init")
    r = xencbt(sim, "init", "--repo", str(tmp_path / "plain"), "--encryption", "none")
    assert "encryption none" in r.stderr and "not used" in r.stderr
    assert "encryption = none" in settings_of(tmp_path / "plain")
