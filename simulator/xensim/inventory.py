"""The pool a new state dir starts with: hosts, SR, networks, demo VMs and their disks.

Shape of a small real pool: host0 is the master; one ``ext`` SR (shared when there are
several hosts, a PBD per host: a simplification, local SRs are per host in reality); a
management network and a dedicated "NBD network", each with a PIF carrying an IP on
every host (the NBD PIFs also carry IPv6 addresses, as a dual-stack pool's do); dom0
control-domain VMs, which clients must filter out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import disks, records
from .database import Database


@dataclass
class HostSpec:
    name: str
    address: str
    cert_pem: str
    subject: str


SR_SIZE = 1 << 40


def build(
    db: Database,
    state_dir: Path,
    hosts: list[HostSpec],
    vm_count: int,
    disk_sizes: list[int],
    nbd_purpose: str,
    srs: str = "shared",
) -> None:
    host_refs = [
        db.add("host", records.host(h.name, h.address, h.cert_pem, h.subject)) for h in hosts
    ]
    if srs == "local":
        placement = _local_srs(db, host_refs, hosts)
    else:
        sr_ref = db.add("SR", records.sr("Local storage", len(hosts) > 1, SR_SIZE))
        for ref in host_refs:
            db.add("PBD", records.pbd(ref, sr_ref))
        placement = [(host_refs[0], sr_ref)]
    db.add("pool", records.pool(host_refs[0], placement[0][1]))
    purpose = [] if nbd_purpose == "none" else [nbd_purpose]
    mgmt = db.add(
        "network", records.network("Pool-wide network associated with eth0", "xenbr0", [])
    )
    nbd = db.add("network", records.network("NBD network", "xenbr1", purpose))
    for index, (ref, spec) in enumerate(zip(host_refs, hosts)):
        db.add("PIF", records.pif(ref, mgmt, "eth0", spec.address, management=True))
        nbd_pif = records.pif(ref, nbd, "eth1", spec.address, management=False)
        nbd_pif.update(IPv6=ipv6_addresses(index), ipv6_configuration_mode="Static")
        db.add("PIF", nbd_pif)
        dom0 = records.vm(f"Control domain on host: {spec.name}", control_domain=True)
        dom0["resident_on"] = ref
        db.add("VM", dom0)
    for i in range(vm_count):
        host, sr_ref = placement[i % len(placement)]
        name = "demo-vm" if i == 0 else f"demo-vm-{i + 1}"
        _demo_vm(db, state_dir, name, sr_ref, disk_sizes, host)


def ipv6_addresses(index: int) -> list[str]:
    """A dual-stack NBD PIF's PIF.IPv6: a global address and the link-local one, in CIDR
    form as xapi stores them.  xapi-nbd listens on IPv4 only, so neither answers NBD; the
    global one is from the documentation prefix (RFC 3849) so that nothing answers it."""
    return [f"2001:db8::{index + 1:x}/64", f"fe80::{index + 1:x}/64"]


def _local_srs(db: Database, host_refs: list[str], hosts: list[HostSpec]) -> list[tuple]:
    """``--srs local``: each host has its own SR, plugged on it alone, as real local
    storage is, and VMs are placed round-robin over the hosts; ``get_nbd_info`` of a VM's
    disks then names only its host, so a pool's NBD load spreads over the hosts.
    Returns (host, SR) per host."""
    placement = []
    for ref, spec in zip(host_refs, hosts):
        local = db.add("SR", records.sr(f"Local storage on {spec.name}", False, SR_SIZE))
        db.add("PBD", records.pbd(ref, local))
        placement.append((ref, local))
    return placement


def _demo_vm(
    db: Database, state_dir: Path, name: str, sr_ref: str, sizes: list[int], host: str
) -> None:
    vm = records.vm(name)
    vm["resident_on"] = host
    vm_ref = db.add("VM", vm)
    for device, size in enumerate(sizes):
        vdi = records.vdi(f"{name} disk {device}", sr_ref, size)
        vdi_ref = db.add("VDI", vdi)
        disks.create(state_dir, vdi["uuid"], size)
        vbd = records.vbd(vm_ref, vdi_ref, str(device))
        vbd["currently_attached"] = True
        db.add("VBD", vbd)
