"""What the user reads: tables for a terminal, JSON for machines."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ..errors import RepositoryError
from ..jobs import canary
from ..jobs.backup import VmResult
from ..jobs.retention import Policy
from ..repo import drills
from ..repo.repository import Chain, Repository, vm_names
from ..repo.vmpoints import FROM_LIVE_VM, all_vm_points
from ..text import human, several


def emit_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def pruned_chain(vdi: str, gone: list[str], size: int, dry_run: bool) -> str:
    return "VDI %s: %s %s (%s), %s %s" % (
        vdi,
        "would remove" if dry_run else "merged and removed",
        several(len(gone), "old point"),
        ", ".join(gone),
        "up to" if dry_run else "freed",
        human(size),
    )


def pruned(removed: dict[str, list[str]], freed: int, policy: Policy, dry_run: bool) -> str:
    if not removed:
        if policy == Policy(last=policy.last) and policy.last > 0:
            return "nothing to prune: no chain has more than %s" % several(policy.last, "point")
        return "nothing to prune: the policy (%s) keeps every point" % policy.describe()
    return "%s %s of %s, %s %s" % (
        "would remove" if dry_run else "removed",
        several(sum(map(len, removed.values())), "point"),
        several(len(removed), "VDI"),
        "up to" if dry_run else "freed",
        human(freed),
    )


def copied(points: dict[str, list[str]], vm_points: dict[str, list[str]], to) -> str:
    if not points and not vm_points:
        return "nothing to copy: %s has every point" % to
    return "copied %s of %s and %s to %s" % (
        several(sum(map(len, points.values())), "point"),
        several(len(points), "VDI"),
        several(sum(map(len, vm_points.values())), "VM point"),
        to,
    )


def retained(vm_uuid: str, chains: list[Chain], done: dict) -> dict:
    """One VM's part of a prune's report: every point, with the rules that keep it."""
    return {
        "vm_uuid": vm_uuid,
        "vm_name": ", ".join(sorted(vm_names(chains))),
        "points": [{"point": p, "kept_by": rules} for p, rules in sorted(done["points"].items())],
        "removed": done["removed"],
        "freed_bytes": done["freed_bytes"],
    }


def retained_lines(vm: dict, dry_run: bool) -> list[str]:
    lines = ["VM %s (%s):" % (vm["vm_name"], vm["vm_uuid"])]
    for p in vm["points"]:
        if p["kept_by"]:
            lines.append("  keep   %s  (%s)" % (p["point"], ", ".join(p["kept_by"])))
        else:
            lines.append("  %s %s" % ("would go" if dry_run else "remove", p["point"]))
    return lines


def shrunk(r: dict) -> str:
    """e.g. "zstd 3.2:1": the compression and changed bytes per byte on disk; at most
    11 characters ("zstd >999:1"), so a column stays a column."""
    ratio = r.get("ratio")
    if not ratio:
        shown = "-"
    elif ratio < 100:
        shown = "%.1f:1" % ratio
    elif ratio < 1000:
        shown = "%d:1" % ratio
    else:
        shown = ">999:1"
    return "%s %s" % (r.get("compression", "none"), shown)


MERGED = "into this point (prune)"  # prune.finish's history entry


def as_listed(m) -> dict:
    """A disk point as ``list`` shows it.  What the manifest recorded at backup time,
    except what a prune or a copy changed since: a point a prune merged older points
    into holds more than its backup changed (its changed figure and ratio are no longer
    known, ``merged``) and, when it became the chain's base, is a full; the ratio is of
    the image as it is in this repository (a copy recompresses: bytes_on_disk is the
    copy's own)."""
    row = asdict(m)
    row["merged"] = any(MERGED in h for h in m.history)
    if m.base_point is None:
        row["type"] = "full"
    if row["merged"]:
        row["ratio"] = None
    elif m.changed_bytes and m.bytes_on_disk:
        row["ratio"] = round(m.changed_bytes / m.bytes_on_disk, 2)
    return row


def listing(repo: Repository) -> dict:
    """The repository as ``list`` shows it: per VM, its points (oldest first), each with
    its disks' points and whether it is a whole VM point (configuration committed) or
    disks only (backed up before VM points existed, or a run stopped before its VM
    manifest).  Text and JSON share this structure."""
    in_vm_point = {}
    for vm_m in vm_point_rows(repo):
        for d in vm_m["disks"]:
            in_vm_point[(d["vdi_uuid"], d["point"])] = vm_m["point"]
    vms: dict[str, dict] = {}
    for chain in repo.chains():
        for m in chain.points():
            row = as_listed(m)
            row["vm_point"] = in_vm_point.get((m.vdi_uuid, m.point))
            vm = vms.setdefault(m.vm_uuid, {"vm_uuid": m.vm_uuid, "points": {}})
            vm["vm_name"] = m.vm_name  # the newest name the VM had
            point = vm["points"].setdefault(m.point, {"point": m.point, "disks": []})
            point["disks"].append(row)
    for vm in vms.values():
        try:
            last = drills.last(repo.root, vm["vm_uuid"])  # the RTO trend: drills.json
            vm["last_drill"] = asdict(last) if last else None
        except RepositoryError as e:  # the points are listed all the same
            vm["last_drill"] = {"unreadable": str(e)}
        vm["points"] = [vm["points"][p] for p in sorted(vm["points"])]
        for point in vm["points"]:
            point["disks"].sort(key=lambda r: int(r["userdevice"]))
            point["vm_point"] = all(r["vm_point"] == point["point"] for r in point["disks"])
    ordered = sorted(vms.values(), key=lambda v: (v["vm_name"], v["vm_uuid"]))
    return {"repository": str(repo.root), "vms": ordered}


def vm_point_rows(repo: Repository) -> list[dict]:
    """The VM points: VM, point id and its disks' points (never the configuration)."""
    found = []
    for points in all_vm_points(repo):
        for m in points.manifests():
            found.append(
                {"vm_uuid": m.vm_uuid, "vm_name": m.vm_name, "point": m.point, "disks": m.disks}
            )
    return found


def print_listing(listed: dict) -> None:
    if not listed["vms"]:
        print("no backup points")
        return
    for vm in listed["vms"]:
        print("VM %s (%s)" % (vm["vm_name"], vm["vm_uuid"]))
        last = vm.get("last_drill")
        if last and "unreadable" in last:
            print("  drills: %s" % last["unreadable"])
        elif last:
            print("  last " + drill_line(last))
        for p in vm["points"]:
            what = "VM point" if p["vm_point"] else "disk points only, no VM configuration:"
            print("  %s %s  %s" % (what, p["point"], several(len(p["disks"]), "disk")))
            for r in p["disks"]:
                print("    " + disk_line(r))


def disk_line(r: dict) -> str:
    return "disk %-3s %-11s changed %-10s on disk %-10s %-12s size %-10s VDI %s (%s)%s" % (
        r["userdevice"],
        r["type"],
        "(merged)" if r.get("merged") else human(r["changed_bytes"]),
        human(r["bytes_on_disk"]),
        shrunk(r),
        human(r["virtual_size"]),
        r["vdi_uuid"],
        r["vdi_name"],
        "  " + r["reason"] if r["reason"] else "",
    )


def drill_line(d: dict) -> str:
    """A drill as ``drill`` and ``list`` show it."""
    if d["booted"]:
        return "drill %s of point %s: booted, RTO %.1f s (restore %.1f s + boot %.1f s)" % (
            d["started"],
            d["point"],
            d["rto_seconds"],
            d["restore_seconds"],
            d["boot_seconds"],
        )
    return "drill %s of point %s: FAILED: %s" % (d["started"], d["point"], d["error"])


def print_backup(results: list[VmResult]) -> None:
    for res in results:
        if not res.ok:
            print("%-20s FAILED  %s" % (res.vm, res.error))
            continue
        for d in res.disks:
            print(
                "%-20s disk %-3s %-12s %s  changed %s, on disk %s (%s), %.1f s"
                % (
                    res.vm,
                    d["userdevice"],
                    d["type"],
                    d["point"],
                    human(d["changed_bytes"]),
                    human(d["bytes_on_disk"]),
                    shrunk(d),
                    d["seconds"],
                )
            )
            if canary.failed(d.get("canary")):
                print(
                    "%-20s disk %-3s %s" % (res.vm, d["userdevice"], canary.describe(d["canary"]))
                )
        if res.vtpm == FROM_LIVE_VM:
            # xapi copies no unique vTPM into a snapshot (xapi_vtpm.ml copy): xapi/vmconfig.py
            print(
                "%-20s vTPM     unique: contents read from the VM right after the snapshot" % res.vm
            )


def canary_caught(res: VmResult) -> bool:
    """Whether the CBT canary caught missed changes on a disk of the VM (a full was taken
    instead of its incremental)."""
    return any(canary.failed(d.get("canary")) for d in res.disks)


def backup_json(results: list[VmResult]) -> dict:
    vms = [dict(asdict(r), cbt_missed_changes=canary_caught(r)) for r in results]
    return {
        "ok": all(r.ok for r in results),
        "cbt_missed_changes": any(map(canary_caught, results)),
        "vms": vms,
    }
