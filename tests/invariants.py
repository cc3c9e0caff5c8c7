"""A repository's invariants, checked from the tests' side (issue #23): no product code.

``check(repo)`` raises AssertionError naming each breach; cli_support.xencbt runs
``breaches`` before and after every command that writes to a repository and fails on
any breach the command introduced.  This is written again here on purpose, not imported
from xencbt_cli.repo.invariants: a check that shares the product's code shares its bugs (a
mutant that drops a check from the product must still be caught here).  It is cheap:
stat, the JSON manifests, the first bytes of sidecars and ``qemu-img info`` (headers
only, cached by inode and mtime), never the data.

What a repository promises (README "The repository", DESIGN.md):
* ``repository.conf`` parses; an encrypted repository's images are all qcow2 LUKS and its
  sidecars (``.sums``, ``.config.json``) sealed; a clear one's images are clear; a zstd
  repository's images all have compression-type zstd (stricter than the product's
  verify, which accepts a point whose manifest records ``none``: written before the
  repository had settings, which no test makes);
* directories 0700, files 0600, whatever the umask (the suite runs under 022);
* a manifest has its image and (format 2) its sums; its image is backed by exactly its
  base point's image, by a bare file name (relative, same directory);
* a VM point has its configuration and each of its disks' points;
* a VM's drill record (``drills.json``) parses: each drill names a point, whether it
  booted and, when it did, its restore and boot seconds summing to its RTO;
* with ``leftovers``: no temp files, partial images, images or sums or configurations
  without a manifest, prune journal (what only an interrupted run may leave).
"""

from __future__ import annotations

import configparser
import json
import re
import stat
import subprocess
from pathlib import Path

from tally import tally

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
POINT = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")
SEALED = b"XENCBT-SEALED-1\n"
_infos: dict[tuple, dict] = {}


def info(path: Path) -> dict:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    if key not in _infos:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        _infos[key] = json.loads(out)
    return _infos[key]


def is_repository(repo: Path) -> bool:
    return (repo / "repository.conf").is_file() or any(
        d.is_dir() and UUID.match(d.name) for d in (repo.iterdir() if repo.is_dir() else [])
    )


def settings(repo: Path, found: list[str]) -> tuple[str, str]:
    """(compression, encryption); the defaults of a repository without settings."""
    conf = repo / "repository.conf"
    if not conf.is_file():
        return "none", "none"
    parser = configparser.ConfigParser()
    try:
        parser.read_string(conf.read_text())
        section = parser["repository"]
        return section.get("compression", "zstd"), section.get("encryption", "none")
    except (configparser.Error, KeyError) as e:
        found.append("%s does not parse: %s" % (conf, e))
        return "none", "none"


def modes(repo: Path, found: list[str]) -> None:
    paths = [repo, repo / "repository.conf"]
    for d in sorted(repo.iterdir()):
        if d.is_dir() and UUID.match(d.name):
            paths += [d, *sorted(d.rglob("*"))]
    for p in paths:
        if not p.exists() or p.is_symlink():
            continue
        mode, want = stat.S_IMODE(p.lstat().st_mode), 0o700 if p.is_dir() else 0o600
        if mode != want:
            found.append("%s has mode %04o, not %04o" % (p, mode, want))


def chain(d: Path, compression: str, encryption: str, leftovers: bool, found: list[str]) -> None:
    manifests = {p.stem: p for p in d.glob("*.json") if POINT.match(p.stem)}
    for point, path in sorted(manifests.items()):
        try:
            m = json.loads(path.read_text())
        except ValueError as e:
            found.append("%s does not parse: %s" % (path, e))
            continue
        if (
            m.get("point") != point
            or m.get("vdi_uuid") != d.name
            or m.get("vm_uuid") != d.parent.name
        ):
            found.append("%s names point %s of VDI %s" % (path, m.get("point"), m.get("vdi_uuid")))
        img, sums = d / (point + ".qcow2"), d / (point + ".sums")
        if m.get("digest") and not sums.is_file():
            found.append("%s has no checksum file %s" % (path, sums.name))
        elif sums.is_file() and encryption == "luks" and not sums.read_bytes().startswith(SEALED):
            found.append("%s is not sealed in an encrypted repository" % sums)
        if not img.is_file():
            found.append("%s has no image %s" % (path, img.name))
            continue
        header(img, m, compression, encryption, found)
    if leftovers:
        for p in sorted(d.iterdir()):
            if p.name.endswith((".partial", ".tmp")) or p.name == ".prune.json":
                found.append("leftover %s" % p)
            elif p.suffix in (".qcow2", ".sums") and p.stem not in manifests:
                found.append("leftover %s (no manifest)" % p)


def header(img: Path, m: dict, compression: str, encryption: str, found: list[str]) -> None:
    try:
        i = info(img)
    except subprocess.CalledProcessError:
        found.append("%s: qemu-img info cannot read its header" % img)
        return
    data = i.get("format-specific", {}).get("data", {})
    luks = data.get("encrypt", {}).get("format") == "luks"
    if encryption == "luks" and not luks:
        found.append("%s is not LUKS-encrypted in an encrypted repository" % img)
    if encryption != "luks" and i.get("encrypted"):
        found.append("%s is encrypted in a clear repository" % img)
    if compression == "zstd" and data.get("compression-type") != "zstd":
        found.append(
            "%s has compression-type %s in a zstd repository" % (img, data.get("compression-type"))
        )
    backing = i.get("backing-filename")
    want = m["base_point"] + ".qcow2" if m.get("base_point") else None
    if backing != want:
        found.append("%s is backed by %s, its manifest says %s" % (img, backing, want))


def vm_points(d: Path, encryption: str, leftovers: bool, found: list[str]) -> None:
    named = set()
    for path in sorted(d.glob("*.json")):
        if not POINT.match(path.stem):
            continue
        m = json.loads(path.read_text())
        config = d / m["config"]
        named.add(config.name)
        if not config.is_file():
            found.append("%s has no configuration %s" % (path, config.name))
        elif encryption == "luks" and not config.read_bytes().startswith(SEALED):
            found.append("%s is not sealed in an encrypted repository" % config)
        for disk in m.get("disks", []):
            if not (d.parent / disk["vdi_uuid"] / (disk["point"] + ".json")).is_file():
                found.append(
                    "%s names disk point %s/%s, which has no manifest"
                    % (path, disk["vdi_uuid"], disk["point"])
                )
    if leftovers:
        for p in sorted(d.iterdir()):
            if p.name.endswith(".tmp") or (p.name.endswith(".config.json") and p.name not in named):
                found.append("leftover %s" % p)


def drill_record(path: Path, found: list[str]) -> None:
    try:
        drills = json.loads(path.read_text())["drills"]
    except (ValueError, KeyError, TypeError) as e:
        found.append("%s does not parse: %s" % (path, e))
        return
    for d in drills:
        if not POINT.match(str(d.get("point"))) or not isinstance(d.get("booted"), bool):
            found.append("%s holds a drill without its point or outcome: %s" % (path, d))
        elif (
            d["booted"] and abs(d["restore_seconds"] + d["boot_seconds"] - d["rto_seconds"]) > 0.02
        ):
            found.append("%s: a drill's restore and boot seconds do not sum to its RTO" % path)


def breaches(repo: Path, leftovers: bool = True) -> list[str]:
    """Every breach of the repository's invariants (none for what is no repository)."""
    repo = Path(repo)
    if not is_repository(repo):
        return []
    found: list[str] = []
    compression, encryption = settings(repo, found)
    modes(repo, found)
    for vm in sorted(repo.iterdir()):
        if not (vm.is_dir() and UUID.match(vm.name)):
            continue
        for d in sorted(vm.iterdir()):
            if d.is_dir() and UUID.match(d.name):
                chain(d, compression, encryption, leftovers, found)
            elif d.name == "points" and d.is_dir():
                vm_points(d, encryption, leftovers, found)
            elif d.name == "drills.json":
                drill_record(d, found)
            elif leftovers and d.name == "drills.json.tmp":
                found.append("leftover %s" % d)
    return found


def check(repo: Path, key_file=None, leftovers: bool = True) -> None:
    """AssertionError naming each breach of ``repo``'s invariants.  ``key_file`` is not
    needed (headers and seals are checked, nothing is decrypted); accepted for callers
    that have one at hand."""
    tally("invariant checks")
    found = breaches(repo, leftovers)
    assert not found, "repository %s breaks its invariants:\n  %s" % (repo, "\n  ".join(found))
