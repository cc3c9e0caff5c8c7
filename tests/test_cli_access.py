"""Who may read a repository (issue #13 items 4 and 6): private whatever the umask, verify
warns about what others may read and repair tightens it, a password file others may read
is warned about; and read-only use (list, verify, restore, serve) works on a read-only
file system and for a second local user who may only read the repository.

The read-only cases mount a tmpfs and create a local user, so they need root."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cli_support import XENCBT, Vm, cli_env, disk_rows, rand, sha

READER = "xencbt-test-reader"


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,1M+512", in_use_wait=0.2)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run(sim, *args: str, umask: int = 0o022, user: str | None = None, check: int | None = 0):
    argv = [*XENCBT, "--xapi-cafile", sim.info["ca_file"], *args]
    if user:
        argv = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *argv]
    r = subprocess.run(
        argv, env=cli_env(sim), capture_output=True, text=True, timeout=120, umask=umask
    )
    if check is not None:
        assert r.returncode == check, "exit %d\n%s\n%s" % (r.returncode, r.stdout, r.stderr)
    return r


def backed_up(sim, repo: Path, umask: int = 0o022) -> tuple[Vm, str]:
    vm = Vm(sim)
    for i in range(2):
        vm.write(0, {i * 65536: rand(65536)})
        r = run(sim, "--json", "backup", "demo-vm", "--repo", str(repo), umask=umask)
    return vm, json.loads(r.stdout)["vms"][0]["point"]


def test_new_repositories_and_restored_files_are_private_whatever_the_umask(sim, tmp_path):
    repo = tmp_path / "repo"
    vm, _ = backed_up(sim, repo, umask=0)  # the loosest umask there is
    found = [repo, *repo.rglob("*")]
    assert len([p for p in found if p.suffix == ".qcow2"]) == 4
    for path in found:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path

    out = tmp_path / "disk.raw"
    run(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-file", str(out), umask=0)
    assert mode(out) == 0o600 and sha(out.read_bytes()) == sha(vm.models[0])
    shared = tmp_path / "shared.raw"
    run(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-file", str(shared),
        "--mode", "0640", umask=0o077)  # fmt: skip
    assert mode(shared) == 0o640
    r = run(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-file", str(tmp_path / "x.raw"),
            "--mode", "999", check=2)  # fmt: skip
    assert "not an octal mode" in r.stderr
    r = run(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-sr", "x", "--mode", "0644",
            check=2)  # fmt: skip
    assert "--format and --mode are about --to-file" in r.stderr


def test_verify_names_readable_points_and_repair_tightens_them(sim, tmp_path):
    repo = tmp_path / "repo"
    vm, point = backed_up(sim, repo)
    subprocess.run(["chmod", "-R", "go+rX", str(repo)], check=True)  # an older xencbt's repo
    image = repo / vm.uuid / vm.uuids[0] / (point + ".qcow2")
    assert mode(image) == 0o644

    # Sound data, but the repository is not private (0700/0600): verify names what is
    # open, and what mends it; not a failure (a repository may be opened on purpose to a
    # user who may only read it: test_a_user_who_may_only_read_the_repository).
    r = run(sim, "verify", "--repo", str(repo))
    assert "4 points verified" in r.stdout
    assert "are open to other users" in r.stdout and "xencbt repair makes them so" in r.stdout
    assert "(0755)" in r.stdout and "(0644)" in r.stdout

    r = run(sim, "repair", "--repo", str(repo))
    assert "made" in r.stderr and "private (directories 0700, files 0600)" in r.stderr
    for path in [repo, *repo.rglob("*")]:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    r = run(sim, "verify", "--repo", str(repo))
    assert "open to other users" not in r.stdout + r.stderr and "4 points verified" in r.stdout


def test_a_password_file_others_may_read_gets_a_warning(sim, tmp_path):
    password = Path(sim.info["password_file"])
    os.chmod(password, 0o600)
    r = run(sim, "nbd", "status")
    assert "password file" not in r.stderr
    os.chmod(password, 0o644)
    try:
        r = run(sim, "nbd", "status")
    finally:
        os.chmod(password, 0o600)
    assert "the password file %s is open to other users (mode 0644): chmod 600" % password in (
        r.stderr
    )


# -- read-only use -----------------------------------------------------------------------
@contextlib.contextmanager
def read_only_copy(repo: Path, where: Path):
    """A copy of ``repo`` on a tmpfs remounted read-only."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
    try:
        shutil.copytree(repo, where / "repo", symlinks=True)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where / "repo"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def read_only_use(sim, repo: Path, vm: Vm, out_dir: Path, user: str | None = None) -> None:
    """list, verify, restore and serve, as ``user``, each one working."""
    before = {str(p): p.stat().st_mtime_ns for p in repo.rglob("*")}
    r = run(sim, "--json", "list", "--repo", str(repo), user=user)
    assert len(disk_rows(json.loads(r.stdout))) == 4
    r = run(sim, "verify", "--repo", str(repo), user=user)
    assert "4 points verified" in r.stdout
    out = out_dir / "disk.raw"
    run(sim, "restore", "--repo", str(repo), vm.uuids[1], "--to-file", str(out), user=user)
    assert sha(out.read_bytes()) == sha(vm.models[1])
    out.unlink()
    argv = [*XENCBT, "--json", "serve", vm.uuids[0], "--repo", str(repo)]
    if user:
        argv = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *argv]
    server = subprocess.Popen(
        argv, env=cli_env(sim), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = server.stdout.readline()
        assert line, server.communicate()[1]
        uri = json.loads(line)["uri"]
        got = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True).stdout
        assert sha(got) == sha(vm.models[0])
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0, server.stderr.read()
    assert {str(p): p.stat().st_mtime_ns for p in repo.rglob("*")} == before


def test_read_only_file_system(sim, tmp_path):
    repo = tmp_path / "repo"
    vm, _ = backed_up(sim, repo)
    (repo / vm.uuid / vm.uuids[1] / ".lock").unlink()  # one chain never locked: no lock file
    with read_only_copy(repo, tmp_path / "ro") as ro:
        read_only_use(sim, ro, vm, tmp_path)
        # What needs to write says why it cannot, not to change user.
        r = run(sim, "backup", "demo-vm", "--repo", str(ro), check=1)
        assert "read-only" in r.stderr and "run as a user" not in r.stderr


@pytest.fixture
def reader():
    """A local user with no rights on anything of the tests'."""
    try:
        pwd.getpwnam(READER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", READER], check=True)
    return READER


def test_a_user_who_may_only_read_the_repository(sim, tmp_path, reader):
    repo = tmp_path / "repo"
    vm, _ = backed_up(sim, repo)
    # The owner shares it read-only with the reader (a group would do the same).
    subprocess.run(["chmod", "-R", "go+rX,go-w", str(repo)], check=True)
    for d in [tmp_path, *tmp_path.parents]:
        os.chmod(d, mode(d) | 0o005)  # the way there
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.chown(out_dir, reader)
    os.chmod(Path(sim.info["password_file"]), 0o600)
    locks = list(repo.rglob(".lock"))
    assert locks
    for lock in locks[:1]:
        lock.unlink()  # one chain without a lock file, which the reader may not create
    read_only_use(sim, repo, vm, out_dir, user=reader)
    r = run(sim, "prune", "--repo", str(repo), "--keep", "1", user=reader, check=1)
    assert "run as a user allowed to do that there" in r.stderr


def test_repair_refuses_a_folder_that_is_not_a_repository(sim, tmp_path):
    """#24 finding 2: repair of a folder without the repository's own marker (its
    repository.conf, or points of an older xencbt) changes nothing, not a mode; in a
    repository it tightens only what xencbt made."""
    shared = tmp_path / "shared"  # a system's temporary folder, say
    other = shared / "0e3cbd5a-3c7a-4d3f-9b4e-1b8ff1d0a0a1"  # a uuid, but nothing of ours
    other.mkdir(parents=True)
    (shared / "notes.txt").write_text("someone's\n")
    (other / "data").write_text("someone else's\n")
    for path, bits in ((shared, 0o1777), (other, 0o755), (shared / "notes.txt", 0o644)):
        os.chmod(path, bits)
    before = {p: mode(p) for p in [shared, *shared.rglob("*")]}
    r = run(sim, "repair", "--repo", str(shared), check=1)
    (line,) = r.stderr.splitlines()
    assert "is not an xencbt repository" in line and "repository.conf" in line, line
    assert {p: mode(p) for p in [shared, *shared.rglob("*")]} == before
    # verify finds no point there, and sends nobody to repair it.
    r = run(sim, "verify", "--repo", str(shared), check=1)
    assert "no backup points" in r.stderr and "xencbt repair" not in r.stderr

    repo = tmp_path / "repo"
    backed_up(sim, repo)
    subprocess.run(["chmod", "-R", "go+rX", str(repo)], check=True)
    foreign = repo / "README.txt"  # the administrator's own note beside the points
    foreign.write_text("offsite copy on tape 7\n")
    os.chmod(foreign, 0o644)
    run(sim, "repair", "--repo", str(repo))
    assert mode(foreign) == 0o644
    for path in [repo, *repo.rglob("*")]:
        if path != foreign:
            assert mode(path) == (0o700 if path.is_dir() else 0o600), path
