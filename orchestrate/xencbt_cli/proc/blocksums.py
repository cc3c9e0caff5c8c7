"""The sha256 of given byte ranges of an NBD export, for the CBT canary (jobs/canary.py).

Run by the copy's nbdkit (``--run``, after the disk's qemu-img) while the snapshot is
exported, so the sample costs no second XAPI login nor nbdkit:

    python -S …/proc/blocksums.py RANGES OUT URI      (the standard library and libnbd only)

RANGES: a JSON list of [offset, length]; OUT gets {"sums": [hex, …], "seconds": t}.
Only digests leave this process, never the guest's data.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time


def digests(h, ranges, depth: int = 1) -> list[str]:
    """The sha256 of each (offset, length) read through the libnbd handle ``h``, in the
    order given, ``depth`` reads in flight (aio).  The snapshot is read one request at
    a time: more would make the plugin open more upstream connections, each a VBD the
    host plugs, and wait for them (budget.py); a local qemu-nbd takes 16 at once."""
    import nbd

    found: list[str] = [""] * len(ranges)
    todo = list(enumerate(ranges))
    flying: dict[int, tuple[int, nbd.Buffer]] = {}
    while todo or flying:
        while todo and len(flying) < depth:
            i, (offset, length) = todo.pop()
            buf = nbd.Buffer(length)
            flying[h.aio_pread(buf, offset)] = (i, buf)
        h.poll(-1)
        for cookie in [c for c in flying if h.aio_command_completed(c)]:
            i, buf = flying.pop(cookie)
            found[i] = hashlib.sha256(buf.to_bytearray()).hexdigest()
    return found


def sums(uri: str, ranges: list[list[int]]) -> list[str]:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return digests(h, ranges)
    finally:
        h.shutdown()


def main(argv: list[str]) -> int:
    ranges_path, out_path, uri = argv
    with open(ranges_path) as f:
        ranges = json.load(f)
    t0 = time.monotonic()
    found = sums(uri, ranges)
    with open(out_path, "w") as f:
        json.dump({"sums": found, "seconds": round(time.monotonic() - t0, 4)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
