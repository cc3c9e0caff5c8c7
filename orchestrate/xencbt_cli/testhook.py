"""A test-only hook that holds a step open, so the crash tests can stop and kill the
command inside windows that otherwise last one fsync (tests/crash_support.py).

``XENCBT_TEST_PAUSE=step=seconds[,step=seconds…]`` makes ``pause(step)`` sleep that long.
Unset (always, outside the test suite) it does nothing.  Steps:

``write-tmp``   repository.write_atomically: the temp file is written, not yet renamed
``write-done``  repository.write_atomically: renamed into place (a prune's journal is
                then in place while the swap has not happened)
``vdi-extent``  transfer.to_vdi: before each extent is sent (the VDI is partly rewritten)
``restore-partial``  restore.to_file: PATH.partial is checked, not yet renamed to PATH
``restore-vm-device``  restore_vm.build: before each VBD is created (the VM is half built)
``restore-vm-commit``  restore_vm.Builder.finish: the disks' marks are gone, the VM's not
``backup-vm-done``  backup.Backup.one: a VM's point is committed, its thread not yet done

``XENCBT_NOW=2026-01-05T10:00:00`` (UTC) stands in for the clock where a backup names
its point (the time retention rules bucket points by), so a test can back up over
simulated weeks; every other time (manifests' started/finished) stays real.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

log = logging.getLogger(__name__)

ENV = "XENCBT_TEST_PAUSE"
NOW = "XENCBT_NOW"


def now() -> datetime.datetime:
    """The time a new point is named after: $XENCBT_NOW (UTC) if set, else the clock."""
    fake = os.environ.get(NOW)
    if not fake:
        return datetime.datetime.now(datetime.timezone.utc)
    t = datetime.datetime.fromisoformat(fake)
    return t.replace(tzinfo=datetime.timezone.utc) if t.tzinfo is None else t


def pause(step: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition("=")
        if name.strip() == step:
            log.debug("test pause: %s for %s s", step, seconds)
            time.sleep(float(seconds))
