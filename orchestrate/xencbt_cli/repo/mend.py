"""What ``xencbt repair`` mends beyond leftovers: a point's checksum file (``.sums``).

A point's ``.sums`` (digest.py) is what the next incremental carries over and what
verify names a damaged chunk with.  When it is missing or damaged, it is rebuilt only
when that is provable: the image is read whole, its chunk digests computed, and they are
written only if they combine to the ``digest`` the manifest recorded at backup time
(sha256 over the very sums and the disk size: equal digests mean the same sums, and
the image reads back as it was backed up).  An image that no longer reads back as
recorded gets no sums made up: checksums computed from damaged data would launder the
damage into a point that then verifies; the point is named, and the way out (restore
the nearest intact point, or prune the damaged one) is verify's.  Format-1 points (a
whole-disk sha256, no sidecar) have nothing to rebuild.
"""

from __future__ import annotations

import logging

from ..errors import CliError
from . import digest, repokey
from .layout import write_atomically
from .manifest import Manifest
from .repository import Chain

log = logging.getLogger(__name__)


def sums(chain: Chain, m: Manifest) -> tuple[bool, str] | None:
    """None when point ``m``'s sums are intact (or it has none to have); else (rebuilt,
    what was done or why not).  Call with the chain's lock held."""
    if not m.digest:
        return None
    path = chain.sums_path(m.point)
    try:
        digest.load_sums(path, m.virtual_size, m.chunk_size, m.digest)
        return None
    except digest.SumsDamaged as e:
        why = str(e)
    try:
        found, size = digest.image_sums(chain.image_path(m.point), m.chunk_size)
    except CliError as e:
        return False, "%s, and it cannot be rebuilt: the image cannot be read (%s)" % (
            why,
            " ".join(str(e).split())[-200:],
        )
    if size != m.virtual_size or digest.combine(found, size) != m.digest:
        return False, (
            "%s, and it cannot be rebuilt: the image no longer reads back as recorded at "
            "backup time (checksums made from it would hide the damage); xencbt verify "
            "names the nearest intact point" % why
        )
    write_atomically(path, repokey.sealed(path, found))
    return True, "%s: rebuilt from the image, which reads back as recorded" % why
