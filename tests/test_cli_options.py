"""The xencbt command as a new user meets it (issue #13 items 5, 8, 10): the README's config
file as written, global options anywhere, --version, JSON errors, an empty repository,
prune's report and --dry-run, and a busy lock that says who holds it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from cli_support import XENCBT, Vm, cli_env, disk_rows, rand, xencbt
from xencbt_core import __version__

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,1M", in_use_wait=0.2)


def bare(sim, *args: str, env: dict | None = None, stdin: str | None = None):
    """xencbt exactly as given: no options added in front of the command."""
    return subprocess.run(
        [*XENCBT, *args],
        env=env or cli_env(sim),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def readme_config() -> str:
    """The config file block of the README's xencbt section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The xencbt command") :]
    return re.search(r"```ini\n(.*?)```", section, re.S).group(1)


def test_the_readme_config_file_works_as_written(sim, tmp_path):
    block = readme_config()
    assert " ; " in block  # the inline comments this is about
    conf = tmp_path / "xencbt.conf"
    conf.write_text(
        block.replace("https://pool-master.example.com", sim.info["xapi"])
        .replace("/etc/xencbt/password", sim.info["password_file"])
        .replace("/etc/xencbt/pool-master.pem", sim.info["ca_file"])
        .replace("/srv/xencbt", str(tmp_path / "repo"))
    )
    env = cli_env(sim)
    del env["XENCBT_XAPI"], env["XENCBT_PASSWORD_FILE"]  # the config file alone
    r = bare(sim, "--config", str(conf), "nbd", "status", env=env)
    assert r.returncode == 0, r.stderr
    assert "nbd" in r.stdout.split()  # the simulator's NBD network, in mode nbd
    r = bare(sim, "--config", str(conf), "--json", "nbd", "status", env=env)
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr


def test_global_options_after_the_command(sim, tmp_path):
    repo = str(tmp_path / "repo")
    ca = sim.info["ca_file"]
    r = bare(sim, "backup", "demo-vm", "--repo", repo, "-v", "--xapi-cafile", ca)
    assert r.returncode == 0, r.stderr
    assert "xencbt: INFO:" in r.stderr  # -v after the command counts
    r = bare(sim, "-v", "nbd", "status", "-v", "--xapi-cafile", ca)
    assert r.returncode == 0 and "xencbt: DEBUG:" in r.stderr, r.stderr  # and adds up
    r = bare(sim, "list", "--repo", repo, "--json")
    assert r.returncode == 0, r.stderr
    rows = disk_rows(json.loads(r.stdout))
    assert len(rows) == 2 and {row["type"] for row in rows} == {"full"}
    r = bare(sim, "nbd", "status", "--xapi-cafile", ca, "--json")
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr
    # One given after the command wins over the same one before it.
    r = bare(sim, "--xapi-cafile", "/nonexistent.pem", "nbd", "status", "--xapi-cafile", ca)
    assert r.returncode == 0, r.stderr


def test_version_and_json_errors(sim, tmp_path):
    r = bare(sim, "--version")
    assert r.returncode == 0 and r.stdout.strip() == "xencbt " + __version__
    r = bare(sim, "list", "--repo", str(tmp_path / "nowhere"), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout) == {
        "error": "repository %s does not exist" % (tmp_path / "nowhere"),
        "exit_code": 1,
    }
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = bare(sim, "--json", "prune", "--repo", str(tmp_path))  # --keep missing
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert err["exit_code"] == 2 and "--keep" in err["error"]
    r = bare(sim, "--json", "--password-file", "/nonexistent", "nbd", "status")
    assert r.returncode == 2 and json.loads(r.stdout)["exit_code"] == 2


def test_verify_of_an_empty_repository_fails(sim, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    r = xencbt(sim, "verify", "--repo", str(repo), check=1)
    assert "no backup points in %s: nothing was verified" % repo in r.stderr
    r = xencbt(sim, "verify", "--repo", str(repo), "--json", check=1)
    assert json.loads(r.stdout)["exit_code"] == 1


def tree(repo: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def test_prune_reports_what_it_removed_and_dry_run_changes_nothing(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    points = []
    for i in range(3):
        vm.write(0, {i * 65536: rand(65536)})
        r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
        points.append(json.loads(r.stdout)["vms"][0]["point"])

    before = tree(repo)
    r = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1", "--dry-run")
    assert tree(repo) == before
    for uuid in vm.uuids:
        assert "VDI %s: would remove 2 old points (%s, %s)" % (uuid, *points[:2]) in r.stdout
    assert "would remove 4 points of 2 VDIs, up to " in r.stdout and not r.stderr

    r = xencbt(sim, "--json", "prune", "--repo", str(repo), "--keep", "1")
    out = json.loads(r.stdout)
    assert out["removed"] == {uuid: points[:2] for uuid in vm.uuids}
    assert out["freed_bytes"] > 0 and out["dry_run"] is False
    assert "removed 4 points of 2 VDIs, freed " in r.stderr
    left = sorted(p.stem for p in repo.rglob("2*.json") if p.parent.name != "points")
    assert left == [points[2]] * 2
    # The VM points went with them: only the kept one's manifest and configuration stay.
    vm_points = sorted(p.name for p in repo.rglob("points/*"))
    assert vm_points == [points[2] + ".config.json", points[2] + ".json"]

    r = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1")
    assert "nothing to prune: no chain has more than 1 point" in r.stdout


def test_a_busy_lock_names_its_holder(sim, tmp_path):
    repo = tmp_path / "repo"
    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
    vdi = json.loads(r.stdout)["vms"][0]["disks"][0]["vdi_uuid"]
    xencbt(sim, "backup", "demo-vm", "--repo", str(repo))
    server = xencbt(sim, "--json", "serve", vdi, "--repo", str(repo), popen=True)
    try:
        assert json.loads(server.stdout.readline())["vdi"] == vdi  # serving: lock held
        r = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1", check=5)
        assert (
            "VDI %s is locked by another xencbt process (xencbt serve, pid %d): try later, "
            "or pass --wait" % (vdi, server.pid) in r.stderr
        )
        # --wait says for whom it waits, then goes on once the server is gone.
        waiting = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1", "--wait", popen=True)
        line = waiting.stderr.readline()
        assert "VDI %s is in use by xencbt serve, pid %d: waiting for it" % (vdi, server.pid) in (
            line
        )
        server.terminate()
        assert server.wait(timeout=30) == 0
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert "VDI %s: merged and removed 1 old point (" % vdi in out
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
