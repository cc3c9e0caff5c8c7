"""The product's test hook (orchestrate/xencbt_cli/proc/testhook.py): a held step blocks until
the test releases it or a stop signal was handled, and nothing else ends it."""

from __future__ import annotations

import threading

from xencbt_cli.proc import testhook
from xencbt_cli.proc.children import GROUP


def paused(step: str) -> threading.Thread:
    t = threading.Thread(target=testhook.pause, args=(step,), daemon=True)
    t.start()
    return t


def test_a_held_step_waits_for_its_release(hold, monkeypatch):
    monkeypatch.setenv(testhook.ENV, "other=0," + hold("backup-vm-done"))
    testhook.pause("other")  # another step is not held
    t = paused("backup-vm-done")
    t.join(0.3)
    assert t.is_alive()  # held: no timer ends it
    hold.release("backup-vm-done")
    t.join(30)
    assert not t.is_alive()
    testhook.pause("backup-vm-done")  # released for good: a later pass goes straight on


def test_a_held_step_goes_on_once_a_stop_signal_was_handled(hold, monkeypatch):
    monkeypatch.setenv(testhook.ENV, hold("restore-vm-commit"))
    t = paused("restore-vm-commit")
    t.join(0.3)
    assert t.is_alive()
    monkeypatch.setattr(GROUP, "signum", 15)  # as signals.on_stop sets it
    t.join(30)
    assert not t.is_alive()
