#!/usr/sbin/nbdkit python
"""nbdkit-xencbt-plugin: a XenServer VDI snapshot over pinned TLS NBD, with its CBT
bitmap as block status.

    nbdkit python plugin/xencbt.py xapi=https://POOL password=+FILE vdi=SNAP [since=BASE]
    nbdkit python plugin/xencbt.py xapi=https://POOL password=+FILE vm=VMSNAP [since=OLDER]
    nbdkit xencbt ...                 (once installed)
    nbdkit xencbt --dump-plugin       (versions, capabilities, every parameter)

Only glue lives here: each callback hands over to xencbt_core.backend.
"""

import errno
import functools
import logging
import os
import sys
import traceback

import nbdkit

# From a checkout the core sits next to this file; once installed it is on sys.path.
_here = os.path.dirname(os.path.realpath(__file__))
if os.path.isdir(os.path.join(_here, "xencbt_core")):
    sys.path.insert(0, _here)

from xencbt_core.backend import dump  # noqa: E402
from xencbt_core.errors import XencbtError  # noqa: E402
from xencbt_core.params import Params  # noqa: E402
from xencbt_core.secret import ScrubFilter, scrub  # noqa: E402
from xencbt_core.vmexport import backend_for  # noqa: E402

API_VERSION = 2

_params = Params()
_backend = None


class _NbdkitLog(logging.Handler):
    """Debug to nbdkit -v; warnings and errors always to stderr, like nbdkit's own."""

    def emit(self, record):
        text = self.format(record)
        if record.levelno < logging.WARNING:
            nbdkit.debug(text)
        else:
            sys.stderr.write("nbdkit: xencbt: %s: %s\n" % (record.levelname.lower(), text))


def _setup_logging():
    handler = _NbdkitLog()
    handler.addFilter(ScrubFilter())
    root = logging.getLogger("xencbt_core")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    root.propagate = False


_setup_logging()


class _Explained(Exception):
    """An error already worded for the administrator: nbdkit shows its text only."""


# nbdkit's python plugin reports what a callback raised with the module attribute
# traceback.format_exception(type, value, tb), looked up at each failure, and logs the
# joined lines with nbdkit_error (nbdkit 1.32 plugins/python/errors.c,
# print_python_traceback); the nbdkit module has no call to log an error instead.  A
# traceback under a one-line explanation only hides it, so that attribute is the one
# hook: this wrapper gives an _Explained error's message alone, and hands every call to
# the original, unchanged, which also formats (and raises) exactly as before for any
# other value and any signature (3.9's (etype, value, tb, ...), 3.10's (exc, /, value,
# tb, ...)).  Real bugs keep their traceback.
_format_exception = traceback.format_exception


@functools.wraps(_format_exception)
def _format_explained(*args, **kwargs):
    lines = _format_exception(*args, **kwargs)
    value = args[1] if len(args) > 1 else kwargs.get("value", args[0] if args else None)
    return [str(value)] if isinstance(value, _Explained) else lines


traceback.format_exception = _format_explained


def _fail(e):
    """Re-raise as one short, scrubbed exception so nbdkit prints a readable error."""
    nbdkit.set_error(getattr(e, "errno", errno.EIO))
    raise _Explained(scrub(str(e))) from None


def dump_plugin():
    for key, value in dump().items():
        print("%s=%s" % (key, value))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    try:
        _params.set(key, value)
    except XencbtError as e:
        _fail(e)


def config_complete():
    global _backend
    try:
        _backend = backend_for(_params)
    except XencbtError as e:
        _fail(e)


def get_ready():
    try:
        _backend.start()
    except XencbtError as e:
        _backend.close()
        _fail(e)


def after_fork():
    _backend.after_fork()


def cleanup():
    if _backend is not None:
        _backend.close()


def list_exports(readonly, is_tls):
    return _backend.list_exports()


def default_export(readonly, is_tls):
    return _backend.default_export()


def open(readonly):
    # The handle is the export (one per disk with vm=); it answers the callbacks below.
    try:
        return _backend.open(nbdkit.export_name())
    except XencbtError as e:
        _fail(e)


def export_description(h):
    return h.description


def get_size(h):
    return h.size


def block_size(h):
    # Any alignment is accepted (the pool widens reads to the host's 512 bytes);
    # 64 KiB is the CBT block, so the preferred unit.
    return (1, 64 * 1024, 32 * 1024 * 1024)


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except XencbtError as e:
        _fail(e)


def extents(h, count, offset, flags):
    return h.extents(count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))
