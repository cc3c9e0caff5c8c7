"""Watch a whole test run for leaked secrets (issue #5).

While the tests run, a thread samples ``/proc/PID/cmdline`` and ``/proc/PID/environ`` of
every process descending from pytest (the simulators, xencbt, nbdkit, qemu-img…) every
``INTERVAL`` seconds.  At the end, every file under pytest's basetemp (repositories, logs,
temp files) and every output the tests captured are scanned too.

What counts as a secret: every password a simulator accepted, every session ref it issued
(asked from the simulator before it stops: ``Control.issued_secrets()``; export names
embed them), strings tests register as fake secrets, and, in process arguments and
environments, anything that looks like a session ref or an export name (``OpaqueRef:``,
``session_id=``).  A file may hold a secret only if it is private (mode 0600 or
stricter) and is not a repository file (manifest or image): password files, session
files and nbd-info files are expected to hold them.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

INTERVAL = 0.075
GENERIC = ("OpaqueRef:", "session_id=")  # in argv, environments and outputs
# Disk images hold guest data (random bytes in the tests) and are large: only their head is
# read, where qcow2 keeps what xencbt writes into an image (header, backing file name).
IMAGE_SUFFIXES = (".raw", ".qcow2", ".partial", ".img", ".cbtlog")
WHOLE_FILE = 16 << 20
HEAD = 256 << 10
_TOKEN = re.compile(rb"[A-Za-z0-9_:-]{6,}")
REPOSITORY_SUFFIXES = (".qcow2", ".partial")


class Watch:
    def __init__(self) -> None:
        self.secrets: set[str] = set()
        # (value, where): strings tests pass on purpose, e.g. a fake export name given to a
        # third-party NBD server standing in for the host; where="" means anywhere.
        self.allowed: set[tuple[str, str]] = set()
        self.findings: list[str] = []
        self.counts = {"process samples": 0, "processes inspected": 0, "files scanned": 0}
        self.counts.update({"outputs scanned": 0, "private files holding secrets": 0})
        self._texts: dict[str, str] = {}  # argv/environ text -> where it was seen
        self._outputs: dict[str, str] = {}  # output text -> where
        self._seen: set[tuple[int, bytes]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what is secret -------------------------------------------------------------------
    def register(self, *values: str) -> None:
        with self._lock:
            self.secrets.update(v for v in values if v and len(v) >= 6)

    def allow(self, value: str, where: str = "") -> None:
        with self._lock:
            self.allowed.add((value, where))

    def learn(self, issued: dict) -> None:
        """What ``Control.issued_secrets()`` returned."""
        self.register(*issued.get("passwords", ()), *issued.get("sessions", ()))

    # -- sampling processes ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="secretwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:
        root = os.getpid()
        while not self._stop.wait(INTERVAL):
            self.sample(root)

    def sample(self, root: int) -> None:
        self.counts["process samples"] += 1
        for pid in _descendants(root):
            try:
                argv = Path("/proc/%d/cmdline" % pid).read_bytes()
            except OSError:
                continue
            if not argv or (pid, argv) in self._seen:
                continue
            self._seen.add((pid, argv))
            self.counts["processes inspected"] += 1
            name = argv.split(b"\0")[0].decode(errors="replace")
            try:
                environ = Path("/proc/%d/environ" % pid).read_bytes()
            except OSError:
                environ = b""
            text = argv.replace(b"\0", b" ").decode(errors="replace")
            self._note(text, "pid %d argv (%s)" % (pid, name))
            self._note(environ.replace(b"\0", b"\n").decode(errors="replace"), "pid %d env" % pid)

    def _note(self, text: str, where: str) -> None:
        with self._lock:
            self._texts.setdefault(text, where)

    # -- outputs and files ----------------------------------------------------------------
    def output(self, where: str, *texts: str | None) -> None:
        """Output a test captured (a command's stdout/stderr, a test report section)."""
        with self._lock:
            for text in texts:
                if text:
                    self._outputs.setdefault(text, where)

    def finish(self, basetemp: Path | None) -> list[str]:
        """Scan everything collected and the files under ``basetemp``; the findings."""
        with self._lock:
            secrets = sorted(self.secrets)
            texts, outputs = dict(self._texts), dict(self._outputs)
        for text, where in texts.items():
            self._check(text, where, secrets, generic=True)
        for text, where in outputs.items():
            self.counts["outputs scanned"] += 1
            self._check(text, where, secrets, generic=True)
        if basetemp is not None:
            self._scan_files(basetemp, secrets)
        return self.findings

    def _check(self, text: str, where: str, secrets: list[str], generic: bool = True) -> None:
        for secret in secrets:
            if secret in text:
                self.findings.append("%s holds a secret (%s…)" % (where, secret[:4]))
        if generic:
            cleaned = text
            for value, place in self.allowed:
                if place in where:
                    cleaned = cleaned.replace(value, "")
            for pattern in GENERIC:
                if pattern in cleaned:
                    at = cleaned.index(pattern)
                    self.findings.append(
                        "%s holds %r: …%s…" % (where, pattern, cleaned[at : at + 14])
                    )

    def _scan_files(self, root: Path, secrets: list[str]) -> None:
        # Hundreds of session refs times hundreds of MB: one pass per file over its tokens,
        # not one search per secret.  Every secret is a token of [A-Za-z0-9_:-] (random
        # passwords, OpaqueRef:<uuid>), so a set lookup per token finds them.
        wanted = {s.encode() for s in secrets}
        for path in _files(root):
            try:
                st = path.stat()
                with open(path, "rb") as f:
                    data = f.read(HEAD if _disk_image(path, st.st_size) else st.st_size)
            except OSError:
                continue
            self.counts["files scanned"] += 1
            if not _holds(data, wanted):
                continue
            if st.st_mode & 0o077:
                self.findings.append(
                    "%s holds a secret and is readable by others (mode %o)"
                    % (path, stat.S_IMODE(st.st_mode))
                )
            elif _repository_file(path, data):
                self.findings.append("%s is a repository file and holds a secret" % path)
            else:
                self.counts["private files holding secrets"] += 1


def _holds(data: bytes, wanted: set[bytes]) -> bool:
    if b"session_id=" in data:
        return True
    for m in _TOKEN.finditer(data):
        token = m.group()
        if token in wanted:
            return True
        at = token.find(b"OpaqueRef:")
        if at >= 0 and token[at : at + 46] in wanted:
            return True
    return False


def _descendants(root: int) -> Iterator[int]:
    stack, seen = [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        yield pid
        try:
            tasks = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path("/proc/%d/task/%s/children" % (pid, tid)).read_text().split()
            except OSError:
                continue
            stack.extend(int(c) for c in children)


def _files(root: Path) -> Iterable[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _disk_image(path: Path, size: int) -> bool:
    return size > WHOLE_FILE or path.name.endswith(IMAGE_SUFFIXES) or path.parent.name == "vdis"


def _repository_file(path: Path, data: bytes) -> bool:
    return path.name.endswith(REPOSITORY_SUFFIXES) or (
        path.suffix == ".json" and b'"snapshot_uuid"' in data
    )


WATCH = Watch()
