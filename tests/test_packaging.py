"""The packaged documentation and versions follow the code.

The man pages (packaging/man/*.pod) must name every plugin parameter, every xencbt and
xensim command and option, and every exit code; the RPM spec's version must be the
project's.  Building and installing the packages themselves is `make deb-check`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from xencbt_cli import errors
from xencbt_cli.main import parser as xencbt_parser
from xencbt_core import __version__
from xencbt_core.params import HELP
from xensim.main import _parser as xensim_parser

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "packaging" / "man"


def pod(name: str) -> str:
    return (MAN / (name + ".pod")).read_text()


def commands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


@pytest.mark.parametrize("key", sorted(HELP))
def test_plugin_man_page_has_every_parameter(key):
    assert "=item B<%s=" % key in pod("nbdkit-xencbt-plugin")


def test_xencbt_man_page_has_every_command_and_option():
    text = pod("xencbt")
    p = xencbt_parser()
    missing = ["option " + o for o in options(p) if "B<%s>" % o not in text]
    for name, sub in commands(p).items():
        section = re.search(r"^=head2 %s\b(.*?)(?=^=head)" % name, text, re.M | re.S)
        if not section:
            missing.append("command " + name)
            continue
        missing += [
            "%s %s" % (name, o)
            # The global options, taken after any command too, are documented once above.
            for o in options(sub) - options(p) - {"-h", "--help"}
            if "B<%s>" % o not in section.group(1)
        ]
    assert not missing


def test_xencbt_man_page_has_every_exit_code():
    status = pod("xencbt").split("=head1 EXIT STATUS")[1].split("=head1")[0]
    documented = {int(n) for n in re.findall(r"^=item B<(\d+)>", status, re.M)}
    codes = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, int)}
    assert documented == codes


def test_xensim_man_page_has_every_command_and_option():
    text = pod("xensim")
    p = xensim_parser()
    missing = [name for name in commands(p) if "=item B<%s>" % name not in text]
    for sub in commands(p).values():
        missing += [o for o in options(sub) - {"-h", "--help"} if o not in text]
    assert not missing


def test_rpm_spec_version_is_the_project_version():
    spec = (ROOT / "packaging" / "rpm" / "xencbt.spec").read_text()
    assert re.search(r"^Version:\s+(\S+)$", spec, re.M).group(1) == __version__


def test_installed_metadata_version_is_the_project_version():
    from importlib.metadata import version

    assert version("xencbt") == __version__


def test_make_man_builds_every_page_with_pod2man(tmp_path):
    """`make man` (and the .deb, the .rpm): roff pages, not POD."""
    import subprocess

    subprocess.run(
        ["make", "-s", "man", "MAN_OUT=%s" % tmp_path], cwd=ROOT, check=True, capture_output=True
    )
    for name in ("xencbt", "nbdkit-xencbt-plugin", "xensim"):
        page = (tmp_path / (name + ".1")).read_text()
        assert re.search(r"^\.TH %s 1 " % re.escape(name), page, re.M), name
        assert ".SH NAME" in page or '.SH "NAME"' in page, name
        assert "=head1" not in page, name
