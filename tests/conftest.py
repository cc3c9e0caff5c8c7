"""Shared fixtures: a running xensim (the simulated XenServer pool) for any test.

``xensim``          function scope; a fresh simulator with the defaults (1 host, the
                    "demo-vm" with disks of 64 MiB and 20 MiB + 512 bytes, NBD network
                    purpose ``nbd``, i.e. TLS). Yields a ``Simulator`` handle (below).
``xensim_factory``  function scope; call ``xensim_factory(hosts=2, vms=1,
                    disk_sizes="4M,1M+512", nbd_purpose="insecure_nbd",
                    nbd_propagation=0.5, session_timeout=2, in_use_wait=0.5,
                    auth_fail_delay=5, state_dir=PATH)`` for other shapes (a refused
                    login waits 0.2 s unless auth_fail_delay is given); every
                    simulator it started is stopped (SIGTERM, exit code 0 asserted)
                    at teardown.

A ``Simulator`` handle has:
  ``.info``        the ready line (dict: xapi, user, password_file, ca_file, control,
                   state_dir, pid, hosts[{uuid, name, address, nbd_port, xapi, cert_file}])
  ``.password``    root's password
  ``.state_dir``   Path of the state dir
  ``.control``     ``xensim.control.Control`` (faults, sessions, cbt_off, counters)
  ``.session(url=None, cafile=None, password=None)``   a logged-in PyPI ``XenAPI.Session``
                   verifying the API cert (cafile = the master's cert); ``url`` defaults
                   to the master, ``password`` to the original one
  ``.guest_disk(vdi_uuid)`` context manager yielding the ``nbd+unix://`` URI of the live
                   VDI served read-write by ``xensim guest-disk`` (writes mark CBT)
  ``.stop()``      SIGTERM and wait; returns the exit code

``hold``            function scope; ``hold("backup-vm-done")`` is an XENCBT_TEST_PAUSE item
                    that blocks that step of the product until ``hold.release(step)``, a
                    stop signal it handled, or the test's end: windows held by events,
                    never by timers.

Parallel runs (pytest-xdist, ``make check``'s ``-n``): every worker has its own basetemp,
hence its own slot directory (XENCBT_RUNTIME_DIR), secret watch (TMPDIR, exec records,
XENSIM_SECRETS_LOG) and tmp paths; ports are 0.  Tests of a module that defines a module-
(or class-, package-) scoped fixture stay together on one worker, every other test is
scheduled on its own (tests/xdist_groups.py), the slowest known ones first
(``SLOW_FIRST``).  Each worker hands its reliability figures to the
controller (``workeroutput``), which sums them for the summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from secretwatch import WATCH

XENSIM = [sys.executable, "-m", "xensim.main"]


def ssl_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


class Simulator:
    def __init__(self, state_dir: Path, args: list[str]) -> None:
        self.state_dir = state_dir
        self.log = open(state_dir.parent / f"{state_dir.name}.stderr", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*XENSIM, "serve", "--state-dir", str(state_dir), *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self.proc.stdout.readline()  # the ready line: no polling, no sleeps
        if not line:
            self.proc.wait()
            raise RuntimeError(f"xensim serve failed:\n{self.stderr()}")
        self.info = json.loads(line)
        self.password = Path(self.info["password_file"]).read_text().strip()
        WATCH.register(self.password)
        from xensim.control import Control

        self.control = Control(self.info)
        self._sessions: list = []

    def stderr(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.state_dir.parent / f"{self.state_dir.name}.stderr").read_text()

    def session(
        self, url: str | None = None, cafile: str | None = None, password: str | None = None
    ):
        import XenAPI

        url = url or self.info["xapi"]
        transport = xmlrpc.client.SafeTransport(context=ssl_context(cafile or self.info["ca_file"]))
        session = XenAPI.Session(url, transport=transport)
        session.xenapi.login_with_password("root", password or self.password, "1.1", "xensim-tests")
        self._sessions.append(session)
        return session

    @contextlib.contextmanager
    def guest_disk(self, vdi_uuid: str, *options: str) -> Iterator[str]:
        """``options``: e.g. ``--untracked`` (writes CBT does not record: a fault)."""
        proc = subprocess.Popen(
            [*XENSIM, "guest-disk", "--state-dir", str(self.state_dir), *options, vdi_uuid],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        try:
            uri = proc.stdout.readline().strip()
            if not uri:
                raise RuntimeError(f"xensim guest-disk failed:\n{self.stderr()}")
            yield uri
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, self.stderr()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self._learn_secrets()
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def _learn_secrets(self) -> None:
        """Tell the secret watch every password and session ref this pool issued."""
        from xensim.control import ControlError

        try:
            WATCH.learn(self.control.issued_secrets())
        except (OSError, ControlError) as e:
            WATCH.output("xensim %s" % self.state_dir, "issued secrets unknown: %s" % e)


@pytest.fixture
def xensim_factory(tmp_path: Path) -> Iterator:
    started: list[Simulator] = []

    def start(state_dir: Path | None = None, **options: object) -> Simulator:
        state_dir = state_dir or tmp_path / f"xensim{len(started)}"
        # A refused login costs 5 s on xensim as on xapi; tests that do not measure that
        # delay keep it short.
        options.setdefault("auth_fail_delay", 0.2)
        args: list[str] = []
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        sim = Simulator(Path(state_dir), args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        if sim.proc.returncode is None:
            assert sim.stop() == 0, sim.stderr()


@pytest.fixture
def xensim(xensim_factory) -> Simulator:
    return xensim_factory()


class Holds:
    """``hold(step)``: the XENCBT_TEST_PAUSE item that holds ``step`` of the product
    (orchestrate/xencbt_cli/proc/testhook.py) until ``release(step)``, a stop signal the
    product handled, or the end of the test (every hold is released at teardown)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.fds: dict[str, int] = {}

    def __call__(self, step: str) -> str:
        fifo = self.where / ("hold-" + step)
        if step not in self.fds:
            os.mkfifo(fifo, 0o600)
            self.fds[step] = os.open(fifo, os.O_RDWR)  # never blocks; the product's reads
        return "%s=hold:%s" % (step, fifo)  # block until it is closed

    def release(self, step: str) -> None:
        """Removed first: a later pass of the step is not held; then closed: the one held
        now reads EOF."""
        fd = self.fds.pop(step, None)
        if fd is not None:
            (self.where / ("hold-" + step)).unlink()
            os.close(fd)

    def release_all(self) -> None:
        for step in list(self.fds):
            self.release(step)


@pytest.fixture
def hold(tmp_path_factory) -> Iterator[Holds]:
    holds = Holds(tmp_path_factory.mktemp("holds"))
    yield holds
    holds.release_all()


@pytest.fixture(autouse=True)
def _simulator_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Child processes run `python -m xensim.main` from the editable install; make sure a
    # checkout without it installed still finds the package.
    sim_dir = str(Path(__file__).resolve().parent.parent / "simulator")
    path = os.environ.get("PYTHONPATH", "")
    if sim_dir not in path.split(os.pathsep):
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (sim_dir, path) if p))


@pytest.fixture(scope="session", autouse=True)
def _slot_dir(tmp_path_factory) -> Iterator[None]:
    """The machine-wide NBD connection slots (plugin/xencbt_core/slots.py) of this run
    apart from those of any other run on the machine (another checkout's suite, a real
    backup), and not left behind in /var/tmp/xencbt."""
    run = tmp_path_factory.getbasetemp() / "slots"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XENCBT_RUNTIME_DIR", str(run))
        yield


@pytest.fixture(scope="session", autouse=True)
def _secret_watch(tmp_path_factory) -> Iterator[None]:
    """Issue #5, #18: no password, session ref or export name in any exec's argv or
    environment, in any file under basetemp unless private, in any temp file (deleted ones
    too), in any captured output (tests/secretwatch.py).  Fails the run, naming where, if
    one is found.  As root or in CI a TMPDIR that cannot be watched fails the run."""
    from tally import tally

    required = os.geteuid() == 0 or bool(os.environ.get("CI"))
    WATCH.setup(tmp_path_factory.getbasetemp(), required)
    yield
    WATCH.teardown()
    findings = WATCH.finish(tmp_path_factory.getbasetemp())
    if WATCH.keeper is not None and not WATCH.keeper.watching:
        tally("secret scans: deleted temp files NOT watched (no root)", 1)
    for name, count in WATCH.counts.items():
        tally("secret scans: " + name, count)
    tally("secrets found", len(findings))
    if findings:
        pytest.fail("secrets leaked:\n  " + "\n  ".join(findings[:50]), pytrace=False)


# Tests that take a minute or more (measured, README "Testing"): scheduled first, so none
# of them starts last and stretches a parallel run's tail.  Only the order changes.
SLOW_FIRST = (
    "test_cli_files.py::",
    "test_cli_encrypt.py::test_reencrypting_copy_killed_at_random_moments_then_rerun_is_complete",
    "test_cli_signals.py::test_sigkill_leaves_no_process_and_no_reader",
    "test_cli_copy.py::test_copy_killed_at_random_moments_then_rerun_is_complete",
    "test_crash_prune.py::test_prune_killed[anywhere-True]",
    "test_cli_retention.py::test_policies_over_simulated_weeks",
    "test_crash_prune.py::test_prune_killed[flatten-True]",
    "test_cli_encrypt.py::test_encrypted_chain_backs_up_restores_verifies_prunes",
    "test_restore_vm.py::test_restore_vm_killed_at_random_moments_leaves_nothing_after_repair",
)

_controller = False  # this process is xdist's controller: it runs no test itself


# Set in an xdist worker's environment (COLUMNS=80, LINES=24) though not in the run's:
# rich would wrap what xencbt says at 80 columns, whatever the terminal a test gives it.
TERMINAL_SIZE = ("COLUMNS", "LINES")


# The suite runs under the umask most shells have (022), whatever the caller's: xencbt
# must make its repositories 0700/0600 all the same, and the invariant check after every
# command (tests/invariants.py) sees it.  XENCBT_TEST_UMASK (octal) tries another.
UMASK = int(os.environ.get("XENCBT_TEST_UMASK", "022"), 8)


def pytest_configure(config) -> None:
    global _controller
    os.umask(UMASK)
    dist = getattr(config.option, "dist", "no")
    _controller = dist != "no" and not hasattr(config, "workerinput")
    if hasattr(config, "workerinput"):  # a worker: the environment the run was started in
        for name in TERMINAL_SIZE:
            value = config.workerinput.get("environ " + name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller, starting a worker
def pytest_configure_node(node) -> None:
    for name in TERMINAL_SIZE:
        node.workerinput["environ " + name] = os.environ.get(name)


def _slow_rank(item) -> int:
    for rank, prefix in enumerate(SLOW_FIRST):
        if item.nodeid.split("/")[-1].startswith(prefix):
            return rank
    return len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items) -> None:
    """The slowest tests first (what a parallel run hands out first)."""
    items.sort(key=_slow_rank)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller's scheduler
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: the tests of a module with a shared fixture on one worker,
    every other test on its own (tests/xdist_groups.py)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist_groups import Scheduler

    return Scheduler(config, log)


def pytest_sessionfinish(session) -> None:
    """A worker hands its figures to the controller (summed in pytest_testnodedown)."""
    if hasattr(session.config, "workerinput"):
        from tally import figures

        session.config.workeroutput["tally"] = json.dumps(figures())


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller, as each worker ends
def pytest_testnodedown(node, error) -> None:
    from tally import merge

    merge(json.loads(getattr(node, "workeroutput", {}).get("tally", "{}")))


def pytest_runtest_logreport(report) -> None:
    """Captured output of every test phase goes to the secret watch (the worker's, in a
    parallel run: the controller only relays reports)."""
    if _controller:
        return
    for name, content in report.sections:
        WATCH.output("%s (%s)" % (report.nodeid, name), content)
    if report.failed:
        WATCH.output("%s (failure report)" % report.nodeid, report.longreprtext)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the reliability figures (tests/tally.py) when any were counted."""
    from tally import figures

    totals = figures()
    if not any(totals.values()):
        return
    terminalreporter.section("reliability figures")
    for name, count in totals.items():
        terminalreporter.write_line(f"{name:>28}: {count}")
