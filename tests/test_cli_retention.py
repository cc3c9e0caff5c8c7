"""xencbt prune --keep-* over backups taken on simulated weeks (XENCBT_NOW names each
point), through the real CLI against the simulator: which VM points each policy keeps,
against the hand-worked table of retention_cases.py, and every kept point of every disk
restoring byte-identical to the test's model of the guest after the prune."""

from __future__ import annotations

import json

import cli_support
import pytest
from cli_support import BLOCK, Vm, backup, rand, restored, xencbt
from retention_cases import POINTS, TABLE


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,512K", in_use_wait=0.5)


def point_id(name: str) -> str:
    return POINTS[name].strftime("%Y%m%dT%H%M%S.%fZ")


@pytest.fixture
def weeks(sim, tmp_path, monkeypatch):
    """Ten backups of demo-vm at the table's times; returns (repo, vm, {point: [disk
    contents]})."""
    repo = tmp_path / "repo"
    vm = Vm(sim)
    history = {}
    env = cli_support.cli_env
    for i, name in enumerate(POINTS):
        vm.write(0, {(i % 16) * BLOCK: rand(BLOCK)})
        if i % 3 == 0:
            vm.write(1, {(i % 8) * BLOCK: rand(BLOCK)})
        when = POINTS[name].strftime("%Y-%m-%dT%H:%M:%S")
        monkeypatch.setattr(
            cli_support, "cli_env", lambda s, when=when: {**env(s), "XENCBT_NOW": when}
        )
        (got,) = backup(sim, repo, "demo-vm")["vms"]
        assert got["ok"] and got["point"] == point_id(name), got
        history[got["point"]] = [bytes(m) for m in vm.models]
    monkeypatch.setattr(cli_support, "cli_env", env)
    return repo, vm, history


def kept_by(out: dict) -> dict[str, list[str]]:
    (vm,) = out["vms"]
    return {p["point"]: p["kept_by"] for p in vm["points"] if p["kept_by"]}


def on_disk(repo, vm: Vm) -> list[list[str]]:
    return [sorted(p.stem for p in (repo / vm.uuid / vdi).glob("*.json")) for vdi in vm.uuids]


def test_policies_over_simulated_weeks(sim, weeks, tmp_path):
    repo, vm, history = weeks
    before = on_disk(repo, vm)
    names = {point_id(n): n for n in POINTS}
    # Dry runs: each policy's choice, per VM point, as the table says; nothing changes.
    for policy, expected in TABLE:
        args = []
        for rule, n in policy.__dict__.items():
            if n:
                args += ["--keep-" + rule, "unlimited" if n == -1 else str(n)]
        out = json.loads(
            xencbt(sim, "--json", "prune", "--repo", str(repo), "--dry-run", *args).stdout
        )
        assert {names[p]: r for p, r in kept_by(out).items()} == expected, policy
        assert out["dry_run"] and on_disk(repo, vm) == before
    r = xencbt(sim, "prune", "--repo", str(repo), "demo-vm", "--dry-run", "--keep-weekly", "3")
    assert "keep   %s  (weekly)" % point_id("P6") in r.stdout
    assert "would go %s" % point_id("P5") in r.stdout

    # The real prune: kept P1, P7, P9, P10; P2..P6 merge into P7, P8 into P9 (both disks).
    out = json.loads(
        xencbt(
            sim,
            "--json",
            "prune",
            "--repo",
            str(repo),
            "--keep-last",
            "2",
            "--keep-weekly",
            "2",
            "--keep-yearly",
            "5",
        ).stdout
    )
    kept = sorted(point_id(n) for n in ("P1", "P7", "P9", "P10"))
    assert on_disk(repo, vm) == [kept, kept]
    assert out["freed_bytes"] > 0
    assert out["removed"] == {vdi: sorted(set(history) - set(kept)) for vdi in vm.uuids}
    for point in kept:
        for disk, vdi in enumerate(vm.uuids):
            assert restored(sim, repo, tmp_path, vdi, point) == history[point][disk], point
    xencbt(sim, "verify", "--repo", str(repo))

    # The next backup builds on the kept newest point; --keep 1 then merges all into it.
    vm.write(0, {15 * BLOCK: rand(BLOCK)})
    (got,) = backup(sim, repo, "demo-vm")["vms"]
    assert {d["type"] for d in got["disks"]} == {"incremental"}
    xencbt(sim, "prune", "--repo", str(repo), "--keep", "1")
    assert on_disk(repo, vm) == [[got["point"]], [got["point"]]]
    for disk, vdi in enumerate(vm.uuids):
        assert restored(sim, repo, tmp_path, vdi) == bytes(vm.models[disk])
    xencbt(sim, "verify", "--repo", str(repo))


def test_prune_needs_a_rule_and_refuses_keep_with_keep_last(sim, tmp_path):
    repo = tmp_path / "repo"
    xencbt(sim, "init", "--repo", str(repo))
    r = xencbt(sim, "prune", "--repo", str(repo), check=2)
    assert "say what to keep" in r.stderr
    r = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1", "--keep-last", "2", check=2)
    assert "--keep is --keep-last" in r.stderr
    xencbt(sim, "prune", "--repo", str(repo), "--keep-daily", "0", check=2)
