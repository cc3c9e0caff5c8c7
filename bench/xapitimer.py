"""Run the xencbt command with every XAPI call it makes timed, by method name only.

    python -m bench.xapitimer OUT.json xencbt-arguments…

Figure 6 splits a backup's fixed overhead per XAPI call with it.  The times are the
calls' wall time as the command sees them (XML-RPC round trip, the simulator's work and
its waits, as for VM.snapshot); the arguments (a session ref among them) are not kept.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time


def main() -> int:
    out, args = sys.argv[1], sys.argv[2:]
    from xencbt_cli import main as cli
    from xencbt_core import xapi

    calls: dict[str, list[float]] = {}  # method -> [count, seconds]
    lock = threading.Lock()
    raw_call = xapi.Session._raw_call

    def timed(self, method: str, *a):
        t0 = time.monotonic()
        try:
            return raw_call(self, method, *a)
        finally:
            with lock:
                entry = calls.setdefault(method, [0, 0.0])
                entry[0] += 1
                entry[1] += time.monotonic() - t0

    def write() -> None:
        with open(out, "w") as f:
            json.dump(calls, f)

    xapi.Session._raw_call = timed
    atexit.register(write)
    sys.argv = ["xencbt", *args]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
