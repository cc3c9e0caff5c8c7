"""The secret watch itself (tests/secretwatch.py, run over the whole suite by conftest):
proof that it sees what it claims to see, so that "secrets found: 0" means something."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from cli_support import XENCBT, Vm, cli_env, rand
from faultkit import argv, running, wait_until
from secretwatch import (
    EXEC_ENV,
    EXECWATCH,
    ISSUED_ENV,
    WATCH,
    TempKeeper,
    Watch,
    _command_name,
    traced,
)
from tally import tally

pytestmark = pytest.mark.reliability

# Known only to the private Watch instances below, so the run-wide watch ignores them.
CANARY = "canary-%d-not-a-real-password" % time.time_ns()


def test_a_secret_in_argv_or_environment_is_found(tmp_path):
    w = Watch()
    w.register(CANARY)
    code = "import sys, time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(30)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, "password=" + CANARY], stdout=subprocess.PIPE
        ),
        subprocess.Popen(
            [sys.executable, "-c", code], env={"XENCBT_PASSWORD": CANARY}, stdout=subprocess.PIPE
        ),
    ]
    try:
        for p in procs:
            assert p.stdout.readline() == b"up\n"
        w.sample(os.getpid())
    finally:
        for p in procs:
            p.kill()
            p.wait()
    findings = w.finish(None)
    assert any("argv" in f for f in findings), findings
    assert any("env" in f for f in findings), findings
    assert CANARY not in "".join(findings)  # the report names where, not what
    tally("secret scans: self-tests", 1)


def test_generic_patterns_and_outputs():
    w = Watch()
    w.allow("OpaqueRef:0123")
    w.allow("/x?session_id=OpaqueRef:fake", where="(qemu-nbd)")
    w.output("a command's stderr", "cannot open /abc?session_id=xyz")
    w.output("a VM name given on purpose", "no VM named OpaqueRef:0123")
    w.output("pid 1 argv (qemu-nbd)", "qemu-nbd -x /x?session_id=OpaqueRef:fake")
    w.output("pid 2 argv (nbdkit)", "nbdkit exportname=/x?session_id=OpaqueRef:fake")
    findings = w.finish(None)
    assert len(findings) == 3, findings
    assert sum("session_id=" in f for f in findings) == 2
    assert all("pid 1" not in f for f in findings)


def test_an_allowance_holds_while_the_command_is_still_in_its_execwatch_wrappers():
    """A traced qemu-nbd given a fake export name on purpose: sampled between execwatch.sh's
    execs, the process is ``sh execwatch.sh qemu-nbd …`` or ``strace … -- qemu-nbd …``, and
    the allowance for qemu-nbd's argv must cover it (CI saw the strace stage once), while the
    same argv under any other command is still found."""
    export = "/x?session_id=OpaqueRef:fake"
    w = Watch()
    w.allow(export, where="argv (qemu-nbd)")
    stages = [  # each stage's argv, as a process sampled at that moment shows it
        ["/bin/sh", str(EXECWATCH), "qemu-nbd", "-x", export],
        ["strace", "-DDD", "-f", "-o", "log", "--", "qemu-nbd", "-x", export],
        ["qemu-nbd", "-x", export],
        ["strace", "-f", "--", "nbdkit", "-e", export],
    ]
    for pid, words in enumerate(stages):
        name = _command_name([x.encode() for x in words])
        w.output("pid %d argv (%s)" % (pid, name), " ".join(words))
    findings = w.finish(None)
    assert findings and all(f.startswith("pid 3 argv (nbdkit)") for f in findings), findings
    tally("secret scans: self-tests", 1)


def test_files_holding_secrets_must_be_private_and_not_in_a_repository(tmp_path):
    w = Watch()
    w.register(CANARY)
    readable = tmp_path / "log.txt"
    readable.write_text("login with %s\n" % CANARY)
    readable.chmod(0o644)
    private = tmp_path / "password"
    private.write_text(CANARY)
    private.chmod(0o600)
    manifest = tmp_path / "point.json"
    manifest.write_text('{"snapshot_uuid": "x", "note": "%s"}' % CANARY)
    manifest.chmod(0o600)
    (tmp_path / "clean.txt").write_text("nothing here")
    findings = w.finish(tmp_path)
    assert len(findings) == 2, findings
    assert any(str(readable) in f and "readable by others" in f for f in findings)
    assert any(str(manifest) in f and "repository file" in f for f in findings)
    assert w.counts["private files holding secrets"] == 1
    assert w.counts["files scanned"] == 4


def test_the_run_wide_watch_sees_the_real_processes_and_learns_the_sessions(
    xensim_factory, tmp_path
):
    """During a real backup the watch samples xencbt and the captive nbdkit with the plugin;
    when the simulator stops, its password and every session ref it issued are known."""
    sim = xensim_factory(disk_sizes="2M,1M", in_use_wait=0.2)
    vm = Vm(sim)
    vm.write(0, {0: rand(1 << 20)})
    sim.control.set_faults(read_latency=0.2)  # keep nbdkit alive for several samples
    with running(sim, "backup", "demo-vm", "--repo", str(tmp_path / "repo")) as finish:
        wait_until(
            lambda: any("xencbt.py" in t and "nbdkit" in t for t in WATCH._texts),
            what="the watch to see nbdkit running the plugin",
        )
        r = finish()
    assert r.returncode == 0, r
    assert any("xencbt_cli.main" in t and "backup" in t for t in WATCH._texts)
    issued = sim.control.issued_secrets()
    assert len(issued["sessions"]) >= 3  # this test's, the command's and the plugin's
    assert sim.stop() == 0
    assert set(issued["sessions"]) <= WATCH.secrets
    assert sim.password in WATCH.secrets
    tally("secret scans: self-tests", 1)


def test_password_from_stdin_reaches_the_plugin_through_a_memfd_and_no_file(xensim, tmp_path):
    """--password-file -: the plugin gets password=+/proc/PID/fd/N, a memfd of the xencbt
    process, never the password itself nor a file on disk; so a SIGKILL of xencbt alone
    mid-copy leaves no copy of it in TMPDIR (a temp file would outlive it)."""
    import psutil
    from crash_support import kill

    tmp = Path(tempfile.mkdtemp())  # inside the run's watched TMPDIR (secretwatch.py)
    env = cli_env(xensim)
    env.pop("XENCBT_PASSWORD_FILE")
    env["TMPDIR"] = str(tmp)
    xensim.control.set_faults(read_latency=0.1)
    proc = subprocess.Popen(
        argv(xensim, "--password-file", "-", "backup", "demo-vm", "--repo", str(tmp_path / "r")),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # kill() waits for its session to empty
    )
    given = "password=+/proc/%d/fd/" % proc.pid

    def plugin_params() -> list[str]:
        found = []
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                found += [a for a in child.cmdline() if a.startswith("password=")]
            except psutil.NoSuchProcess:
                pass
        return found

    try:
        proc.stdin.write(xensim.password + "\n")
        proc.stdin.flush()
        wait_until(lambda: xensim.control.counters()["host0"]["reads"] > 0, what="the copy")
        params = plugin_params()
        assert params and all(p.startswith(given) for p in params), params
        written = [p for p in tmp.rglob("*") if p.is_file()]
    finally:
        kill(proc) if proc.poll() is None else proc.communicate()
    assert written == []
    # Killed mid-copy: nothing of the password was left on disk.
    assert not [p for p in tmp.rglob("*") if p.is_file()]
    holding = [
        p
        for where in (tmp, tmp_path / "r")
        for p in where.rglob("*")
        if p.is_file() and xensim.password.encode() in p.read_bytes()
    ]
    assert holding == []


def test_every_exec_is_seen_even_a_5_ms_process(tmp_path):
    """40 processes living ~5 ms each with a secret in argv, run under execwatch.sh as
    the product is: the watch sees all 40 (sampling /proc every 75 ms saw none)."""
    w = Watch()
    w.register(CANARY)
    execs = tmp_path / "execs"
    execs.mkdir()
    (tmp_path / "canary").write_text(CANARY)
    loop = 'c=$(cat "$1"); for i in $(seq 40); do sh -c "sleep 0.005" "password=$c"; done'
    env = {**os.environ, EXEC_ENV: str(execs)}
    done = subprocess.run(
        traced(["sh", "-c", loop, "sh", str(tmp_path / "canary")]), env=env, timeout=60
    )
    assert done.returncode == 0
    w.read_execs(execs)
    findings = w.finish(None)
    pids = {f.split()[1] for f in findings if "exec argv (sh) holds a secret (plain)" in f}
    assert len(pids) == 40, findings
    assert w.counts["execs seen"] >= 81  # the loop's shell, 40 sh, 40 sleep (and cat)
    assert CANARY not in "".join(findings)
    tally("secret scans: self-tests", 1)


def test_encoded_secrets_are_found(tmp_path):
    w = Watch()
    secret = "OpaqueRef:%s" % CANARY  # ':' changes under percent-encoding
    w.register(secret)
    wrapped = ("<" + secret + ">").encode()
    forms = {
        "percent-encoded": "/export?session_id=" + urllib.parse.quote(secret, safe=""),
        "JSON-escaped": '{"ref": "%s"}' % "".join("\\u%04x" % ord(c) for c in secret),
    }
    for skip in range(3):  # every base64 alignment of a secret inside a longer string
        forms["base64-encoded#%d" % skip] = base64.b64encode(b"x" * skip + wrapped).decode()
    for name, text in forms.items():
        assert secret not in text
        w.output(name, text)
    w.output("percent-encoded export name", "nbds://h/x%3Fsession_id%3DOpaqueRef%3Afake")
    leaked = tmp_path / "log.txt"
    leaked.write_text(forms["base64-encoded#1"])
    leaked.chmod(0o644)
    findings = w.finish(tmp_path)
    for name in forms:
        encoding = name.split("#")[0]
        assert any(f.startswith(name + " holds a secret (%s)" % encoding) for f in findings), (
            name,
            findings,
        )
    assert any("session_id=" in f and "percent-encoded" in f for f in findings), findings
    assert any(str(leaked) in f and "readable by others" in f for f in findings), findings
    assert w.counts["encodings checked"] == 4
    tally("secret scans: self-tests", 1)


def test_a_deleted_temp_file_is_read(tmp_path):
    """A temp file written with a secret and removed at once, as a careless product would:
    fanotify hands over the file with the event, so its content and mode are still read."""
    try:
        keeper = TempKeeper.start(tmp_path / "tmp", required=True)
    except RuntimeError as e:
        if os.geteuid() == 0 or os.environ.get("CI"):
            raise
        pytest.skip("needs root (tmpfs, fanotify): %s" % e)
    keeper._stop.set()  # events queue up unread until after the rm: the worst case
    keeper._thread.join(10)
    (tmp_path / "canary").write_text(CANARY)
    script = (
        'c=$(cat "$1"); umask 022; printf %s "$c" > "$2/leak"; rm "$2/leak"; '
        'umask 077; printf %s "$c" > "$2/private"; rm "$2/private"'
    )
    try:
        subprocess.run(
            ["sh", "-c", script, "sh", str(tmp_path / "canary"), str(tmp_path / "tmp")],
            check=True,
            timeout=30,
        )
        assert not list((tmp_path / "tmp").iterdir())  # both gone before the scan
    finally:
        keeper.stop()
    w = Watch()
    w.register(CANARY)
    w.keeper = keeper
    findings = w.finish(None)
    assert len(findings) == 1, findings
    assert "/leak (deleted) holds a secret and is readable by others (mode 644)" in findings[0]
    assert w.counts["temp files caught"] == 2
    assert w.counts["private files holding secrets"] == 1
    tally("secret scans: self-tests", 1)


def test_the_run_wide_watch_covers_tmpdir_execs_and_every_simulator(tmp_path):
    """TMPDIR of every run is the watched tmpfs; a simulator started by anything (here by
    hand, as the demos do) records its password and sessions for the watch; the product's
    runs and their children are recorded exec by exec."""
    if os.geteuid() == 0 or os.environ.get("CI"):
        assert WATCH.keeper.watching
    assert os.environ["TMPDIR"] == str(WATCH.tmpdir) == tempfile.gettempdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xensim.main", "serve", "--state-dir", str(tmp_path / "s")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        password = Path(info["password_file"]).read_text().strip()
        run = argv_run(info, tmp_path)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    w = Watch()
    w.read_issued(Path(os.environ[ISSUED_ENV]))
    assert password in w.secrets
    issued = [s for s in w.secrets if s.startswith("OpaqueRef:")]
    assert issued, "no session ref recorded"
    w.read_execs(WATCH.private / "execs")
    assert any("xencbt_cli.main" in t and run in t for t in w._texts), "the run was not traced"
    tally("secret scans: self-tests", 1)


def argv_run(info: dict, tmp_path: Path) -> str:
    """One xencbt run (it logs in) against the simulator ``info`` describes; returns a
    marker of its argv."""
    marker = str(tmp_path / "marker-repo")
    env = {**os.environ, "XENCBT_XAPI": info["xapi"], "XENCBT_PASSWORD_FILE": info["password_file"]}
    r = subprocess.run(
        [*XENCBT, "--xapi-cafile", info["ca_file"], "list", "--repo", marker],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    WATCH.output("xencbt list", r.stdout, r.stderr)
    return marker
