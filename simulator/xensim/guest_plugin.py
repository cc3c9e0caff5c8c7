"""nbdkit Python plugin behind ``xensim guest-disk``: the live VDI as its guest sees it.

Loaded by nbdkit's embedded system Python, not imported as part of the package:
``nbdkit python guest_plugin.py simdir=… state_dir=… vdi=… ready_fd=N``. Every write,
write-zeroes and trim happens under the VDI's lock and marks exactly the 64 KiB blocks it
touches in the VDI's CBT log, so a snapshot never splits a write from its mark.

``untracked=1`` is a fault, not xapi's behaviour: the writes land but no block is marked,
a change tracker that lies (what a CBT bug looks like: xen-orchestra #3065, #8713), for
the tests and drills of xencbt's CBT canary.
"""

import builtins
import os
import sys

import nbdkit

API_VERSION = 2

_config = {}
_fd = None


def config(key, value):
    _config[key] = value
    if key == "simdir" and value not in sys.path:
        sys.path.insert(0, value)


def config_complete():
    for key in ("simdir", "state_dir", "vdi"):
        if key not in _config:
            raise RuntimeError(f"{key}= is required")


def after_fork():
    # The socket is bound by now: tell the parent it can publish the URI.
    ready = _config.get("ready_fd")
    if ready:
        os.write(int(ready), b"ready\n")
        os.close(int(ready))


def open(readonly):
    from xensim import disks

    global _fd
    if _fd is None:
        path = disks.data_path(_config["state_dir"], _config["vdi"])
        _fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    return {}


def get_size(h):
    return os.fstat(_fd).st_size


def can_write(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_trim(h):
    return True


def can_flush(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    data = os.pread(_fd, len(buf), offset)
    buf[: len(data)] = data
    buf[len(data) :] = builtins.bytes(len(buf) - len(data))


def pwrite(h, buf, offset, flags):
    with _changing(offset, len(buf)):
        os.pwrite(_fd, buf, offset)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def zero(h, count, offset, flags):
    from xensim import disks

    with _changing(offset, count):
        disks.punch_hole(_fd, offset, count)


def trim(h, count, offset, flags):
    zero(h, count, offset, flags)


def flush(h, flags):
    os.fdatasync(_fd)


class _changing:
    """Hold the VDI lock around a change and mark its blocks before releasing it."""

    def __init__(self, offset, length):
        self.offset, self.length = offset, length

    def __enter__(self):
        from xensim import disks

        self._lock = disks.locked(_config["state_dir"], _config["vdi"])
        self._lock.__enter__()

    def __exit__(self, *exc):
        from xensim import cbtlog

        try:
            if exc[0] is None and _config.get("untracked") != "1":
                cbtlog.mark(_config["state_dir"], _config["vdi"], self.offset, self.length)
        finally:
            self._lock.__exit__(*exc)
