"""The plugin against third-party TLS NBD servers (nbdkit --tls=require, qemu-nbd),
read by the real consumers (nbdcopy, qemu-img, libnbd).  XAPI is replaced by
nbd-info=+FILE / changed=+FILE, which is also how other orchestrators drive the plugin.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import nbd
import pytest
from pki import issue, server_dir
from secretwatch import WATCH
from servers import (
    nbd_info_file,
    nbdkit_upstream,
    plugin_server,
    qemu_nbd_rw,
    qemu_nbd_upstream,
    run_plugin,
)
from xencbt_core import cbt

BLOCK = cbt.BLOCK_SIZE
SIZE = 163 * BLOCK + 4608  # not a multiple of 64 KiB: the last block is short
CHANGED = [0, 5, 6, 40, 41, 42, 163]  # 6 is rewritten to zeros, 163 is the short last block
EXPORT = "/4f1c2d3e-0000-4000-8000-00000000cafe?session_id=OpaqueRef:secret-session-token"
# qemu-nbd plays the host, which knows its export names: only its argv may hold this one.
WATCH.allow(EXPORT, where="argv (qemu-nbd)")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Base and new disk images differing exactly in CHANGED."""
    d = tmp_path_factory.mktemp("images")
    base = bytearray(os.urandom(SIZE))
    base[100 * BLOCK : 120 * BLOCK] = bytes(20 * BLOCK)  # a hole that stays a hole
    new = bytearray(base)
    for b in CHANGED:
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, SIZE)
        new[lo:hi] = bytes(hi - lo) if b == 6 else os.urandom(hi - lo)
    (d / "base.raw").write_bytes(base)
    (d / "new.raw").write_bytes(new)
    (d / "changed.b64").write_text(cbt.encode(CHANGED, SIZE))
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = issue("Test CA", ca=True)
    server = issue("nbd.example.test", dns=["nbd.example.test"], ips=["127.0.0.1"], issuer=ca)
    return {"dir": server_dir(d / "server", server, ca), "ca": ca, "server": server, "root": d}


@pytest.fixture(params=["nbdkit", "qemu-nbd"])
def upstream(request, images, pki, tmp_path):
    """A TLS NBD server (third-party code) serving new.raw; yields the get_nbd_info record."""
    image = images / "new.raw"
    if request.param == "nbdkit":
        ctx = nbdkit_upstream(image, tmp_path, pki["dir"])
    else:
        ctx = qemu_nbd_upstream(image, tmp_path, pki["dir"], EXPORT)
    with ctx as port:
        yield {
            "address": "127.0.0.1",
            "port": port,
            "cert": pki["server"].cert_pem,
            "subject": "nbd.example.test",
            "exportname": EXPORT,
        }


def params_for(tmp_path: Path, record: dict, *extra: str) -> list[str]:
    return ["nbd-info=+%s" % nbd_info_file(tmp_path, record), *extra]


def test_full_copy_nbdcopy_is_byte_identical(upstream, images, tmp_path):
    out = tmp_path / "out.raw"
    r = run_plugin(params_for(tmp_path, upstream), 'nbdcopy "$uri" %s' % out, verbose=True)
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(images / "new.raw")
    assert EXPORT not in r.stderr + r.stdout
    assert "secret-session-token" not in r.stderr + r.stdout


def test_full_copy_qemu_img_is_byte_identical(upstream, images, tmp_path):
    out = tmp_path / "out.raw"
    r = run_plugin(
        params_for(tmp_path, upstream, "connections=4"),
        'qemu-img convert -f raw -O raw "$uri" %s' % out,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == SIZE
    assert sha(out) == sha(images / "new.raw")


def test_libnbd_reads_unaligned_ranges(upstream, images, tmp_path):
    want = (images / "new.raw").read_bytes()
    with plugin_server(params_for(tmp_path, upstream), tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.get_size() == SIZE
        assert h.is_read_only()
        for offset, length in [(1, 100), (BLOCK - 3, 7), (SIZE - 700, 700), (12345, 3 * BLOCK)]:
            assert h.pread(length, offset) == want[offset : offset + length]
        h.shutdown()


def test_incremental_overlay_holds_exactly_the_changed_blocks(upstream, images, tmp_path):
    prev = tmp_path / "prev.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", images / "base.raw", prev], check=True
    )
    new = tmp_path / "new.qcow2"
    params = params_for(tmp_path, upstream, "changed=+%s" % (images / "changed.b64"))
    run = 'qemu-img convert -f raw -O qcow2 -B %s -F qcow2 "$uri" %s' % (prev, new)
    r = run_plugin(params, run)
    assert r.returncode == 0, r.stderr

    top = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", new], check=True, capture_output=True
        ).stdout
    )
    written = set()
    for e in top:
        if e["depth"] == 0 and (e["data"] or e["zero"]):
            written.update(range(e["start"] // BLOCK, -(-(e["start"] + e["length"]) // BLOCK)))
    assert written == set(CHANGED)

    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", new, flat], check=True)
    assert sha(flat) == sha(images / "new.raw")


def test_unchanged_zero_patches_a_copy_in_place_with_nbdcopy(upstream, images, tmp_path):
    copy = tmp_path / "copy.raw"
    copy.write_bytes((images / "base.raw").read_bytes())
    params = params_for(
        tmp_path, upstream, "changed=+%s" % (images / "changed.b64"), "unchanged=zero"
    )
    with qemu_nbd_rw(copy, tmp_path) as dest:
        run = 'nbdcopy --destination-is-zero --request-size=65536 -S 0 "$uri" "%s"' % dest
        r = run_plugin(params, run)
        assert r.returncode == 0, r.stderr
    assert sha(copy) == sha(images / "new.raw")


def test_block_status_follows_the_bitmap(upstream, images, tmp_path):
    params = params_for(tmp_path, upstream, "changed=+%s" % (images / "changed.b64"))
    r = run_plugin(params, 'nbdinfo --map --json "$uri"')
    assert r.returncode == 0, r.stderr
    extents = json.loads(r.stdout)
    assert sum(e["length"] for e in extents) == SIZE
    data = set()
    for e in extents:
        assert e["type"] in (0, 1), e  # data, or hole without zero
        if e["type"] == 0:
            data.update(range(e["offset"] // BLOCK, -(-(e["offset"] + e["length"]) // BLOCK)))
    assert data == set(CHANGED)
