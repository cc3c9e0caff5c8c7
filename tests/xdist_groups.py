"""How ``make check`` spreads the suite over pytest-xdist workers (``--dist loadgroup``,
scheduled by ``Scheduler`` below through conftest's ``pytest_xdist_make_scheduler``).

A test module that defines a fixture shared beyond one test (``scope="module"``,
``"class"`` or ``"package"``: a simulator, a guest's disks and its backups, a VM boot) is
one unit of work: all its tests run on one worker, in their order, and the fixture is
built once.  Every other test is a unit of its own, given to whichever worker is free.
Units with more tests go first (xdist's own order), then the single tests in collection
order, which conftest puts slowest first.

Why not xdist's own ``xdist_group`` marks: xdist 3.8 names a group by rewriting
``item._nodeid``, which pytest 9 no longer reads (it took no effect here, so every test
of tests/test_cli_files.py built the module's scene on its own worker).  The controller
decides from the node ids and the test files' text alone, so nothing depends on that.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from xdist.scheduler import LoadScopeScheduling

SHARED = re.compile(r"@pytest\.fixture\(\s*scope\s*=\s*[\"'](?:module|class|package)[\"']")


@cache
def shares_fixtures(path: Path) -> bool:
    """Whether the test file defines a fixture shared by several of its tests."""
    try:
        return bool(SHARED.search(path.read_text()))
    except OSError:
        return False


class Scheduler(LoadScopeScheduling):
    def __init__(self, config, log=None) -> None:
        super().__init__(config, log)
        self.root = Path(config.rootpath)

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if shares_fixtures(self.root / module) else nodeid
