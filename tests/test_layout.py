"""The product's layout, read statically (``ast``, no simulator, no import of the product):
no import cycle inside a top package, no module too long, raw XAPI call names only in
the XAPI facades, no class name used twice, and xencbt_cli's layers importing only
downwards.  Each check fails naming every offender, file and line."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# xencbt_cli's layers, lowest first: a module may import its own layer and those below,
# never one above.  A module's layer is its subpackage under xencbt_cli (xencbt_cli/repo/
# -> "repo"), or its own name for a top-level module (xencbt_cli/main.py -> "main"); a
# top-level module named in no layer belongs to DEFAULT_LAYER.  A subpackage named in no
# layer is an offender itself (add it here).
LAYERS = (
    {"errors", "text", "names"},
    {"proc"},
    {"repo"},
    {"xapi"},
    {"jobs"},
    {"commands"},
    {"main"},
)
DEFAULT_LAYER = "proc"

# Where each top package's modules live (the directory on sys.path), and its extra
# top-level modules (the nbdkit plugin's entry point beside xencbt_core).
PACKAGES = {
    "xencbt_cli": ("orchestrate", ()),
    "xencbt_core": ("plugin", ("xencbt",)),
    "xensim": ("simulator", ()),
}
PRODUCT = ("orchestrate", "plugin", "simulator")  # every .py below these is product code

MAX_LINES = 500
MAX_LINES_OF = {"orchestrate/xencbt_cli/main.py": 200}

# The XAPI facades: the only files that may name XAPI messages.  The clients scanned are
# the orchestrator and the plugin; the simulator is XAPI's other side (it serves those
# messages, so their names are its dispatch table).
XAPI_FACADES = (
    "orchestrate/xencbt_cli/xapi/",
    "plugin/xencbt_core/xapi.py",
    "plugin/xencbt_core/api.py",
)
XAPI_CLIENTS = ("orchestrate", "plugin")
XAPI_CLASSES = (
    *("VM", "VDI", "VBD", "VIF", "SR", "PBD", "host", "pool", "network", "PIF", "task"),
    *("session", "VTPM", "VGPU", "VGPU_type", "PCI", "USB_group", "VUSB", "Secret"),
    *("event", "message"),
)
XAPI_NAME = re.compile(r"^(Async\.)?(%s)\.[a-zA-Z_]+$" % "|".join(XAPI_CLASSES))
XAPI_PREFIX = re.compile(r"^(Async\.)?(%s)\.[a-zA-Z_]*$" % "|".join(XAPI_CLASSES))


@dataclass(frozen=True)
class Import:
    target: str  # the module imported, dotted
    line: int
    how: str = ""  # "in a function", "for type checking only", or "" (at import time)

    def at(self, module: Module) -> str:
        return "%s:%d%s" % (module.where, self.line, ", %s" % self.how if self.how else "")


@dataclass
class Module:
    name: str  # dotted, as imported: xencbt_cli.repo.chain
    path: Path
    is_package: bool
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


def parse(path: Path) -> tuple[ast.Module, int]:
    text = path.read_text()
    return ast.parse(text, str(path)), len(text.splitlines())


@cache
def product_files() -> dict[str, tuple[ast.Module, int]]:
    """Every product .py file (relative path) with its tree and line count."""
    found = {}
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[str(path.relative_to(ROOT))] = parse(path)
    assert found, "no product file found under %s" % ", ".join(PRODUCT)
    return found


@cache
def modules(package: str) -> dict[str, Module]:
    """The modules of one top package by dotted name, their imports resolved to dotted
    names (relative ones included, and those inside functions)."""
    top, extra = PACKAGES[package]
    base = ROOT / top
    found: dict[str, Module] = {}
    paths = sorted((base / package).rglob("*.py")) + [base / (m + ".py") for m in extra]
    for path in paths:
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(base).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        tree, _ = product_files()[str(path.relative_to(ROOT))]
        found[".".join(parts)] = Module(".".join(parts), path, is_package, tree)
    assert len(found) > 1, "no modules found for %s under %s" % (package, base)
    for module in found.values():
        module.imports = resolved_imports(module, set(found))
    return found


def deferred(tree: ast.Module) -> dict[int, str]:
    """id() of each import statement that does not run at import time, with why."""
    how = {}

    def visit(node: ast.AST, why: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and why:
                how[id(child)] = why
            inner = why
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = why or "in a function"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                # ``if TYPE_CHECKING:`` never runs; its ``else:`` does.
                for stmt in child.body:
                    visit_one(stmt, why or "for type checking only")
                for stmt in child.orelse:
                    visit_one(stmt, why)
                continue
            visit(child, inner)

    def visit_one(stmt: ast.stmt, why: str) -> None:
        wrapper = ast.Module(body=[stmt], type_ignores=[])
        visit(wrapper, why)

    visit(tree, "")
    return how


def resolved_imports(module: Module, known: set[str]) -> list[Import]:
    """Each import of a module of ``known`` in the module, wherever it stands."""
    # The package a relative import starts from: the module's own for a package.
    here = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    how = deferred(module.tree)
    out = []
    for node in ast.walk(module.tree):
        why = how.get(id(node), "")
        if isinstance(node, ast.Import):
            out += [Import(alias.name, node.lineno, why) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                sub = "%s.%s" % (source, alias.name)
                # ``from pkg import name``: the submodule pkg.name if there is one,
                # else pkg itself (name is defined in its __init__).
                out.append(Import(sub if sub in known else source, node.lineno, why))
    return [i for i in out if i.target in known]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return sorted(components)


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, inside the component."""
    start, inside = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & inside):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    return [start, start]


def fail_listing(title: str, offenders: list[str]) -> None:
    """Fail with every offender on a line of its own (no traceback: the list is the news)."""
    if offenders:
        pytest.fail("%s:\n%s" % (title, "\n".join(offenders)), pytrace=False)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle_within_a_top_package(package):
    mods = modules(package)
    graph = {name: set() for name in mods}
    edge: dict[tuple[str, str], Import] = {}
    for name, module in mods.items():
        for imp in module.imports:
            graph[name].add(imp.target)
            edge.setdefault((name, imp.target), imp)
    cycles = []
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        cycle = one_cycle(graph, component)
        steps = ["%s (%s)" % (a, edge[a, b].at(mods[a])) for a, b in zip(cycle, cycle[1:])]
        cycles.append(
            "  %d modules: %s\n    e.g. %s -> %s"
            % (len(component), ", ".join(component), " -> ".join(steps), cycle[-1])
        )
    fail_listing("import cycles in %s (each import at file:line)" % package, cycles)


def test_no_product_module_is_too_long():
    too_long = []
    for where, (_, lines) in product_files().items():
        limit = MAX_LINES_OF.get(where, MAX_LINES)
        if lines > limit:
            too_long.append("  %s: %d lines (at most %d)" % (where, lines, limit))
    fail_listing("product modules over their length", too_long)


def in_a_facade(where: str) -> bool:
    return any(where == f or (f.endswith("/") and where.startswith(f)) for f in XAPI_FACADES)


def test_raw_xapi_call_names_only_in_the_facades():
    offenders = []
    scanned = 0
    for where, (tree, _) in product_files().items():
        if not where.startswith(tuple(c + "/" for c in XAPI_CLIENTS)) or in_a_facade(where):
            continue
        scanned += 1
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if XAPI_NAME.match(node.value):
                    found.append((node.lineno, repr(node.value)))
            elif isinstance(node, ast.JoinedStr) and node.values:
                # f"VM.get_{field}": a message name built on a literal class.
                head = node.values[0]
                if isinstance(head, ast.Constant) and XAPI_PREFIX.match(str(head.value)):
                    found.append((node.lineno, ast.unparse(node)))
        offenders += ["  %s:%d: %s" % (where, line, text) for line, text in sorted(found)]
    assert scanned, "no XAPI client file scanned"
    fail_listing("XAPI message names outside the facades (%s)" % ", ".join(XAPI_FACADES), offenders)


def test_no_two_classes_share_a_name():
    defined: dict[str, list[str]] = defaultdict(list)
    for where, (tree, _) in product_files().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                defined[node.name].append("%s:%d" % (where, node.lineno))
    assert defined, "no class found"
    shared = [
        "  %s: %s" % (name, ", ".join(places))
        for name, places in sorted(defined.items())
        if len(places) > 1
    ]
    fail_listing("class names defined more than once in %s" % ", ".join(PRODUCT), shared)


def layer_of(module: Module) -> tuple[str, int | None]:
    """A module of xencbt_cli's layer and its rank (None: a subpackage in no layer)."""
    parts = module.name.split(".")
    name = parts[1]
    rank = next((i for i, layer in enumerate(LAYERS) if name in layer), None)
    if rank is None and len(parts) == 2 and not module.is_package:
        rank = next(i for i, layer in enumerate(LAYERS) if DEFAULT_LAYER in layer)
        name = "%s, as %s" % (name, DEFAULT_LAYER)
    return name, rank


def test_a_lower_layer_never_imports_a_higher_one():
    mods = modules("xencbt_cli")
    offenders = []
    for name, module in sorted(mods.items()):
        if name == "xencbt_cli":  # the package's own __init__: in no layer
            continue
        mine, rank = layer_of(module)
        if rank is None:
            offenders.append("  %s: subpackage %r is in no layer of LAYERS" % (module.where, mine))
            continue
        for imp in module.imports:
            if imp.target == "xencbt_cli":
                continue
            theirs, their_rank = layer_of(mods[imp.target])
            if their_rank is not None and their_rank > rank:
                offenders.append(
                    "  %s: %s (layer %s) imports %s (layer %s)"
                    % (imp.at(module), name, mine, imp.target, theirs)
                )
    order = " < ".join("{%s}" % ", ".join(sorted(layer)) for layer in LAYERS)
    fail_listing("xencbt_cli imports against its layers (lowest first: %s)" % order, offenders)
