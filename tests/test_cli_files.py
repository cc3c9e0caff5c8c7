"""Issue #16: ``xencbt files ls|get`` — file-level restore from backup points with libguestfs.

One module-wide scene (building disks and booting appliances under TCG costs tens of
seconds each): demo-vm's two disks get real file systems built by libguestfs itself
(tests/guestbuild.py: GPT, ext4 root, vfat, LUKS, xfs on LVM spanning both disks),
written through ``xensim guest-disk``; backup; files changed, added and deleted through
the same route (libguestfs on the guest disks' NBD sockets); backup again.  Every test
then runs the real ``xencbt files`` and compares what it extracts with the model of what
the guest had at that point (never with xencbt's own output).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pwd
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import guestbuild
import pytest
from cli_support import XENCBT, backup, cli_env, xencbt
from conftest import Simulator
from guestbuild import DATA, EFI, KEY, ROOT, File, GuestModel
from secretwatch import WATCH

# The module's scene (disks built, two backups, one appliance for the changes) is set up
# within the first test's time.
pytestmark = pytest.mark.timeout(900)
TIMEOUT = 600  # one appliance under TCG on a loaded 2-core machine, plus the KVM probe
USER = "xencbt-files-test"


class Scene:
    def __init__(self, sim: Simulator, repo: Path, cache: Path, points: list[str], models, vdis):
        self.sim, self.repo, self.cache, self.vdis = sim, repo, cache, vdis
        self.points = points  # oldest first
        self.models: list[GuestModel] = models

    def env(self) -> dict[str, str]:
        env = cli_env(self.sim)
        env["LIBGUESTFS_CACHEDIR"] = str(self.cache)  # this module's appliance and verdict
        for name in ("LIBGUESTFS_BACKEND", "LIBGUESTFS_BACKEND_SETTINGS"):
            env.pop(name, None)  # the product decides (KVM or its TCG fallback)
        return env

    def files(self, *args: str, check: int | None = 0, text: bool = True, env=None, user=None):
        argv = [*XENCBT, "files", *args]
        if user:
            uid, gid = user
            argv = ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups", *argv]
        r = subprocess.run(
            argv,
            env=env or self.env(),
            capture_output=True,
            text=text,
            timeout=TIMEOUT,
            cwd="/",
        )
        out = r.stdout if text else "(%d bytes)" % len(r.stdout)
        WATCH.output("xencbt files %s" % " ".join(args), out, str(r.stderr))
        if check is not None:
            assert r.returncode == check, "exit %d\n%s\n%s" % (r.returncode, out, r.stderr)
        return r


def write_image(sim: Simulator, vdi: str, image: Path) -> None:
    with sim.guest_disk(vdi) as uri:
        subprocess.run(["nbdcopy", str(image), uri], check=True, timeout=300)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    work = tmp_path_factory.mktemp("files")
    sizes = ",".join("%dM" % (s >> 20) for s in guestbuild.DISK_SIZES)
    sim = Simulator(work / "xensim", ["--disk-sizes", sizes])
    try:
        x = sim.session().xenapi
        vm = x.VM.get_by_name_label("demo-vm")[0]
        vbds = sorted(
            (x.VBD.get_record(v) for v in x.VM.get_VBDs(vm)), key=lambda r: r["userdevice"]
        )
        vdis = [x.VDI.get_uuid(v["VDI"]) for v in vbds]
        images, model1 = guestbuild.build(work)
        for vdi, image in zip(vdis, images, strict=True):
            write_image(sim, vdi, image)
            image.unlink()
        repo = work / "repo"
        first = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]["point"]
        with sim.guest_disk(vdis[0]) as uri0, sim.guest_disk(vdis[1]) as uri1:
            model2 = guestbuild.change([uri0, uri1], model1)
        second = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]["point"]
        assert first < second
        yield Scene(sim, repo, work / "cache", [first, second], [model1, model2], vdis)
    finally:
        assert sim.stop() == 0, sim.stderr()


def tree(root: Path) -> dict[str, os.stat_result]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found["/" + str(path.relative_to(root))] = path.lstat()
    return found


def assert_extracted(root: Path, expected: dict[str, File], vfat: set[str] = frozenset()) -> None:
    """Every file, link and directory of the model is at ``root`` with its bytes, link
    target, mode and mtime (vfat paths: bytes only); no other file or link is."""
    got = tree(root)
    for path, f in expected.items():
        assert path in got or path == "/", path
        st = got.get(path) or (root).lstat()
        local = root / path.lstrip("/")
        if f.target is not None:
            assert stat.S_ISLNK(st.st_mode) and os.readlink(local) == f.target, path
            continue
        if f.data is None:
            assert stat.S_ISDIR(st.st_mode), path
        else:
            assert stat.S_ISREG(st.st_mode) and local.read_bytes() == f.data, path
        if path not in vfat and not any(path.startswith(p) for p in vfat):
            # setuid/setgid are not restored (files.py): the files land on this machine
            assert stat.S_IMODE(st.st_mode) == f.mode & 0o1777, (path, oct(st.st_mode))
            assert int(st.st_mtime) == f.mtime, path
    leaves = {p for p, st in got.items() if not stat.S_ISDIR(st.st_mode)}
    assert leaves == {p for p, f in expected.items() if f.data is not None or f.target}, leaves ^ {
        p for p, f in expected.items() if f.data is not None or f.target
    }


def test_ls_names_file_systems_encrypted_volume_and_os(scene: Scene) -> None:
    r = scene.files("ls", "--repo", str(scene.repo), "demo-vm", "--json")
    info = json.loads(r.stdout)
    assert info["point"] == scene.points[-1]
    fs = {f["device"]: f["type"] for f in info["filesystems"]}
    assert fs == {ROOT: "ext4", EFI: "vfat", DATA: "xfs"}
    assert info["encrypted"] == [guestbuild.SECRET]
    [found] = info["os"]
    assert found["mountpoints"] == {"/": ROOT, "/data": DATA, "/boot/efi": EFI}
    assert [d["drive"] for d in info["disks"]] == ["/dev/sda", "/dev/sdb"]
    assert "appliance" in r.stderr  # the user is told what the wait is for
    # Where KVM cannot run a guest (these machines), the product found out and said so.
    verdict = scene.cache / (".xencbt-kvm-unusable-%d" % os.getuid())
    assert verdict.exists() == ("falling back to software emulation" in r.stderr)


def test_get_whole_os_at_the_older_point(scene: Scene, tmp_path: Path) -> None:
    """Every file of every file system as the OS mounts them, as the guest had them at
    the first point, including the files deleted before the second."""
    dest = tmp_path / "old"
    r = scene.files(
        "get", "--repo", str(scene.repo), "demo-vm", "--at", scene.points[0], "/", "--to", str(dest)
    )
    assert "extracted" in r.stderr
    view = scene.models[0].os_view()
    assert "/home/alice/to-delete.bin" in view and "/data/projects/old.txt" in view
    assert_extracted(dest, expected_os(view), vfat={"/boot/efi"})
    assert not os.path.lexists("/tmp/escaped")  # a guest symlink is recreated, not followed


def expected_os(view: dict[str, File]) -> dict[str, File]:
    """The OS view without what extraction cannot reproduce: lost+found of ext4 is a
    directory the model does not track; mount point directories show the mounted root."""
    return {p: f for p, f in view.items() if p not in ("/boot/efi", "/data", "/")}


def test_get_newest_point_force_replaces_links_without_following_them(
    scene: Scene, tmp_path: Path
) -> None:
    dest = tmp_path / "new"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"must stay\n")
    (dest / "etc").mkdir(parents=True)
    (dest / "etc" / "hostname").symlink_to(outside)
    args = ["get", "--repo", str(scene.repo), "demo-vm", "/", "--to", str(dest)]
    r = scene.files(*args, check=1)
    assert "exists: pass --force" in r.stderr and "Traceback" not in r.stderr
    scene.files(*args, "--force")
    assert outside.read_bytes() == b"must stay\n"
    view = scene.models[1].os_view()
    assert "/home/alice/to-delete.bin" not in view and "/data/projects/old.txt" not in view
    assert_extracted(dest, expected_os(view), vfat={"/boot/efi"})


def test_get_tar_of_a_named_file_system(scene: Scene) -> None:
    r = scene.files(
        "get",
        "--repo",
        str(scene.repo),
        "demo-vm",
        "--at",
        scene.points[0],
        DATA + ":/projects",
        "--tar",
        "-",
        "--json",
        text=False,
    )
    # --json: the summary goes to stderr, stdout is the archive alone (whole records)
    assert len(r.stdout) % tarfile.RECORDSIZE == 0 and r.stdout.endswith(bytes(1024))
    model = scene.models[0].fs[DATA]
    with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"projects", "projects/report.bin", "projects/old.txt"}
        for name, m in members.items():
            f = model["/" + name]
            assert m.mode == f.mode & 0o1777 and m.mtime == f.mtime, name
            if f.data is not None:
                assert tar.extractfile(m).read() == f.data, name


def test_a_path_missing_at_that_point_names_the_older_one(scene: Scene) -> None:
    r = scene.files(
        "ls", "--repo", str(scene.repo), "demo-vm", "/home/alice/to-delete.bin", check=1
    )
    assert "does not exist" in r.stderr and scene.points[0] in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 400 and "Traceback" not in r.stderr


def test_one_vdi_without_a_file_system_of_its_own(scene: Scene) -> None:
    """Disk 1 alone holds only half of an LVM volume group: nothing to mount, said so."""
    r = scene.files("ls", "--repo", str(scene.repo), scene.vdis[1], check=1)
    assert "no file system found" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_luks_volume_opens_with_guest_key_file(scene: Scene, tmp_path: Path) -> None:
    key = tmp_path / "guest.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    WATCH.register(KEY)
    r = scene.files(
        "get",
        "--repo",
        str(scene.repo),
        "demo-vm",
        "/dev/mapper/xencbt0:/secret.txt",
        "--tar",
        "-",
        "--guest-key-file",
        str(key),
        text=False,
    )
    with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:") as tar:
        assert tar.extractfile("secret.txt").read() == b"the secret\n"


def test_a_wrong_guest_key_is_named_not_shown(scene: Scene, tmp_path: Path) -> None:
    key = tmp_path / "wrong.key"
    key.write_text("not the passphrase\n")
    key.chmod(0o600)
    WATCH.register("not the passphrase")
    args = ["ls", "--repo", str(scene.repo), "demo-vm", "--guest-key-file", str(key)]
    r = scene.files(*args, check=1)
    assert "does not open the encrypted volume " + guestbuild.SECRET in r.stderr, r.stderr


def test_refusals_that_need_no_appliance(scene: Scene, tmp_path: Path) -> None:
    existing = tmp_path / "out.tar"
    existing.write_bytes(b"keep")
    base = ["get", "--repo", str(scene.repo), "demo-vm", "/etc/hostname"]
    r = scene.files(*base, "--tar", str(existing), check=1)
    assert "exists: pass --force" in r.stderr and "appliance" not in r.stderr
    assert existing.read_bytes() == b"keep"
    (tmp_path / "hostname").write_bytes(b"keep")
    r = scene.files(*base, "--to", str(tmp_path), check=1)
    assert "exists: pass --force" in r.stderr and "appliance" not in r.stderr
    r = scene.files(*base, check=2)
    assert "--to DIR or --tar" in r.stderr
    for path in ("/etc/../../x", "etc/hostname", ROOT + ":/a/../../b"):
        r = scene.files(
            "get", "--repo", str(scene.repo), "demo-vm", path, "--to", str(tmp_path), check=2
        )
        assert "absolute and has no '..'" in r.stderr and "appliance" not in r.stderr
    r = scene.files("ls", "--repo", str(scene.repo), "no-such-vm", check=1)
    assert "no VM or VDI matching no-such-vm" in r.stderr


def test_non_root_user_reads_a_read_only_repository(scene: Scene) -> None:
    """A user who may only read the repository lists and extracts files; nothing in the
    repository changes (mode, size, mtime of every file)."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam(local_user())
        user = pw.pw_uid, pw.pw_gid
        # Not under the run's TMPDIR: the secret watch's tmpfs is private to root.
        base = Path(tempfile.mkdtemp(prefix="xencbt-files-", dir="/var/tmp"))
        base.chmod(0o755)
        repo = base / "repo"
        shutil.copytree(scene.repo, repo, symlinks=True)
        subprocess.run(["chmod", "-R", "a+rX,a-w", str(repo)], check=True)
        dest = base / "out"
        dest.mkdir()
        os.chown(dest, *user)
    else:  # already not root: the repository made read-only is enough
        user, base = None, None
        repo = scene.repo
        subprocess.run(["chmod", "-R", "a-w", str(repo)], check=True)
        dest = scene.cache.parent / "user-out"
    before = {p: (st.st_mode, st.st_size, st.st_mtime_ns) for p, st in tree(repo).items()}
    env = scene.env()
    env["HOME"] = "/nonexistent"  # nothing of the user's may be needed
    env.pop("LIBGUESTFS_CACHEDIR")  # the product picks a cache this user can write
    try:
        scene.files(
            "get",
            "--repo",
            str(repo),
            "demo-vm",
            "--at",
            scene.points[0],
            ROOT + ":/home/alice",
            "--to",
            str(dest / "alice"),
            env=env,
            user=user,
        )
        after = {p: (st.st_mode, st.st_size, st.st_mtime_ns) for p, st in tree(repo).items()}
        assert after == before
        model = scene.models[0].fs[ROOT]
        expected = {
            p[len("/home/alice") :]: f for p, f in model.items() if p.startswith("/home/alice/")
        }
        assert_extracted(dest / "alice" / "alice", expected)
        assert (dest / "alice" / "alice" / "to-delete.bin").stat().st_uid == (
            user[0] if user else os.getuid()
        )
    finally:
        if base:
            shutil.rmtree(base)
        else:
            subprocess.run(["chmod", "-R", "u+w", str(repo)], check=True)


def local_user() -> str:
    """A local user without privileges (created once; tests run as root here)."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)
        return USER
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        check=True,
    )
    return USER


def test_files_of_an_encrypted_repository(scene: Scene, tmp_path: Path) -> None:
    """An encrypted copy of the repository (xencbt copy re-encrypts): libguestfs cannot
    open a LUKS qcow2 itself, so each chain is served to it by qemu-nbd with the key;
    what comes out is the model's, and the key never shows (the secret watch)."""
    key = tmp_path / "repo.key"
    key.write_text(base64.b64encode(os.urandom(48)).decode() + "\n")
    key.chmod(0o600)
    WATCH.register(key.read_text().strip())
    enc = tmp_path / "encrypted"
    xencbt(scene.sim, "--key-file", str(key), "init", "--repo", str(enc), "--encrypt")
    xencbt(scene.sim, "--key-file", str(key), "copy", "--repo", str(scene.repo), "--to", str(enc))
    dest = tmp_path / "old"
    args = ["get", "--key-file", str(key), "--repo", str(enc), "demo-vm"]
    r = scene.files(*args, "--at", scene.points[0], "/", "--to", str(dest))
    assert "extracted" in r.stderr
    assert_extracted(dest, expected_os(scene.models[0].os_view()), vfat={"/boot/efi"})
    r = scene.files("ls", "--repo", str(enc), "demo-vm", check=2)
    assert "is encrypted: give its key file" in r.stderr
