"""xencbt_core.inuse: which failures are retried, how often, how long (pure logic; the
end-to-end behaviour against the simulator is in test_nbd_vbds.py)."""

from __future__ import annotations

import pytest
from xencbt_core.errors import XapiError
from xencbt_core.inuse import InUseRetry, delays


def test_delays_double_up_to_8_s_and_add_up_to_the_timeout():
    assert delays(30) == (0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 6.5)
    assert delays(1) == (0.5, 0.5)
    assert delays(0) == ()


def host(failures: list[str]):
    """A call that fails with each code in ``failures``, then answers "ok"."""

    def call(method, *args):
        if failures:
            raise XapiError(failures.pop(0), ["OpaqueRef:x", method])
        return "ok"

    return call


def test_vdi_in_use_is_retried_and_counted():
    slept = []
    retry = InUseRetry(host(["VDI_IN_USE", "VDI_IN_USE"]), 30, slept.append)
    assert retry("VDI.data_destroy", "ref") == "ok"
    assert slept == [0.5, 1.0] and retry.retries == retry.retries_here == 2


def test_other_errors_are_not_retried():
    slept = []
    retry = InUseRetry(host(["HANDLE_INVALID"]), 30, slept.append)
    with pytest.raises(XapiError, match="HANDLE_INVALID"):
        retry("VDI.destroy", "ref")
    assert slept == [] and retry.retries == 0


def test_gives_up_when_the_pauses_reach_the_timeout():
    slept = []
    retry = InUseRetry(host(["VDI_IN_USE"] * 10), 3, slept.append)
    with pytest.raises(XapiError, match="VDI_IN_USE"):
        retry("VDI.destroy", "ref")
    assert slept == [0.5, 1.0, 1.5] and retry.retries == 3
