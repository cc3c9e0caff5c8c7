"""``make mutants`` cannot rot unseen (issue #22): each planted bug's patch still applies
exactly once to today's code, and each names tests that exist (tests/mutants.py).  Runs
in milliseconds; ``make mutants`` itself shows that each named test catches its bug."""

from __future__ import annotations

import re

import pytest
from mutants import MUTANTS, ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_still_applies_exactly_once(mutant):
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.old) == 1, "%s: update its patch to %s" % (mutant.name, mutant.path)
    assert mutant.new != mutant.old


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_names_tests_that_exist(mutant):
    assert mutant.tests
    for test in mutant.tests:
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text()
        if name:
            function, _, param = name.partition("[")
            assert re.search(r"^def %s\(" % re.escape(function), source, re.M), test
            if param:  # a parametrized case: its id is one of the test's values
                assert re.search(r"[\"']%s[\"']" % re.escape(param.rstrip("]")), source), test
