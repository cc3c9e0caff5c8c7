"""The secret watch itself (tests/secretwatch.py, run over the whole suite by conftest):
proof that it sees what it claims to see, so that "secrets found: 0" means something."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from cli_support import Vm, cli_env, rand
from faultkit import argv, run, running, wait_until
from secretwatch import WATCH, Watch
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


def test_password_from_stdin_reaches_the_plugin_through_a_private_file(xensim, tmp_path):
    """--password-file -: the plugin gets password=+FILE of a 0600 file in a 0700 dir that
    is gone afterwards; never the password itself."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = cli_env(xensim)
    env.pop("XENCBT_PASSWORD_FILE")
    env["TMPDIR"] = str(tmp)
    seen: list[tuple[int, int]] = []

    def private_files() -> bool:
        try:
            for d in tmp.iterdir():
                for f in d.iterdir():
                    seen.append((d.stat().st_mode & 0o777, f.stat().st_mode & 0o777))
        except FileNotFoundError:
            pass  # made or removed while we looked
        return bool(seen)

    xensim.control.set_faults(read_latency=0.1)
    proc = subprocess.Popen(
        argv(xensim, "--password-file", "-", "backup", "demo-vm", "--repo", str(tmp_path / "r")),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.stdin.write(xensim.password + "\n")
        proc.stdin.flush()  # one line is all it reads; communicate() closes stdin
        wait_until(private_files, what="the private password file")
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    WATCH.output("xencbt --password-file - backup", out, err)
    assert proc.returncode == 0, err
    assert seen and all(d == 0o700 and f == 0o600 for d, f in seen), seen
    assert not list(tmp.iterdir())  # removed when the run ended
    assert run(xensim, "list", "--repo", str(tmp_path / "r")).returncode == 0
