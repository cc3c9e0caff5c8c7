"""``python -m xensim.demo``: the simulator alone, without xencbt (``make demo`` runs
backupdemo.py, the product's demo).

Starts a simulator in a temp dir, logs in with plain XML-RPC, lists the VMs, writes an
ext4 file system (``mkfs.ext4 -d``) into the first one's disk 0 as the guest would,
enables CBT, snapshots the VM, reads the snapshot back over TLS NBD with libnbd
(certificate verified; in this process, so the export name, which embeds a session ref,
is on no command line) and compares checksums, then makes a guest write and a second
snapshot and shows the CBT diff between them. Stops everything, even on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

from . import bitmap

XENSIM = [sys.executable, "-m", "xensim.main"]
CHUNK = 4 << 20  # bytes per NBD read of the demo's copy


class DemoError(Exception):
    pass


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise DemoError(f"{argv[0]} failed: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[str]:
    """Start a xensim command, yield its first stdout line, SIGTERM it afterwards."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line:
            raise DemoError(f"{' '.join(argv[2:4])} did not start; see {log}")
        yield line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


class Api:
    """The stock XML-RPC client, unwrapping xapi's Status/Value envelopes."""

    def __init__(self, url: str, cafile: str) -> None:
        context = ssl.create_default_context(cafile=cafile)
        self.proxy = xmlrpc.client.ServerProxy(url, context=context)
        self.session = ""

    def __call__(self, method: str, *args: object) -> object:
        target = self.proxy
        for part in method.split("."):
            target = getattr(target, part)
        params = args if method.startswith("session.login") else (self.session, *args)
        reply = target(*params)
        if reply["Status"] != "Success":
            raise DemoError(f"{method}: {reply['ErrorDescription']}")
        return reply["Value"]


def make_filesystem(work: Path) -> Path:
    content = work / "content"
    content.mkdir()
    (content / "hello.txt").write_text("Hello from a guest file system backed up over NBD.\n")
    (content / "data.bin").write_bytes(bytes(range(256)) * 4096)
    image = work / "fs.img"
    run("mkfs.ext4", "-q", "-F", "-d", str(content), "-L", "demo", str(image), "16M")
    return image


def read_export(info: dict, tlsdir: Path, out: Path) -> None:
    """The whole export of ``VDI.get_nbd_info``'s record ``info`` into ``out``, over TLS
    with the host's certificate verified.  In this process with libnbd, not with nbdcopy:
    the export name embeds a session ref, and a command line is readable by every user
    of the machine (/proc/PID/cmdline)."""
    import nbd

    (tlsdir / "ca-cert.pem").write_text(info["cert"])
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tlsdir))
    h.set_tls_verify_peer(True)
    h.set_export_name(info["exportname"])
    h.connect_tcp(info["address"], str(info["port"]))
    size = h.get_size()
    with open(out, "wb") as f:
        for offset in range(0, size, CHUNK):
            f.write(h.pread(min(CHUNK, size - offset), offset))
    h.shutdown()


def sha256(path: Path, length: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def demo(work: Path) -> None:
    state_dir = work / "state"
    log = work / "xensim.log"
    step(f"starting xensim serve --state-dir {state_dir}")
    with process([*XENSIM, "serve", "--state-dir", str(state_dir)], log) as ready:
        info = json.loads(ready)
        print(json.dumps(info, indent=1))
        api = Api(info["xapi"], info["ca_file"])
        password = Path(info["password_file"]).read_text().strip()
        api.session = str(api("session.login_with_password", "root", password, "1.1", "demo"))
        try:
            guided_tour(api, info, work, log)
        finally:
            api("session.logout")


def guided_tour(api: Api, info: dict, work: Path, log: Path) -> None:
    records = api("VM.get_all_records")
    vms = {
        r: v for r, v in records.items() if not v["is_control_domain"] and not v["is_a_snapshot"]
    }
    step("VMs in the pool (control domains filtered out)")
    for rec in vms.values():
        print(f"    {rec['name_label']} ({rec['power_state']}), {len(rec['VBDs'])} disks")
    vm = next(iter(vms))
    disks = {api("VBD.get_userdevice", v): api("VBD.get_VDI", v) for v in vms[vm]["VBDs"]}
    vdi = disks["0"]
    uuid = str(api("VDI.get_uuid", vdi))
    image = make_filesystem(work)
    step(f"writing an ext4 image ({image.stat().st_size >> 20} MiB) into disk 0 as its guest")
    with process([*XENSIM, "guest-disk", "--state-dir", info["state_dir"], uuid], log) as uri:
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri)
    step("enabling CBT and snapshotting the VM")
    api("VDI.enable_cbt", vdi)
    snap_vm = api("VM.snapshot", vm, "demo backup")
    snap = next(
        api("VBD.get_VDI", v)
        for v in api("VM.get_VBDs", snap_vm)
        if api("VDI.get_snapshot_of", api("VBD.get_VDI", v)) == vdi
    )
    # IPv4 only: the NBD server does not listen on the PIFs' IPv6 addresses.
    (nbd_info,) = [i for i in api("VDI.get_nbd_info", snap) if ":" not in i["address"]]
    step(f"reading the snapshot over TLS NBD from {nbd_info['address']}:{nbd_info['port']}")
    tlsdir = work / "tls"
    tlsdir.mkdir()
    copy = work / "snapshot.raw"
    started = time.monotonic()
    read_export(nbd_info, tlsdir, copy)
    seconds = time.monotonic() - started
    size = image.stat().st_size
    same = sha256(copy, size) == sha256(image, size)
    print(f"    {copy.stat().st_size >> 20} MiB in {seconds:.2f} s; checksums match: {same}")
    if not same:
        raise DemoError("the snapshot read over NBD differs from what the guest wrote")
    step("a guest write, a second snapshot, and the CBT diff between them")
    with process([*XENSIM, "guest-disk", "--state-dir", info["state_dir"], uuid], log) as uri:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 100K", uri)
    snap2 = api("VDI.snapshot", vdi, {})
    changed = bitmap.blocks(bitmap.decode(str(api("VDI.list_changed_blocks", snap, snap2))))
    print(f"    changed 64 KiB blocks: {changed}")
    api("VM.destroy", snap_vm)
    for ref in (snap, snap2):
        api("VDI.destroy", ref)
    step("done: the simulated XenServer behaved; everything is cleaned up")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xensim-demo-") as tmp:
        try:
            demo(Path(tmp))
        except DemoError as e:
            print(f"demo failed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
