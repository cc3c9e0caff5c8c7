"""Inputs made once and cached in bench/cache/ (gitignored): a dense disk image and a PKI.

The image is an AES-CTR keystream over zeros: every block differs from every other (no
dedup or compression can flatter a figure), nothing is a hole, and openssl writes it at
disk speed — a Python loop would take minutes for 4 GiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .procs import ROOT, SUBJECT, BenchError

CACHE = ROOT / "bench" / "cache"


def dense_image(size: int) -> Path:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / ("dense-%dM.raw" % (size >> 20))
    if path.exists() and path.stat().st_size == size:
        return path
    print("making %s (%d MiB of non-repeating data, once)" % (path.name, size >> 20), flush=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as out:
        zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        cipher = ["openssl", "enc", "-aes-128-ctr", "-nosalt", "-pbkdf2", "-pass", "pass:xencbt"]
        code = subprocess.call(cipher, stdin=zeros.stdout, stdout=out)
        zeros.stdout.close()
        zeros.wait()
    if code != 0 or tmp.stat().st_size != size:
        tmp.unlink(missing_ok=True)
        raise BenchError("openssl could not make the %d-byte test image" % size)
    os.replace(tmp, path)
    return path


def certificates() -> Path:
    """A CA and a server certificate for 127.0.0.1, in the layout nbdkit and qemu read."""
    certs = CACHE / "certs"
    if (certs / "server-key.pem").exists():
        return certs
    sys.path.insert(0, str(ROOT / "tests"))
    import pki  # the tests' certificate helpers (cryptography)

    ca = pki.issue("xencbt bench CA", ca=True)
    host = pki.issue(SUBJECT, dns=[SUBJECT], ips=["127.0.0.1"], issuer=ca)
    pki.server_dir(certs, host, ca)
    return certs
