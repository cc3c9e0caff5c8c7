"""proc/children.py's process group on both Pythons it runs on (issue #29): Popen's
``process_group=`` from 3.11, ``preexec_fn`` setpgid on 3.9 (EL9).  The suite runs on
3.11, so the 3.9 path is taken here by making ``in_group`` see 3.9; the signal and crash
tests (test_cli_signals, test_crash_*) cover the group's use by xencbt itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from xencbt_cli.proc import children
from xencbt_cli.proc.children import Children


@pytest.mark.parametrize("python", [(3, 9, 16, "final", 0), tuple(sys.version_info)])
def test_children_share_the_guards_group_apart_from_ours(monkeypatch, python):
    monkeypatch.setattr(children.sys, "version_info", python)
    expected = "process_group" if python >= (3, 11) else "preexec_fn"
    assert expected in children.in_group(0)
    group = Children()
    try:
        cat = group.popen(["cat"], stdin=subprocess.PIPE)  # waits for its stdin: no timer
        guard = group.pgid()
        assert os.getpgid(guard) == guard != os.getpgrp()
        assert os.getpgid(cat.pid) == guard
        assert [name for _, name in group.members(guard)] == ["cat"]
        group.stop(signal.SIGTERM)
        assert cat.wait() == -signal.SIGTERM
        cat.stdin.close()
    finally:
        group.close()
    assert group._guard is None
