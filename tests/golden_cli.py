"""The xencbt command's surface, as text: ``--help`` of the command and of every
subcommand, the exit-code constants and each error type's code, and the codes of a few
runs that fail before any work.  test_cli_golden compares it with tests/golden/cli.txt;
a change of the surface is made on purpose by rewriting that file:

    .venv/bin/python tests/golden_cli.py > tests/golden/cli.txt
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys

COMMAND = [sys.executable, "-m", "xencbt_cli.main"]
# Runs that fail on their options alone: their exit codes are part of the surface.
FAILING = (
    [],
    ["no-such-command"],
    ["list"],
    ["backup"],
    ["restore", "abc"],
    ["prune", "--repo", "/nonexistent", "--keep-last", "0"],
    ["backup", "vm", "--repo", "/nonexistent", "--connections", "17"],
    ["list", "--repo", "/nonexistent/repository"],
    ["list", "--repo", "/nonexistent/repository", "--json"],
)


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="100", HOME="/nonexistent-home")
    for name in list(env):
        if name.startswith("XENCBT_"):
            del env[name]
    return subprocess.run(
        COMMAND + args, env=env, capture_output=True, text=True, timeout=60, cwd="/"
    )


def commands() -> list[str]:
    """The subcommands --help lists under COMMAND (four spaces, a name, its help)."""
    usage = run(["--help"]).stdout
    return re.findall(r"^    ([a-z][a-z-]*)  ", usage, re.MULTILINE)


def exit_codes() -> list[str]:
    errors = importlib.import_module("xencbt_cli.errors")
    lines = []
    for name, value in sorted(vars(errors).items()):
        if name.isupper() and isinstance(value, int):
            lines.append("%s = %d" % (name, value))
    for name, cls in sorted(vars(errors).items()):
        if inspect.isclass(cls) and cls.__module__ == errors.__name__ and hasattr(cls, "exit_code"):
            lines.append("%s.exit_code = %s" % (name, cls.exit_code))
    return lines


def surface() -> str:
    parts = ["$ xencbt --help", run(["--help"]).stdout]
    for name in commands():
        parts += ["$ xencbt %s --help" % name, run([name, "--help"]).stdout]
    parts += ["# exit codes (xencbt_cli.errors)"] + exit_codes() + [""]
    for args in FAILING:
        done = run(args)
        parts.append("$ xencbt %s -> exit %d" % (" ".join(args), done.returncode))
        parts += ["stdout: " + done.stdout, "stderr: " + done.stderr]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(surface())
