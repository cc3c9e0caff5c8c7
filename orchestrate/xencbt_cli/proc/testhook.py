"""A test-only hook that holds a step open, so the crash tests can stop and kill the
command inside windows that otherwise last one fsync (tests/crash_support.py).

``XENCBT_TEST_PAUSE=step=seconds[,step=seconds…]`` makes ``pause(step)`` sleep that long
(the crash tests' short windows, killed at random moments inside them);
``step=hold:FIFO`` makes it block until the test releases it (the test made FIFO and holds
it open O_RDWR, so opening it here never blocks; it releases by removing it, then closing
or writing to it; exiting closes it too), or until a stop signal was handled
(children.GROUP.signum: the step may run in a thread the signal does not interrupt).
A window is then held exactly as long as the test needs it, never for a guessed time.
Unset (always, outside the test suite) it does nothing.  Steps:

``write-tmp``   repository.write_atomically: the temp file is written, not yet renamed
``write-tmp.json``, ``write-tmp.sums``, …  the same, for a file of that suffix only (a
                manifest's, a sums file's), right after ``write-tmp``
``write-done``  repository.write_atomically: renamed into place (a prune's journal is
                then in place while the swap has not happened)
``vdi-extent``  transfer.to_vdi: before each extent is sent (the VDI is partly rewritten)
``restore-partial``  restore.to_file: PATH.partial is checked, not yet renamed to PATH
``restore-vm-device``  restore_vm.build: before each VBD is created (the VM is half built)
``restore-vm-commit``  vm_builder.Builder.finish: the disks' marks are gone, the VM's not
``drill-started``  drill.exercise: the restored VM is started, its boot not yet awaited
``backup-vm-done``  backup.Backup.one: a VM's point is committed, its thread not yet done
``copy-checked``  copy.copy_point: the copied ``.partial`` image reads back as recorded,
                not yet renamed
``copy-published``  copy.copy_point: the image renamed into place, its sums and manifest
                not yet written
``copy-vm-config``  copy.copy_vm_point: the VM point's configuration written, its VM
                manifest not yet

``XENCBT_NOW=2026-01-05T10:00:00`` (UTC) stands in for the clock where a backup names
its point (the time retention rules bucket points by), so a test can back up over
simulated weeks; every other time (manifests' started/finished) stays real.
"""

from __future__ import annotations

import datetime
import logging
import os
import select
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
        if name.strip() != step:
            continue
        if seconds.startswith("hold:"):
            log.debug("test pause: %s held until released", step)
            hold(seconds[len("hold:") :])
        else:
            log.debug("test pause: %s for %s s", step, seconds)
            time.sleep(float(seconds))


def hold(fifo: str) -> None:
    """Block until the test writes to or closes ``fifo``, or a stop signal was handled."""
    from .children import GROUP

    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return  # released for good (the test removed it)
    try:
        # A signal handled in this thread (the main one) raises out of select; in another
        # thread the handler's GROUP.signum is looked at between waits.
        while GROUP.signum is None:
            if select.select([fd], [], [], 0.05)[0]:
                return  # a byte, or EOF: released
    finally:
        os.close(fd)
