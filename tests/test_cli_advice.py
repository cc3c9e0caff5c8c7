"""What xencbt tells a user who got something slightly wrong (issue #13 item 11): a restore
file's format from its name, a point named by a prefix of its id, an empty password on
stdin, a CA file that does not match the pool, and which point to restore instead of a
damaged one."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path

import pytest
from cli_support import BLOCK, XENCBT, Vm, cli_env, rand, sha, xencbt
from qemu_images import own_data_offset
from xencbt_core.trust import fingerprint


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M", in_use_wait=0.2)


def points(sim, repo: Path, vm: Vm, n: int, *extra: str) -> list[str]:
    made = []
    for i in range(n):
        vm.write(0, {i * BLOCK: rand(BLOCK)})
        r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo), *extra)
        made.append(json.loads(r.stdout)["vms"][0]["point"])
    return made


def file_format(path: Path) -> str:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True
    ).stdout
    return json.loads(out)["format"]


def test_restore_takes_the_format_from_the_name_or_refuses_to_guess(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    points(sim, repo, vm, 1)
    restore = ("restore", "--repo", str(repo), vm.uuids[0], "--to-file")
    xencbt(sim, *restore, str(tmp_path / "disk.qcow2"))
    assert file_format(tmp_path / "disk.qcow2") == "qcow2"
    xencbt(sim, *restore, str(tmp_path / "disk.img"))
    assert (tmp_path / "disk.img").read_bytes() == vm.models[0]
    r = xencbt(sim, *restore, str(tmp_path / "disk.bin"), check=2)
    assert (
        "cannot tell the format of %s from its name: give --format" % (tmp_path / "disk.bin")
        in r.stderr
    )
    assert not list(tmp_path.glob("disk.bin*"))
    xencbt(sim, *restore, str(tmp_path / "disk.bin"), "--format", "qcow2")
    assert file_format(tmp_path / "disk.bin") == "qcow2"


def test_at_takes_a_unique_prefix_of_a_point_id(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    first = points(sim, repo, vm, 1)[0]
    want = sha(vm.models[0])
    points(sim, repo, vm, 2)
    out = tmp_path / "first.raw"
    # The id less its last digit and "Z": points a backup apart differ long before.
    xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--at", first[:-2], "--to-file",
           str(out))  # fmt: skip
    assert sha(out.read_bytes()) == want
    ids = sorted(p.stem for p in (repo / vm.uuid / vm.uuids[0]).glob("*.json"))
    common = os.path.commonprefix(ids)
    assert common and len(ids) == 3
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--at", common, "--to-file",
               str(tmp_path / "x.raw"), check=1)  # fmt: skip
    assert "point %s of VDI %s is ambiguous: 3 points start with it" % (common, vm.uuids[0]) in (
        r.stderr
    )


def test_an_empty_password_on_stdin_is_named(sim):
    r = subprocess.run(
        [*XENCBT, "--xapi-cafile", sim.info["ca_file"], "--password-file", "-", "nbd", "status"],
        env=cli_env(sim),
        input="\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "the password read from stdin (--password-file -) is empty" in r.stderr


def test_a_wrong_ca_file_names_the_presented_certificate(sim, tmp_path):
    other = tmp_path / "other.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "1",
         "-subj", "/CN=not-the-pool"],
        check=True, capture_output=True,
    )  # fmt: skip
    pem = Path(sim.info["ca_file"]).read_text()
    presented = fingerprint(ssl.PEM_cert_to_DER_cert(pem))
    r = subprocess.run(
        [*XENCBT, "nbd", "status", "--xapi-cafile", str(other)],
        env=cli_env(sim),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert "against --xapi-cafile %s" % other in line  # the command's options, not the plugin's
    assert "SHA-256 fingerprint %s" % presented in line
    assert "--thumbprint pins it instead" in line
    assert "xapi-cafile=" not in line and "thumbprint=" not in line


def damage(image: Path, guest_offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(own_data_offset(image, guest_offset) + 100)
        f.write(b"\xde\xad\xbe\xef")


def test_after_a_damaged_point_the_nearest_intact_one_is_named(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    p0, p1, p2 = points(sim, repo, vm, 3)
    chain = repo / vm.uuid / vm.uuids[0]
    out = tmp_path / "out.raw"

    # The middle point's own data rots: the newer one reads block 1 from it, so the
    # nearest intact point is the older one.
    damage(chain / (p1 + ".qcow2"), 1 * BLOCK)
    for point in (p1, p2):
        r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--at", point,
                   "--to-file", str(out), check=4)  # fmt: skip
        assert "the nearest intact point is %s (older): --at %s" % (p0, p0) in r.stderr
    assert not out.exists()
    r = xencbt(sim, "verify", "--repo", str(repo), check=4)
    for point in (p1, p2):
        assert (
            "note   VDI %s: the nearest intact point to %s is %s (older)" % (vm.uuids[0], point, p0)
            in r.stdout
        )

    # A full backup after them, and the oldest point damaged too: for the newest damaged
    # point the nearest intact one is the newer full.
    (p3,) = points(sim, repo, vm, 1, "--full")
    damage(chain / (p0 + ".qcow2"), 0)
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--at", p2, "--to-file",
               str(out), check=4)  # fmt: skip
    assert "the nearest intact point is %s (newer): --at %s" % (p3, p3) in r.stderr
