"""The small things a new administrator tripped over in the second week (issue #24
finding 9): abbreviated options, usage codes, help texts, point prefixes for files, key
files as password vaults hand them out, list after prune and with huge ratios, tools
named twice in one error, restore-vm's summary, init on a folder the admin made."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import BLOCK, Vm, backup, rand, xencbt
from secretwatch import WATCH


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M", in_use_wait=0.2)


def test_abbreviations_are_refused_and_a_bad_network_pair_is_a_usage_error(sim, tmp_path):
    repo = str(tmp_path / "repo")
    r = xencbt(sim, "prune", "--repo", repo, "--keep-w", "3", check=2)
    assert "unrecognized arguments: --keep-w" in r.stderr
    r = xencbt(sim, "list", "--rep", repo, check=2)
    assert "--rep" in r.stderr and not Path(repo).exists()
    r = xencbt(sim, "restore-vm", "demo-vm", "--repo", repo, "--to-sr", "x", "--network", "foo",
               check=2)  # fmt: skip
    assert "'foo' is not FROM=TO" in r.stderr
    r = xencbt(sim, "restore", "--help")
    assert "--repo DIR            the repository" in r.stdout
    assert "--to-file PATH        write the disk into this file" in r.stdout
    assert "--salvage" in r.stdout
    for command in ("backup", "list", "verify", "prune", "serve", "files", "forget"):
        r = xencbt(sim, command, "--help")
        assert "--repo DIR" in r.stdout and "the repository" in r.stdout, command


def test_xensim_serve_help_explains_its_options():
    r = subprocess.run(
        [sys.executable, "-m", "xensim.main", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    options = [i for i, line in enumerate(lines) if re.match(r"  --", line)]
    assert len(options) >= 12
    for i in options:
        # argparse puts the help beside the option, or under it when the option is long
        beside = re.match(r"  --\S+( \S+)?  +\S", lines[i])
        under = i + 1 < len(lines) and re.match(r" {20,}\S", lines[i + 1])
        assert beside or under, lines[i]
    assert "serve.json" in r.stdout


def key_text() -> str:
    text = base64.b64encode(os.urandom(48)).decode()
    WATCH.register(text)
    return text


def write(path: Path, data: str) -> Path:
    path.write_bytes(data.encode())
    path.chmod(0o600)
    return path


def test_a_key_file_is_the_same_key_without_its_newline_or_with_crlf(sim, tmp_path):
    vm = Vm(sim)
    text = key_text()
    unix = write(tmp_path / "key", text + "\n")  # openssl rand -base64 48 > FILE
    bare = write(tmp_path / "key.bare", text)  # a vault's copy, no newline
    crlf = write(tmp_path / "key.crlf", text + "\r\n")
    repo = tmp_path / "repo"
    xencbt(sim, "--key-file", str(unix), "init", "--repo", str(repo))
    vm.write(0, {0: rand(BLOCK)})
    backup(sim, repo, "--key-file", str(bare), "demo-vm")  # writes LUKS images
    vm.write(0, {3 * BLOCK: rand(BLOCK)})
    backup(sim, repo, "--key-file", str(crlf), "demo-vm")
    for key in (unix, bare, crlf):
        out = tmp_path / ("disk-%s.raw" % key.name)
        xencbt(sim, "--key-file", str(key), "restore", "--repo", str(repo), vm.uuids[0],
               "--to-file", str(out))  # fmt: skip
        assert out.read_bytes() == vm.models[0], key.name
    xencbt(sim, "--key-file", str(unix), "verify", "--repo", str(repo))
    # A repository made with a key file without a newline opens with one.
    other = tmp_path / "other"
    xencbt(sim, "--key-file", str(bare), "init", "--repo", str(other))
    backup(sim, other, "--key-file", str(bare), "demo-vm")
    xencbt(sim, "--key-file", str(unix), "verify", "--repo", str(other))
    # Whitespace is all that is forgiven.
    wrong = write(tmp_path / "key.wrong", text[:-1] + "\n")
    r = xencbt(sim, "--key-file", str(wrong), "verify", "--repo", str(repo), check=6)
    assert "is not the key of repository" in r.stderr


def test_files_at_takes_a_unique_prefix(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    made = []
    for i in range(2):
        vm.write(0, {i * BLOCK: rand(BLOCK)})
        made.append(backup(sim, repo, "demo-vm")["vms"][0]["point"])
    common = os.path.commonprefix(made)
    r = xencbt(sim, "files", "ls", "--repo", str(repo), "demo-vm", "--at", common, check=1)
    assert "point %s of demo-vm is ambiguous: 2 points start with it" % common in r.stderr
    # A unique prefix names its point: the run goes on to read the guest's key file.
    missing = tmp_path / "no-such-key"
    r = xencbt(sim, "files", "ls", "--repo", str(repo), "demo-vm", "--at", made[0][:-2],
               "--guest-key-file", str(missing), check=1)  # fmt: skip
    assert "no point" not in r.stderr and str(missing) in r.stderr


def test_list_after_prune_and_with_a_huge_ratio_keeps_its_columns(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    for i in range(3):
        vm.write(0, {i * BLOCK: rand(BLOCK)})
        backup(sim, repo, "demo-vm")
    xencbt(sim, "prune", "--repo", str(repo), "--keep-last", "1")
    listed = json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout)
    (row,) = [d for v in listed["vms"] for p in v["points"] for d in p["disks"]]
    # The kept point holds what the pruned ones had: the chain's base, a full now.
    assert row["type"] == "full" and row["merged"] is True and row["ratio"] is None
    text = xencbt(sim, "list", "--repo", str(repo)).stdout
    (line,) = [t for t in text.splitlines() if t.strip().startswith("disk ")]
    assert " full " in line and "changed (merged)" in line and "incremental" not in line

    # A point whose changed bytes compress 10^6:1 (a disk of zeros written as data).
    vm.write(0, {0: rand(BLOCK)})
    point = backup(sim, repo, "demo-vm")["vms"][0]["point"]
    manifest = repo / vm.uuid / vm.uuids[0] / (point + ".json")
    data = json.loads(manifest.read_text())
    data["changed_bytes"] = data["bytes_on_disk"] * 1_000_000
    manifest.write_text(json.dumps(data))
    text = xencbt(sim, "list", "--repo", str(repo)).stdout
    rows = [t for t in text.splitlines() if t.strip().startswith("disk ")]
    assert len(rows) == 2 and "zstd >999:1" in rows[1]
    assert rows[0].index(" size ") == rows[1].index(" size "), rows


def test_a_tool_is_named_once_in_its_error(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    point = backup(sim, repo, "demo-vm")["vms"][0]["point"]
    (repo / vm.uuid / vm.uuids[0] / (point + ".qcow2")).write_bytes(b"not an image\n" * 100)
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-file",
               str(tmp_path / "x.raw"), check=1)  # fmt: skip
    assert "qemu-img failed (exit 1): " in r.stderr
    assert "qemu-img failed (exit 1): qemu-img:" not in r.stderr


def test_restore_vm_names_the_new_vm(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK)})
    point = backup(sim, repo, "demo-vm")["vms"][0]["point"]
    r = xencbt(sim, "restore-vm", "--repo", str(repo), "demo-vm", "--to-sr", "Local storage",
               "--name", "copy")  # fmt: skip
    new = r.stdout.strip()
    assert new != vm.uuid
    assert "restored VM copy (uuid %s, new) from point %s of VM %s" % (new, point, vm.uuid) in (
        r.stderr
    )


def test_init_makes_an_empty_folder_private_and_refuses_a_shared_one(sim, tmp_path):
    empty = tmp_path / "made-by-admin"
    empty.mkdir()
    empty.chmod(0o1777)
    r = xencbt(sim, "init", "--repo", str(empty))
    assert "was open to other users (mode 1777): made private (0700)" in r.stderr
    assert empty.stat().st_mode & 0o7777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "someone-elses").write_text("x")
    shared.chmod(0o1777)
    r = xencbt(sim, "init", "--repo", str(shared), check=1)
    assert "writable by every user (mode 1777) and not empty" in r.stderr
    assert shared.stat().st_mode & 0o7777 == 0o1777 and not (shared / "repository.conf").exists()
