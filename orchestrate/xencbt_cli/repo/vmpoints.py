"""A VM point: the disks' points of one backup run plus the VM's configuration.

    REPO/<vm-uuid>/points/<point>.config.json   the records (secret: vTPM, NVRAM), 0600
    REPO/<vm-uuid>/points/<point>.json          the VM manifest, written LAST, atomically

The configuration is xapi's records as JSON (VM, VBDs with CD drives and the ISO they
hold, VDIs, VIFs with their network's uuid/name/bridge/VLAN/MTU, vTPM contents), read from
the same VM snapshot the disks are copied from, with one exception: a *unique* vTPM is
copied into a snapshot without its contents (xapi_vtpm.ml ``copy_or_create_contents``:
"Contents from unique vtpms cannot be copied!"), so its contents are read from the live
VM right after the snapshot (``VTPM.get_contents``, root only) and ``contents_from`` says
so: the TPM's state a moment after the disks' — or, when that read fails, that there are
none and why.  Devices a VM point cannot carry (VUSBs: the snapshot is refused; vGPUs,
PCI passthrough: bound to one host's hardware) are listed under ``not_captured``.

Records rather than ``/export_metadata``'s XVA: with
records restore-vm maps networks itself (``--network FROM=TO``), chooses MACs and SRs, and
works across pools and versions; ``import_metadata`` matches networks by name or creates
them, and an XVA would hold the vTPM in a format we would have to parse to check it
anyway.  Xen Orchestra stores records for the same reasons.

A VM point exists only once its manifest is there; it names each disk's point and the
configuration file with its sha256, so verify can tell a damaged configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xencbt_core.errors import XapiError

from ..errors import RepositoryError
from . import repokey
from .layout import POINT, make_dirs, write_atomically
from .repository import Repository

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"
FORMAT = 1
DIR = "points"
# VM fields restore-vm gives VM.create (ocaml/idl/datamodel_vm.ml names).
VM_FIELDS = (
    "name_label",
    "name_description",
    "user_version",
    "VCPUs_max",
    "VCPUs_at_startup",
    "VCPUs_params",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "platform",
    "HVM_boot_policy",
    "HVM_boot_params",
    "HVM_shadow_multiplier",
    "PV_args",
    "PV_bootloader",
    "PV_bootloader_args",
    "PV_kernel",
    "PV_ramdisk",
    "PV_legacy_args",
    "PCI_bus",
    "recommendations",
    "bios_strings",
    "NVRAM",
    "tags",
    "other_config",
    "xenstore_data",
    "has_vendor_device",
    "domain_type",
    "actions_after_softreboot",
    "hardware_platform_version",
    "reference_label",
    "order",
    "start_delay",
    "shutdown_delay",
)
# Fields a VM snapshot does not copy (xapi_vm_clone.ml copy_vm_record resets them: an
# appliance's boot order and delays belong to the VM, not to its snapshots): read from
# the live VM, right after the snapshot, as a unique vTPM's contents are.
FROM_LIVE = ("order", "start_delay", "shutdown_delay")
# other_config:pci asks for a host's PCI device at start (passthrough): it is named in
# not_captured instead, since the restored VM may be on another host or pool.
PCI_KEY = "pci"
# Where a vTPM's contents in the point came from (the point's ``contents_from``).
FROM_SNAPSHOT = "snapshot"
FROM_LIVE_VM = "live VM right after the snapshot"
FROM_NOWHERE = "none"
# other_config keys that belong to one VM instance, not to its configuration.
DROP_OTHER_CONFIG = ("mac_seed", "xencbt-restore", "import_task", "mac_seed_", PCI_KEY)
VBD_FIELDS = ("userdevice", "bootable", "mode", "type", "empty", "unpluggable", "other_config")
VBD_FIELDS += ("qos_algorithm_type", "qos_algorithm_params")
VDI_FIELDS = ("name_label", "name_description", "virtual_size", "sharable", "read_only")
VDI_FIELDS += ("other_config",)
VIF_FIELDS = ("device", "MAC", "MTU", "locking_mode", "ipv4_allowed", "ipv6_allowed")
VIF_FIELDS += ("other_config", "qos_algorithm_type", "qos_algorithm_params")


@dataclass
class VmManifest:
    point: str
    vm_uuid: str
    vm_name: str
    disks: list[dict] = field(default_factory=list)  # {userdevice, vdi_uuid, point}
    config: str = ""
    config_sha256: str = ""
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VmManifest:
        data = json.loads(text)
        m = cls(**data)
        if not (POINT.match(m.point) and m.config and isinstance(m.disks, list)):
            raise ValueError("not a VM manifest")
        return m


def capture(call, snap_vm: str, live_name: str, live_vm: str | None = None) -> dict:
    """The configuration of the VM whose snapshot is ``snap_vm``, as plain records; its
    unique vTPM's contents from ``live_vm`` (read now: call this right after the
    snapshot)."""
    rec = call("VM.get_record", snap_vm)
    vm = {k: rec[k] for k in VM_FIELDS if k in rec}
    vm["name_label"] = live_name  # the snapshot's own name is ours
    if live_vm is not None:
        vm.update({k: call("VM.get_%s" % k, live_vm) for k in FROM_LIVE})
    vm["other_config"] = {
        k: v for k, v in rec.get("other_config", {}).items() if k not in DROP_OTHER_CONFIG
    }
    vbds, vdis = [], {}
    for ref in rec["VBDs"]:
        vbd = call("VBD.get_record", ref)
        row = {k: vbd[k] for k in VBD_FIELDS if k in vbd}
        row["vdi_uuid"] = None
        if vbd["VDI"] != NULL_REF and vbd["type"] == "Disk":
            vdi = call("VDI.get_record", vbd["VDI"])
            uuid = vdi["snapshot_of"] and call("VDI.get_uuid", vdi["snapshot_of"])
            row["vdi_uuid"] = uuid  # the live disk: the chain's name in the repository
            vdis[uuid] = {k: vdi[k] for k in VDI_FIELDS if k in vdi}
            # A disk's snapshot need not carry its other_config: the live disk's, now.
            vdis[uuid]["other_config"] = call("VDI.get_other_config", vdi["snapshot_of"])
            vdis[uuid]["SR"] = call("SR.get_uuid", vdi["SR"])
        elif vbd["VDI"] != NULL_REF:  # a CD drive holding an ISO: not copied, named
            iso = call("VDI.get_record", vbd["VDI"])
            row["iso"] = {"uuid": iso["uuid"], "name_label": iso["name_label"]}
        vbds.append(row)
    vifs = [vif_record(call, ref) for ref in rec.get("VIFs", [])]
    vtpms = [vtpm_record(call, ref, live_vm) for ref in rec.get("VTPMs", [])]
    return {
        "format": FORMAT,
        "vm": vm,
        "vbds": vbds,
        "vdis": vdis,
        "vifs": vifs,
        "vtpms": vtpms,
        "not_captured": not_captured(call, rec, live_vm),
    }


def vtpm_record(call, ref: str, live_vm: str | None) -> dict:
    """A vTPM of the snapshot: a non-unique one carries its contents (xapi copied them);
    a unique one's copy is blank (xapi_vtpm.ml copy), so they are read from the live VM's
    vTPM, a moment after the snapshot was taken."""
    unique = bool(call("VTPM.get_is_unique", ref))
    if not unique:
        return {
            "is_unique": False,
            "contents": call("VTPM.get_contents", ref),
            "contents_from": FROM_SNAPSHOT,
        }
    why = "the live VM was not given"
    if live_vm is not None:
        try:
            live = call("VM.get_VTPMs", live_vm)
            if len(live) == 1:
                contents = call("VTPM.get_contents", live[0])
                return {"is_unique": True, "contents": contents, "contents_from": FROM_LIVE_VM}
            why = "the live VM has %d vTPMs" % len(live)
        except XapiError as e:  # e.g. RBAC_PERMISSION_DENIED: get_contents is root only
            why = "VTPM.get_contents of the live VM failed: %s" % e.code
    return {"is_unique": True, "contents": "", "contents_from": FROM_NOWHERE, "why": why}


def not_captured(call, rec: dict, live_vm: str | None = None) -> list[str]:
    """What the VM has that a VM point does not carry, one phrase each: vGPUs, PCI
    devices (attached to the live VM, or asked for by other_config:pci)."""
    out = []
    vgpus = rec.get("VGPUs", []) if live_vm is None else call("VM.get_VGPUs", live_vm)
    if live_vm is not None:
        for ref in call("VM.get_attached_PCIs", live_vm):
            pci = call("PCI.get_record", ref)
            out.append(
                "PCI device %s (%s %s) passed through (a host's device; pass it through "
                "again where there is one)"
                % (pci.get("pci_id", ""), pci.get("vendor_name", ""), pci.get("device_name", ""))
            )
    for ref in vgpus:
        try:
            kind = call("VGPU_type.get_model_name", call("VGPU.get_type", ref))
        except XapiError:
            kind = "vGPU"
        out.append("vGPU %s (bound to a host's GPU; add it again: xe vgpu-create)" % kind)
    pci = rec.get("other_config", {}).get(PCI_KEY)
    if pci:
        out.append(
            "PCI passthrough other_config:pci=%s (a host's device; set it again where "
            "that device is)" % pci
        )
    return out


def vif_record(call, ref: str) -> dict:
    vif = call("VIF.get_record", ref)
    row = {k: vif[k] for k in VIF_FIELDS if k in vif}
    net = call("network.get_record", vif["network"])
    vlans = {int(call("PIF.get_VLAN", p)) for p in net.get("PIFs", [])}
    row["network"] = {
        "uuid": net["uuid"],
        "name_label": net["name_label"],
        "bridge": net.get("bridge", ""),
        "MTU": int(net.get("MTU", 1500)),
        "VLAN": max(vlans) if vlans else -1,
    }
    return row


class VmPoints:
    """The VM points of one VM in the repository."""

    def __init__(self, repo: Repository, vm_uuid: str):
        self.path = repo.root / vm_uuid / DIR
        self.vm_uuid = vm_uuid

    def manifest_path(self, point: str) -> Path:
        return self.path / (point + ".json")

    def config_path(self, point: str) -> Path:
        return self.path / (point + ".config.json")

    def write_config(self, point: str, config: dict) -> str:
        """The configuration file (0600: it holds the vTPM and NVRAM); its sha256."""
        make_dirs(self.path)
        text = json.dumps(config, indent=1, sort_keys=True) + "\n"
        path = self.config_path(point)
        write_atomically(path, repokey.sealed(path, text.encode()))  # vTPM, NVRAM
        return hashlib.sha256(text.encode()).hexdigest()

    def commit(self, manifest: VmManifest) -> None:
        write_atomically(self.manifest_path(manifest.point), manifest.to_json())

    def manifests(self) -> list[VmManifest]:
        found = []
        if not self.path.is_dir():
            return found
        for p in sorted(self.path.glob("*.json")):
            if not POINT.match(p.stem):
                continue
            try:
                found.append(VmManifest.from_json(p.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as e:
                log.warning("VM %s: VM point %s is unreadable: %s", self.vm_uuid, p.stem, e)
        return found

    def get(self, at: str | None) -> VmManifest:
        points = self.manifests()
        if not points:
            raise RepositoryError("VM %s has no VM points (back it up first)" % self.vm_uuid)
        if at is None:
            return points[-1]
        matches = [m for m in points if m.point == at] or [
            m for m in points if m.point.startswith(at)
        ]
        if len(matches) != 1:
            raise RepositoryError(
                "%s VM point %s of VM %s (xencbt list shows them)"
                % ("no" if not matches else "more than one", at, self.vm_uuid)
            )
        return matches[0]

    def load_config(self, m: VmManifest) -> dict:
        """The configuration, checked against the manifest's sha256 (never printed)."""
        path = self.path / m.config
        try:
            data = repokey.opened(path, path.read_bytes())
        except FileNotFoundError:
            raise RepositoryError(
                "the configuration of VM point %s of VM %s is missing (%s)"
                % (m.point, self.vm_uuid, m.config)
            ) from None
        except RepositoryError as e:  # sealed: damaged, moved, or no key
            raise RepositoryError(
                "the configuration of VM point %s of VM %s: %s" % (m.point, self.vm_uuid, e)
            ) from None
        if hashlib.sha256(data).hexdigest() != m.config_sha256:
            raise RepositoryError(
                "the configuration of VM point %s of VM %s does not match its checksum: "
                "it is damaged" % (m.point, self.vm_uuid)
            )
        try:
            config = json.loads(data)
            config["vm"], config["vbds"], config["vifs"]  # noqa: B018
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(
                "the configuration of VM point %s of VM %s does not parse" % (m.point, self.vm_uuid)
            ) from None
        return config

    def remove(self, point: str) -> None:
        """Manifest first (the VM point stops existing), then its configuration."""
        for path in (self.manifest_path(point), self.config_path(point)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def strays(self) -> list[Path]:
        """Configurations no manifest names: a backup killed before its manifest."""
        if not self.path.is_dir():
            return []
        named = {m.config for m in self.manifests()}
        temp = [p for p in self.path.iterdir() if p.name.endswith(".tmp")]
        configs = [p for p in self.path.glob("*.config.json") if p.name not in named]
        return sorted(temp + configs)


def all_vm_points(repo: Repository) -> list[VmPoints]:
    if not repo.root.is_dir():
        return []
    return [VmPoints(repo, d.parent.name) for d in sorted(repo.root.glob("*/" + DIR))]
