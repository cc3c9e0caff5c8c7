"""Helpers (no tests) for chains built by hand in a repository, without a pool: real
qemu-img images, each point writing a distinct pattern, committed with their manifests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_support import sha
from xencbt_cli.jobs import verify
from xencbt_cli.repo import digest, image
from xencbt_cli.repo.manifest import Manifest
from xencbt_cli.repo.repository import Repository

VM = "11111111-1111-4111-8111-111111111111"
VDI = "22222222-2222-4222-8222-222222222222"
SIZE = 1 << 20
CHUNK = 4 * 65536


def qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path], check=True, capture_output=True)


def make_chain(tmp_path: Path, n: int, old: bool = False):
    """n points, each writing a distinct pattern, with chunk digests of 4 blocks (their
    sums sidecar), or ``old``: format-1 manifests with only the whole-disk sha256.
    Returns (chain, [(point, sha of the flattened disk)])."""
    chain = Repository(tmp_path / "repo").chain(VM, VDI)
    chain.path.mkdir(parents=True)
    made = []
    base = None
    for i in range(n):
        point = "20250101T00000%d.000000Z" % i
        partial = chain.partial_path(point)
        argv = ["qemu-img", "create", "-f", "qcow2", partial, str(SIZE)]
        if base:
            argv[4:4] = ["-b", base + ".qcow2", "-F", "qcow2"]
        subprocess.run(argv, check=True, capture_output=True)
        qemu_io(partial, "write -P %d %d 65536" % (i + 1, i * 65536))
        chain.publish_image(point)
        whole = image.sha256(chain.image_path(point))
        m = Manifest(
            point,
            VM,
            "vm",
            VDI,
            "disk",
            "0",
            "snap%d" % i,
            "incremental" if base else "full",
            SIZE,
            base_point=base,
        )
        if old:
            m.format, m.sha256 = 1, whole
            chain.commit(m)
        else:
            sums, _ = digest.image_sums(chain.image_path(point), CHUNK)
            m.digest, m.digest_kind, m.chunk_size = digest.combine(sums, SIZE), digest.KIND, CHUNK
            chain.commit(m, sums)
        made.append((point, whole))
        base = point
    return chain, made


def flat_sha(path: Path, tmp_path: Path) -> str:
    out = tmp_path / "flat.raw"
    image.flatten(path, out, "raw")
    return sha(out.read_bytes())


def verified(chain) -> list[str]:
    """verify's problems with each point of the chain (None: sound)."""
    by_point = {m.point: m for m in chain.points()}
    return [verify.check_point(chain, m, by_point) for m in by_point.values()]
