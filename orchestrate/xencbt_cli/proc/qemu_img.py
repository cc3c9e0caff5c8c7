"""qemu-img's view of an image from its headers alone (no key needed: ``info`` opens
without I/O), and the pieces of qemu-img command lines that do not depend on a key.
How an image is opened with its key: repo/image.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from . import command


def info_chain(path: Path) -> list[dict]:
    """``qemu-img info --backing-chain``: the image first, then its backing files."""
    out = command.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", "-f", "qcow2", path]
    )
    return json.loads(out)


def info(path: Path) -> dict:
    """``qemu-img info`` of the image alone (no key needed: it reads only headers)."""
    return json.loads(command.run(["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", path]))


def backing(path: Path) -> str | None:
    """The image's backing file name as recorded in its header (relative), or None."""
    return info(path).get("backing-filename")


def virtual_size(path: Path) -> int:
    return int(info(path)["virtual-size"])


def stopped(proc) -> None:
    """A server of ``exported`` ended: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compress_options(compression: str) -> list[str]:
    """qemu-img convert options writing every cluster compressed (qcow2 v3: qemu 5.1+
    knows compression_type=zstd; a cluster that does not shrink is stored as is).  The
    compression type is the image's own header field: whoever reads it (qemu-img,
    qemu-nbd, nbdcopy through them) decompresses transparently."""
    if compression == "none":
        return []
    return ["-c", "-o", "compression_type=%s" % compression]


def dedupe(argv: list[str]) -> list[str]:
    """``argv`` with a repeated ``--object`` pair once (one repository's key as source
    and target: qemu refuses two objects with one id)."""
    out: list[str] = []
    seen = set()
    i = 0
    while i < len(argv):
        if argv[i] == "--object" and i + 1 < len(argv):
            if argv[i + 1] not in seen:
                seen.add(argv[i + 1])
                out += argv[i : i + 2]
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out
