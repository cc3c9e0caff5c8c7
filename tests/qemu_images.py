"""Helpers (no tests): qemu-img's view of the tests' qcow2 images (info, map, check,
convert) and damage done to one on purpose."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

BLOCK = 64 * 1024  # the CBT block, as cli_support.BLOCK


def image_info(path: Path) -> dict:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def corrupt_data_cluster(path) -> None:
    entries = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", path], capture_output=True, check=True, text=True
        ).stdout
    )
    offset = next(e["offset"] for e in entries if e["data"] and e["depth"] == 0)
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        f.write(b"corrupted!")


def compressed_clusters(path) -> float:
    """The share of the image's clusters qemu-img check counts as compressed (percent)."""
    out = subprocess.run(
        ["qemu-img", "check", "-U", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(re.search(r"([\d.]+)% compressed clusters", out).group(1))


# -- damaged images ----------------------------------------------------------------------
def own_data_offset(path: Path, guest_offset: int) -> int:
    """Where in the qcow2 file the image's own copy of a guest block lies."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for m in json.loads(out):
        start, end = m["start"], m["start"] + m["length"]
        if m["depth"] == 0 and m["data"] and "offset" in m and start <= guest_offset < end:
            return m["offset"] + guest_offset - start
    raise AssertionError("block not allocated in %s" % path)


def top_blocks(image: Path) -> set[int]:
    entries = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", image], check=True, capture_output=True
        ).stdout
    )
    blocks: set[int] = set()
    for e in entries:
        if e["depth"] == 0 and (e["data"] or e["zero"]):
            blocks.update(range(e["start"] // BLOCK, -(-(e["start"] + e["length"]) // BLOCK)))
    return blocks


def flatten(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, out], check=True)
    return out.read_bytes()
