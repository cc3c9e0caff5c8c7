"""``xencbt files get``: copy files out of a guest into a directory or a tar archive.

Extraction never writes outside ``--to``: names come from the guest one component at a
time and must be plain names, guest symlinks are recreated as symlinks and never
followed, an existing symlink or file in the way is refused (``--force`` replaces files
and links by renaming over them, never writing through them), and everything is first
written into a private staging directory inside ``--to``."""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CliError, UsageError
from ..proc.scratch import private_dir
from .guest_view import DIRECTORY, GuestPath, GuestView, entry, listing, parse_path
from .guestfs import GuestError

KEEP_MODE = 0o1777


@dataclass
class Item:
    """One thing to extract: its guest path and its path relative to the destination."""

    gp: GuestPath
    rel: str
    row: dict


def safe_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise GuestError("the guest has a file named %r: refusing to extract it" % name)
    return name


def walk(view: GuestView, gp: GuestPath) -> list[Item]:
    """Everything under ``gp`` (itself first, parents before children); never follows
    symlinks.  The root of a file system or OS (``/``) extracts as its contents."""
    gp, st = view.find(gp)
    parent, name = posixpath.split(gp.path)
    top = Item(gp, safe_name(name) if name else "", entry(view, parent or "/", name, st))
    items, todo = [top], [top]
    while todo:
        item = todo.pop()
        if item.row["type"] != "directory":
            continue
        for row in listing(view, item.gp, DIRECTORY):
            rel = posixpath.join(item.rel, safe_name(row["name"]))
            child = Item(GuestPath(item.gp.fs, row["path"]), rel, row)
            items.append(child)
            todo.append(child)
    return items


def collect(view: GuestView, texts: list[str]) -> list[Item]:
    items = []
    for text in texts:
        items += walk(view, parse_path(text, view.fs, view.locked))
    rels = [i.rel for i in items if i.rel]
    if len(rels) != len(set(rels)):
        raise UsageError("two PATHs extract to the same name: give them one at a time")
    return items


def fetch(view: GuestView, item: Item, local: str) -> None:
    view.mount(item.gp)
    view.guest.g.download(item.gp.path, local)


def check_dest(root: Path, items: list[Item], force: bool) -> list[str]:
    """Refuse before writing anything: a symlink or file where a directory goes, or an
    existing file without --force.  Returns what --force replaces."""
    replaced = []
    for item in items:
        if not item.rel:
            continue
        path = root / item.rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) and item.row["type"] == "directory":
            raise CliError("%s is a symlink: refusing to extract through it" % path)
        if stat.S_ISDIR(st.st_mode):
            if item.row["type"] != "directory":
                raise CliError("%s is a directory here: remove it first" % path)
            continue
        if item.row["type"] == "directory":
            raise CliError("%s exists and is not a directory: remove it first" % path)
        if not force:
            raise CliError("%s exists: pass --force to replace it (nothing was written)" % path)
        replaced.append(str(path))
    return replaced


def to_dir(view: GuestView, items: list[Item], dest: Path, force: bool) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    replaced = check_dest(root, items, force)
    done, skipped, dirs = 0, [], []
    # On the destination's file system, so that each file arrives by rename.
    with private_dir(".xencbt-get-", str(root)) as staging:
        for n, item in enumerate(items):
            row, final = item.row, root / item.rel if item.rel else root
            if row["type"] == "directory":
                if not os.path.isdir(final) or os.path.islink(final):
                    os.mkdir(final, 0o700)
                dirs.append((final, row))
                continue
            tmp = os.path.join(staging, str(n))
            if row["type"] == "file":
                fetch(view, item, tmp)
                os.chmod(tmp, int(row["mode"], 8) & KEEP_MODE)
            elif row["type"] == "symlink":
                os.symlink(row["target"], tmp)
            else:
                skipped.append(str(item.gp))
                continue
            os.utime(tmp, ns=(row["atime_ns"], row["mtime_ns"]), follow_symlinks=False)
            os.rename(tmp, final)  # replaces a file or a link, never writes through it
            done += 1
        for final, row in reversed(dirs[1:] if dirs and dirs[0][0] == root else dirs):
            # after their contents, which change mtime; --to itself keeps its own
            os.chmod(final, int(row["mode"], 8) & KEEP_MODE)
            os.utime(final, ns=(row["atime_ns"], row["mtime_ns"]))
    return {
        "to": str(root),
        "files": done,
        "directories": len(dirs),
        "replaced": replaced,
        "skipped": skipped,
    }


def tar_info(item: Item) -> tarfile.TarInfo:
    row = item.row
    info = tarfile.TarInfo(item.rel or ".")
    info.mode = int(row["mode"], 8) & KEEP_MODE
    info.mtime = row["mtime"]
    info.type = {"directory": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(
        row["type"], tarfile.REGTYPE
    )
    if row["type"] == "symlink":
        info.linkname = row["target"]
    if row["type"] == "file":
        info.size = row["size"]
    return info


def write_tar(view: GuestView, items: list[Item], out) -> dict:
    done, skipped = 0, []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            kind_ = item.row["type"]
            if kind_ not in ("file", "directory", "symlink"):
                skipped.append(str(item.gp))
                continue
            info = tar_info(item)
            if kind_ != "file":
                tar.addfile(info)
                continue
            # Without a name (O_TMPFILE, else unlinked at once): a SIGKILL leaves no
            # copy of the guest's data behind.
            with tempfile.TemporaryFile() as f:
                # libguestfs writes the guest's file by name: /dev/fd/N opens ours.
                fetch(view, item, "/dev/fd/%d" % f.fileno())
                info.size = os.fstat(f.fileno()).st_size
                f.seek(0)
                tar.addfile(info, f)
            done += 1
    return {"files": done, "skipped": skipped}


def to_tar(view: GuestView, items: list[Item], target: str, force: bool) -> dict:
    if target == "-":
        if sys.stdout.isatty():
            raise UsageError("--tar -: stdout is a terminal; redirect it to a file or a pipe")
        result = write_tar(view, items, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return {"tar": "-", **result}
    path = Path(target)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "xb") as out:
            result = write_tar(view, items, out)
        if path.exists() and not force:  # checked before too; a race must not clobber it
            raise CliError("%s exists: pass --force to replace it" % path)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return {"tar": str(path), **result}
