"""The tests' disks for CBT arithmetic (no tests): a hypothesis strategy of (size, changed
blocks), and the hypothesis profile of the tests that draw them (test_cbt, test_export)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from xencbt_core.cbt import BLOCK_SIZE


@st.composite
def disks(draw):
    size = draw(st.integers(min_value=1, max_value=300)) * 512 * draw(st.sampled_from([1, 128]))
    nblocks = -(-size // BLOCK_SIZE)
    changed = draw(st.sets(st.integers(min_value=0, max_value=nblocks - 1)))
    return size, changed


# CI machines are slow and shared: correctness here, speed in `make bench`.
settings.register_profile("xencbt", deadline=None, max_examples=200)
settings.load_profile("xencbt")
