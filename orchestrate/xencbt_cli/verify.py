"""Verify a repository: qemu-img check, the backing chain against the manifests, and the
sha256 of every point's whole virtual disk against the one recorded at backup time."""

from __future__ import annotations

import logging
import os

from . import image
from .errors import CliError, VerifyFailed
from .repository import Chain, Manifest, Repository

log = logging.getLogger(__name__)


def expected_chain(chain: Chain, m: Manifest, by_point: dict[str, Manifest]) -> list[str]:
    names = []
    current: Manifest | None = m
    while current is not None:
        names.append(current.image)
        if current.base_point is None:
            break
        current = by_point.get(current.base_point)
        if current is None:
            names.append("<missing manifest>")
    return names


def check_point(chain: Chain, m: Manifest, by_point: dict[str, Manifest]) -> str | None:
    """None when the point is sound, else what is wrong with it."""
    path = chain.image_path(m.point)
    if not path.is_file():
        return "image %s is missing" % path.name
    try:
        image.check(path)
        infos = image.info_chain(path)
    except CliError as e:
        return "qemu-img: %s" % e
    got = [os.path.basename(i["filename"]) for i in infos]
    want = expected_chain(chain, m, by_point)
    if got != want:
        return "backing chain is %s, the manifests say %s" % (" <- ".join(got), " <- ".join(want))
    if infos[0]["virtual-size"] != m.virtual_size:
        return "virtual size %d, manifest says %d" % (infos[0]["virtual-size"], m.virtual_size)
    try:
        digest = image.sha256(path)
    except CliError as e:
        return "cannot read the image: %s" % e
    if digest != m.sha256:
        return "sha256 %s, manifest recorded %s at backup time" % (digest, m.sha256)
    return None


def verify(repo: Repository, vdis: list[str], say) -> int:
    chains = [repo.find(v) for v in vdis] if vdis else repo.chains()
    failures = []
    count = 0
    for chain in chains:
        with chain.lock(wait=True):
            chain.clean()
            points = chain.points()
            by_point = {m.point: m for m in points}
            for m in points:
                count += 1
                problem = check_point(chain, m, by_point)
                if problem:
                    failures.append("VDI %s point %s: %s" % (chain.vdi_uuid, m.point, problem))
                    say("FAILED " + failures[-1])
                else:
                    say("ok     VDI %s point %s" % (chain.vdi_uuid, m.point))
    if failures:
        raise VerifyFailed(
            "%d of %d points failed verification:\n  %s"
            % (len(failures), count, "\n  ".join(failures))
        )
    return count
