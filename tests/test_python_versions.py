"""Each part's code runs on the oldest Python its packages admit (issue #29).

The minimum is read from the packaging files, so the check cannot drift from them:
pyproject.toml's ``requires-python`` (pip), the RPM's ``python(abi)`` (rpm's Python
dependency generator derives it from ``%{python3_sitelib}``, EL9's value in
packaging/rpm/local-check/macros: 3.9, the Python that EL9's nbdkit-python-plugin embeds)
and debian/control's ``X-Python3-Version`` if it ever names one (it does not: the .deb
takes the building distribution's python3, 3.11 on Debian 12).  Every part is in every
package family, so each is held to the lowest of them.

Two checks, both static (no Python that old runs here): vermin (stdlib calls, keyword
arguments and syntax by version) and this interpreter's own parser with
``feature_version``; plus what neither sees: a ``X | Y`` type union evaluated at run
time (only annotations are spared, by ``from __future__ import annotations``).  Each
check is shown to fail on a planted offence in a copy of the plugin.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERMIN = Path(sys.executable).parent / "vermin"
PARTS = ("plugin", "orchestrate", "simulator")  # the nbdkit plugin + core, the CLI, xensim
Version = tuple[int, int]


def version(text: str) -> Version:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def declared() -> dict[str, Version]:
    """The lowest Python each packaging file admits."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pip = re.search(r'^requires-python = ">=\s*(3\.\d+)"$', pyproject, re.M)
    assert pip, 'pyproject.toml: requires-python should read ">=3.N"'
    macros = (ROOT / "packaging/rpm/local-check/macros").read_text()
    rpm = re.search(r"^%python3_sitelib\s+/usr/lib/python(3\.\d+)/", macros, re.M)
    assert rpm, "no %python3_sitelib in packaging/rpm/local-check/macros"
    found = {"pyproject.toml": version(pip.group(1)), "xencbt.spec": version(rpm.group(1))}
    control = (ROOT / "packaging/debian/control").read_text()
    deb = re.search(r"^X-Python3-Version:\s*>=\s*(3\.\d+)", control, re.M)
    if deb:
        found["debian/control"] = version(deb.group(1))
    return found


MINIMUM = min(declared().values())


def vermin(paths: list[Path], minimum: Version) -> subprocess.CompletedProcess:
    # --eval-annotations: judge annotations as if evaluated, the stricter reading (they
    # are not, under the __future__ import, so this only ever reports too much).
    argv = [str(VERMIN), "-t=%d.%d-" % minimum, "--violations", "--eval-annotations"]
    argv += ["--no-tips", "--no-make-paths-absolute", *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def modules(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)


def syntax_offences(path: Path, minimum: Version) -> list[str]:
    try:
        ast.parse(path.read_text(), str(path), feature_version=minimum)
    except SyntaxError as e:
        return ["%s:%s: %s" % (path, e.lineno, e.msg)]
    return []


TYPE_NAMES = {"int", "str", "bytes", "float", "bool", "dict", "list", "tuple", "set", "type"}


def _is_type(node: ast.expr) -> bool:
    """Operands that make ``a | b`` a type union rather than bits or sets: None, a
    builtin type, a generic (``list[int]``, ``Callable[…]``: a class name subscripted)."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        node = node.value
        return isinstance(node, ast.Name) and (node.id in TYPE_NAMES or node.id[0].isupper())
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type(node.left) or _is_type(node.right)
    return isinstance(node, ast.Name) and node.id in TYPE_NAMES


def _checked_type(node: ast.AST) -> bool:
    """``isinstance(x, A | B)``: any union there is of types."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and isinstance(node.args[1], ast.BinOp)
        and isinstance(node.args[1].op, ast.BitOr)
    )


def _annotations(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (not evaluated under the __future__ import)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation:
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            roots.append(node.returns)
    return {id(n) for root in roots for n in ast.walk(root)}


def union_offences(path: Path, minimum: Version) -> list[str]:
    """``X | Y`` types evaluated at run time (aliases, isinstance, casts), and unions in
    annotations of a module without ``from __future__ import annotations``."""
    if minimum >= (3, 10):
        return []
    tree = ast.parse(path.read_text(), str(path))
    future = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    spared = _annotations(tree) if future else set()
    return [
        "%s:%d: a type union `X | Y` needs Python 3.10 when evaluated" % (path, node.lineno)
        for node in ast.walk(tree)
        if _checked_type(node)
        or isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.BitOr)
        and id(node) not in spared
        and (_is_type(node.left) or _is_type(node.right))
    ]


def offences(top: Path, minimum: Version) -> list[str]:
    """Everything under ``top`` that needs a Python newer than ``minimum``."""
    found = []
    for path in modules(top):
        found += syntax_offences(path, minimum) + union_offences(path, minimum)
    r = vermin([top], minimum)
    if r.returncode != 0:
        found.append("vermin -t=%d.%d-:\n%s%s" % (*minimum, r.stdout, r.stderr))
    return found


def test_the_packages_agree_with_pip_on_the_minimum():
    # The rpm (EL9: 3.9) is the lowest; pip's requires-python must admit no older one.
    versions = declared()
    assert versions["pyproject.toml"] == versions["xencbt.spec"], versions


@pytest.mark.parametrize("part", PARTS)
def test_each_part_runs_on_the_oldest_declared_python(part):
    assert not offences(ROOT / part, MINIMUM)


PLANTED = [
    # Python 3.11's keyword: the call this issue found in children.py
    ("import subprocess\nsubprocess.Popen(['true'], process_group=0)\n", "process_group"),
    # 3.10: what plugin/xencbt_core/xapi.py called
    ("import ssl\nssl.get_server_certificate(('h', 1), timeout=1)\n", "timeout"),
    ("Maybe = int | None\n", "type union"),  # a run-time alias, despite the __future__
    ("def f(x):\n    return isinstance(x, Foo | Bar)\n", "type union"),
    ("def f(x):\n    match x:\n        case 1:\n            pass\n", "Pattern matching"),
]


@pytest.mark.parametrize("code, named", PLANTED, ids=[n for _, n in PLANTED])
def test_a_planted_newer_call_in_the_plugin_fails(tmp_path, code, named):
    copy = tmp_path / "plugin"
    shutil.copytree(ROOT / "plugin", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert not offences(copy, MINIMUM)
    with (copy / "xencbt_core" / "xapi.py").open("a") as f:
        f.write("\n\n" + code)
    found = offences(copy, MINIMUM)
    assert found and all("xapi.py" in o for o in found), found
    assert named in "\n".join(found)
