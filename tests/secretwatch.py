"""Watch a whole test run for leaked secrets (issue #5, #18).

What is watched:

* **Every exec** of the product and what it starts: every ``xencbt`` run, every nbdkit
  with the plugin and the demos run under ``tests/execwatch.sh`` (``traced``), which
  records each execve of the process and its descendants with strace (``-f``; seccomp-bpf
  stops them only at execve, so a 5 ms process is seen like a long one).  Each recorded
  argv and environment is checked.  As a second net, a thread samples
  ``/proc/PID/cmdline`` and ``environ`` of every process descending from pytest every
  ``INTERVAL`` seconds (it sees what runs untraced: simulators, test helpers).
* **Temp files, deleted ones too**: ``TMPDIR`` of the whole run is a tmpfs under basetemp
  marked with fanotify (FAN_CLOSE_WRITE); every file written there is read through the
  descriptor the event carries, so a file removed right after it was written is still
  read, with the mode it had.
* **Every file under basetemp** at the end (repositories, logs, state dirs).
* **Every output** the tests captured (``output``), including killed runs' stderr.

What counts as a secret: every password a simulator accepted and every session ref it
issued (each simulator, also those the demos start, appends them to the file named by
``XENSIM_SECRETS_LOG``; ``Control.issued_secrets()`` too), strings tests register, and in
process arguments, environments and outputs anything that looks like a session ref or an
export name (``OpaqueRef:``, ``session_id=``).  Each is also searched percent-encoded,
base64-encoded (at any alignment) and JSON-escaped (``ENCODINGS``).  A file may hold a
secret only if it is private (mode 0600 or stricter) and is not a repository file
(manifest or image): password files, session files and nbd-info files are expected to
hold them.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import json
import os
import re
import select
import stat
import struct
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

INTERVAL = 0.075
GENERIC = ("OpaqueRef:", "session_id=")  # in argv, environments and outputs
ENCODINGS = ("plain", "percent", "base64", "json")
# Disk images hold guest data (random bytes in the tests) and are large: only their head is
# read, where qcow2 keeps what xencbt writes into an image (header, backing file name).
IMAGE_SUFFIXES = (".raw", ".qcow2", ".partial", ".img", ".cbtlog")
WHOLE_FILE = 16 << 20
HEAD = 256 << 10
KEPT = 1 << 20  # temp files larger than this are kept by their head only
_TOKEN = re.compile(rb"[A-Za-z0-9_:-]{6,}")
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{8,}={0,2}")
_JSON_ESCAPE = re.compile(rb"\\u00([0-9a-fA-F]{2})")
REPOSITORY_SUFFIXES = (".qcow2", ".partial")

EXECWATCH = Path(__file__).resolve().with_name("execwatch.sh")
EXEC_ENV = "SECRETWATCH_EXECS"  # where execwatch.sh writes its strace records
ISSUED_ENV = "XENSIM_SECRETS_LOG"  # where every simulator appends what it issued
PRIVATE_DIR = ".secretwatch"  # under basetemp: the watch's own records, not scanned
_FAILED = re.compile(r"\) = -1 [A-Z]+ \([^)]*\)$")
_EXEC = re.compile(r'^(\d+) +execve(?:at)?\((?:[^,]*, )?"((?:[^"\\]|\\.)*)"')


def traced(argv: list[str]) -> list[str]:
    """``argv`` run under execwatch.sh: every exec of it and its descendants is seen.  The
    process keeps its pid (strace -DDD), so signals and ``Popen`` work as before."""
    return [str(EXECWATCH), *argv]


class Watch:
    def __init__(self) -> None:
        self.secrets: set[str] = set()
        # (value, where): strings tests pass on purpose, e.g. a fake export name given to a
        # third-party NBD server standing in for the host; where="" means anywhere.
        self.allowed: set[tuple[str, str]] = set()
        self.findings: list[str] = []
        self.counts = {"process samples": 0, "processes inspected": 0, "files scanned": 0}
        self.counts.update({"outputs scanned": 0, "private files holding secrets": 0})
        self.counts.update({"execs seen": 0, "temp files caught": 0, "encodings checked": 0})
        self._texts: dict[str, str] = {}  # argv/environ text -> where it was seen
        self._outputs: dict[str, str] = {}  # output text -> where
        self._seen: set[tuple[int, bytes]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.private: Path | None = None
        self.tmpdir: Path | None = None
        self.keeper: TempKeeper | None = None

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

    # -- the run-wide set-up --------------------------------------------------------------
    def setup(self, basetemp: Path, required: bool) -> None:
        """Exec records, the simulators' log of what they issue, and a watched TMPDIR, for
        this process and everything it starts (through the environment).  ``required``:
        a TMPDIR that cannot be watched fails instead of being reported."""
        self.private = basetemp / PRIVATE_DIR
        (self.private / "execs").mkdir(parents=True)
        # Other local users' runs (test_cli_access) record their execs too: they may create
        # files here (0600, theirs) but not list or read the others'.
        self.private.chmod(0o711)
        (self.private / "execs").chmod(0o1733)
        # The way there (search only, no listing): basetemp and each directory above it
        # that others cannot search yet (pytest-of-USER; with xdist also pytest-N, as a
        # worker's basetemp is pytest-N/popen-gwK), up to one they can (/tmp).
        d = basetemp
        while d == basetemp or (d != d.parent and not d.stat().st_mode & 0o001):
            d.chmod(d.stat().st_mode & 0o7777 | 0o011)
            d = d.parent
        os.environ[EXEC_ENV] = str(self.private / "execs")
        os.environ[ISSUED_ENV] = str(self.private / "issued")
        self.tmpdir = basetemp / "tmpdir"
        self.keeper = TempKeeper.start(self.tmpdir, required)
        os.environ["TMPDIR"] = str(self.tmpdir)
        tempfile.tempdir = None  # tempfile caches the old one
        self.start()

    def teardown(self) -> None:
        if self.keeper:
            self.keeper.stop()
        self.stop()

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
            name = _command_name(argv.split(b"\0"))
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
    def output(self, where: str, *texts: str | bytes | None) -> None:
        """Output a test captured (a command's stdout/stderr, a test report section)."""
        with self._lock:
            for text in texts:
                if isinstance(text, bytes):
                    text = text.decode(errors="replace")
                if text:
                    self._outputs.setdefault(text, where)

    def read_execs(self, directory: Path) -> None:
        """Every execve execwatch.sh recorded: its argv and environment, as strace printed
        them (one line per exec; strings C-escaped, which leaves secrets as they are)."""
        for path in sorted(directory.glob("exec.*")):
            for line in path.read_text(errors="replace").splitlines():
                m = _EXEC.match(line)
                if not m:
                    continue
                if not _FAILED.search(line):  # (a failed one, e.g. a PATH search, is checked too)
                    self.counts["execs seen"] += 1
                name = os.path.basename(m.group(2))
                self._note(line, "pid %s exec argv (%s)" % (m.group(1), name))

    def read_issued(self, path: Path) -> None:
        """The simulators' own record (one JSON object per line)."""
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            self.register(json.loads(line)["secret"])

    def finish(self, basetemp: Path | None) -> list[str]:
        """Scan everything collected and the files under ``basetemp``; the findings."""
        if self.private is not None:
            self.read_execs(self.private / "execs")
            self.read_issued(self.private / "issued")
        with self._lock:
            secrets = sorted(self.secrets)
            texts, outputs = dict(self._texts), dict(self._outputs)
        wanted = _Wanted(secrets)
        self.counts["encodings checked"] = len(ENCODINGS)
        for text, where in texts.items():
            self._check(text, where, wanted)
        for text, where in outputs.items():
            self.counts["outputs scanned"] += 1
            self._check(text, where, wanted)
        if self.keeper is not None:
            for path, mode, data in self.keeper.caught:
                self.counts["temp files caught"] += 1
                self._judge_file(path, mode, data, wanted)
        if basetemp is not None:
            self._scan_files(basetemp, wanted)  # TMPDIR too, while it is mounted
        if self.keeper is not None:
            self.keeper.unmount()
        self.findings = list(dict.fromkeys(self.findings))  # a PATH search repeats an exec
        return self.findings

    def _check(self, text: str, where: str, wanted: _Wanted) -> None:
        data = text.encode(errors="replace")
        for encoding in wanted.secrets_in(data):
            self.findings.append("%s holds a secret (%s)" % (where, encoding))
        cleaned = data
        for value, place in self.allowed:
            if place in where:
                cleaned = cleaned.replace(value.encode(), b"")
        for encoding, pattern in wanted.generic_in(cleaned):
            self.findings.append("%s holds %r (%s)" % (where, pattern, encoding))

    def _scan_files(self, root: Path, wanted: _Wanted) -> None:
        for path in _files(root):
            try:
                st = path.stat()
                with open(path, "rb") as f:
                    data = f.read(HEAD if _disk_image(path, st.st_size) else st.st_size)
            except OSError:
                continue
            self._judge_file(path, st.st_mode, data, wanted)

    def _judge_file(self, path: Path, mode: int, data: bytes, wanted: _Wanted) -> None:
        self.counts["files scanned"] += 1
        if not wanted.file_holds(data):
            return
        if mode & 0o077:
            self.findings.append(
                "%s holds a secret and is readable by others (mode %o)" % (path, stat.S_IMODE(mode))
            )
        elif _repository_file(path, data):
            self.findings.append("%s is a repository file and holds a secret" % path)
        else:
            self.counts["private files holding secrets"] += 1


# -- matching -----------------------------------------------------------------------------
class _Wanted:
    """The secrets, searched in every encoding: the text is decoded each way (percent,
    JSON \\u escapes, every base64-looking run at every alignment) and each decoding is
    searched for the plain secret.  Hundreds of session refs times hundreds of MB: one pass
    per decoding over its tokens, not one search per secret.  Every secret is a token of
    [A-Za-z0-9_:-] (random passwords, OpaqueRef:<uuid>), so a set lookup per token finds
    them; other registered strings are searched as they are."""

    def __init__(self, secrets: list[str]):
        self.tokens = {s.encode() for s in secrets if _TOKEN.fullmatch(s.encode())}
        self.others = [s.encode() for s in secrets if not _TOKEN.fullmatch(s.encode())]

    def secrets_in(self, data: bytes) -> list[str]:
        return [name for name, decoded in _decodings(data) if self._holds(decoded)]

    def generic_in(self, data: bytes) -> list[tuple[str, str]]:
        return [
            (name, pattern)
            for name, decoded in _decodings(data)
            for pattern in GENERIC
            if pattern.encode() in decoded
        ]

    def file_holds(self, data: bytes) -> bool:
        return any(
            b"session_id=" in decoded or self._holds(decoded) for _, decoded in _decodings(data)
        )

    def _holds(self, data: bytes) -> bool:
        if any(s in data for s in self.others):
            return True
        for m in _TOKEN.finditer(data):
            token = m.group()
            if token in self.tokens:
                return True
            at = token.find(b"OpaqueRef:")
            if at >= 0 and token[at : at + 46] in self.tokens:
                return True
            if b":" in token and any(part in self.tokens for part in token.split(b":")):
                return True
        return False


def _decodings(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "plain", data
    if b"%" in data:
        yield "percent-encoded", urllib.parse.unquote_to_bytes(data.replace(b"+", b" "))
    if b"\\u00" in data:
        yield "JSON-escaped", _JSON_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    runs = _BASE64_RUN.findall(data)
    if runs:
        yield "base64-encoded", b"\n".join(_unbase64(run) for run in runs)


def _unbase64(run: bytes) -> bytes:
    """The run decoded from each of its 4 alignments (a secret inside a longer encoded
    string starts anywhere)."""
    run = run.rstrip(b"=")
    out = []
    for skip in range(4):
        part = run[skip:]
        rest = len(part) % 4  # 1: a stray character; 2, 3: padding that was stripped
        part = part[:-1] if rest == 1 else part + b"=" * ((4 - rest) % 4)
        try:
            out.append(base64.b64decode(part))
        except ValueError:
            continue
    return b"\n".join(out)


# -- temp files, deleted ones too ---------------------------------------------------------
class TempKeeper:
    """A tmpfs for TMPDIR, marked with fanotify: each FAN_CLOSE_WRITE event comes with a
    descriptor of the file, opened by the kernel when it was closed, so its content and
    mode are read even if it is unlinked at once."""

    FAN_CLOSE_WRITE, FAN_NONBLOCK, FAN_CLOEXEC = 0x8, 0x2, 0x1
    FAN_MARK_ADD, FAN_MARK_MOUNT, AT_FDCWD = 0x1, 0x10, -100
    _EVENT = struct.Struct("IBBHQii")

    def __init__(self, path: Path, fd: int | None, mounted: bool):
        self.path, self.fd, self.mounted = path, fd, mounted
        self.watching = fd is not None  # deleted files are seen
        self._caught: dict[tuple[str, int], tuple[Path, int, bytes]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, path: Path, required: bool) -> TempKeeper:
        """Mounted and marked; without root (and not ``required``) a plain directory whose
        deleted files are not seen (``watching`` is False, and the figures say so)."""
        path.mkdir(mode=0o1777)
        why = cls._mount(path)
        fd = None if why else cls._fanotify(path)
        if fd is None:
            why = why or "fanotify: %s" % os.strerror(ctypes.get_errno())
            if required:
                if not why.startswith("mount"):
                    subprocess.run(["umount", "-l", str(path)], check=False)
                raise RuntimeError("cannot watch TMPDIR %s for deleted files: %s" % (path, why))
            return cls(path, None, not why.startswith("mount"))
        keeper = cls(path, fd, True)
        keeper._thread = threading.Thread(target=keeper._run, name="tempkeeper", daemon=True)
        keeper._thread.start()
        return keeper

    @staticmethod
    def _mount(path: Path) -> str:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4g,mode=1777", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        return "" if r.returncode == 0 else "mount: " + r.stderr.strip()

    @classmethod
    def _fanotify(cls, path: Path) -> int | None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        flags = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC
        fd = libc.fanotify_init(cls.FAN_NONBLOCK | cls.FAN_CLOEXEC, flags)
        if fd < 0:
            return None
        mark = cls.FAN_MARK_ADD | cls.FAN_MARK_MOUNT
        if libc.fanotify_mark(fd, mark, cls.FAN_CLOSE_WRITE, cls.AT_FDCWD, os.fsencode(path)) < 0:
            os.close(fd)
            return None
        return fd

    def _run(self) -> None:
        while not self._stop.is_set():
            if select.select([self.fd], [], [], 0.2)[0]:
                self.drain()

    def drain(self) -> None:
        """Read every event queued so far (also called at the end, after the thread)."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            pos = 0
            while pos < len(data):
                length, _, _, _, _, efd, _ = self._EVENT.unpack_from(data, pos)
                pos += length
                if efd >= 0:
                    self._keep(efd)

    def _keep(self, efd: int) -> None:
        """The file as it was closed: its name (" (deleted)" once unlinked), mode and
        content (the head of a disk image or of anything large)."""
        try:
            path = Path(os.readlink("/proc/self/fd/%d" % efd))
            st = os.fstat(efd)
            big = _disk_image(path, st.st_size) or st.st_size > KEPT
            data = os.pread(efd, HEAD if big else st.st_size, 0)
            self._caught[(str(path), hash(data))] = (path, st.st_mode, data)
        except OSError:
            pass  # a file that is not readable through its descriptor (gone with its mount)
        finally:
            os.close(efd)

    @property
    def caught(self) -> list[tuple[Path, int, bytes]]:
        return list(self._caught.values())

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if self.fd is not None:
            self.drain()

    def unmount(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


# -- processes and files ------------------------------------------------------------------
def _command_name(argv: list[bytes]) -> str:
    """The command a process runs, looking through execwatch.sh's wrappers: sampled between
    its execs, a traced command shows up as ``sh …/execwatch.sh CMD …`` or ``strace … -- CMD
    …``, and an allowance for CMD's argv (``where="argv (CMD)"``) must hold at every stage."""
    words = [w.decode(errors="replace") for w in argv if w]
    name = os.path.basename(words[0]) if words else ""
    if any(os.path.basename(w) == EXECWATCH.name for w in words[:2]):
        at = next(i for i, w in enumerate(words) if os.path.basename(w) == EXECWATCH.name)
        inner = words[at + 1 : at + 2]
    elif name == "strace" and "--" in words:
        inner = words[words.index("--") + 1 :][:1]
    else:
        return words[0] if words else ""
    return os.path.basename(inner[0]) if inner else name


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
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != PRIVATE_DIR]
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
