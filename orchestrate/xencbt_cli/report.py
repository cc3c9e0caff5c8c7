"""What the user reads: tables for a terminal, JSON for machines."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from .backup import VmResult, human
from .repository import Chain, Repository


def emit_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def chain_usage(chain: Chain) -> int:
    """Bytes the chain's files take on disk."""
    return sum(p.lstat().st_blocks * 512 for p in chain.path.iterdir() if p.is_file())


def point_usage(chain: Chain, point: str) -> int:
    """Bytes a point's own files take on disk (its image, sums and manifest)."""
    paths = (chain.image_path(point), chain.sums_path(point), chain.manifest_path(point))
    return sum(p.lstat().st_blocks * 512 for p in paths if p.exists())


def points(repo: Repository) -> list[dict]:
    rows = []
    for chain in repo.chains():
        for m in chain.points():
            rows.append(asdict(m))
    return rows


def print_points(rows: list[dict]) -> None:
    if not rows:
        print("no backup points")
        return
    current = None
    for r in rows:
        if (r["vm_uuid"], r["vdi_uuid"]) != current:
            current = r["vm_uuid"], r["vdi_uuid"]
            print(
                "VM %s (%s)  disk %s  VDI %s (%s)"
                % (r["vm_name"], r["vm_uuid"], r["userdevice"], r["vdi_uuid"], r["vdi_name"])
            )
        kind = r["type"] + (" (%s)" % r["reason"] if r["reason"] else "")
        print(
            "  %s  %-12s changed %-10s on disk %-10s size %s  %s"
            % (
                r["point"],
                r["type"],
                human(r["changed_bytes"]),
                human(r["bytes_on_disk"]),
                human(r["virtual_size"]),
                kind if r["reason"] else "",
            )
        )


def print_backup(results: list[VmResult]) -> None:
    for res in results:
        if not res.ok:
            print("%-20s FAILED  %s" % (res.vm, res.error))
            continue
        for d in res.disks:
            print(
                "%-20s disk %-3s %-12s %s  changed %s, on disk %s, %.1f s"
                % (
                    res.vm,
                    d["userdevice"],
                    d["type"],
                    d["point"],
                    human(d["changed_bytes"]),
                    human(d["bytes_on_disk"]),
                    d["seconds"],
                )
            )


def backup_json(results: list[VmResult]) -> dict:
    return {"ok": all(r.ok for r in results), "vms": [asdict(r) for r in results]}
