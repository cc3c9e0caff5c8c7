"""Repository, settings and connection budget without a pool: real qemu-img images."""

from __future__ import annotations

import json
import os
import threading

import pytest
from repo_chains import VDI, VM, flat_sha, make_chain, verified
from xencbt_cli import settings
from xencbt_cli.errors import LockBusy, UsageError
from xencbt_cli.jobs import prune
from xencbt_cli.jobs.snapshot_copy import ConnectionBudget
from xencbt_cli.proc import qemu_img
from xencbt_cli.repo import image
from xencbt_cli.repo.journal import JOURNAL
from xencbt_cli.repo.repository import Repository


@pytest.mark.parametrize("old", [False, True], ids=["chunked", "format-1"])
def test_prune_keeps_newest_byte_identical(tmp_path, old):
    chain, made = make_chain(tmp_path, 4, old)
    sums = {p: chain.sums_path(p).read_bytes() for p, _ in made[2:]} if not old else {}
    with chain.lock():
        assert prune.prune(chain, 2) == [made[0][0], made[1][0]]
    points = chain.points()
    assert [m.point for m in points] == [p for p, _ in made[2:]]
    assert points[0].base_point is None and "prune" in points[0].history[0]
    for point, whole in made[2:]:
        assert flat_sha(chain.image_path(point), tmp_path) == whole
    assert qemu_img.backing(chain.image_path(made[2][0])) is None
    # The kept points' flattened view is unchanged, so are their sums; the removed ones'
    # sums went with them.
    assert {p: chain.sums_path(p).read_bytes() for p in sums} == sums
    assert sorted(x.name for x in chain.path.glob("*.sums")) == sorted(p + ".sums" for p in sums)
    assert verified(chain) == [None, None]


def test_format_1_manifests_verify_and_damage_is_named(tmp_path):
    chain, made = make_chain(tmp_path, 2, old=True)
    assert verified(chain) == [None, None]
    with open(chain.image_path(made[1][0]), "r+b") as f:  # its only data cluster rots
        f.seek(-65536 + 10, os.SEEK_END)
        f.write(b"rot")
    (problem,) = [p for p in verified(chain) if p]
    assert problem.startswith("sha256 ") and "recorded" in problem


def test_damaged_or_missing_sums_fail_verify(tmp_path):
    chain, made = make_chain(tmp_path, 2)
    path = chain.sums_path(made[0][0])
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert "is damaged" in verified(chain)[0] and verified(chain)[1] is None
    path.unlink()
    assert "is missing" in verified(chain)[0]


def test_prune_interrupted_after_swap_is_rolled_forward(tmp_path):
    chain, made = make_chain(tmp_path, 3)
    # Crash right after the rename: the image is standalone, manifests still old.
    target = chain.image_path(made[1][0])
    image.flatten(target, chain.partial_path(made[1][0]))
    (chain.path / JOURNAL).write_text(json.dumps({"point": made[1][0], "remove": [made[0][0]]}))
    chain.partial_path(made[1][0]).replace(target)
    chain.manifest_path(made[0][0]).unlink()  # ... and after the first removal began
    with chain.lock():
        chain.clean()
    assert [m.point for m in chain.points()] == [made[1][0], made[2][0]]
    assert not (chain.path / JOURNAL).exists()
    assert sorted(p.name for p in chain.path.glob("*.sums")) == [p + ".sums" for p, _ in made[1:]]
    assert verified(chain) == [None, None]
    for point, whole in made[1:]:
        assert flat_sha(chain.image_path(point), tmp_path) == whole


def test_prune_interrupted_before_swap_is_undone(tmp_path):
    chain, made = make_chain(tmp_path, 3)
    image.flatten(chain.image_path(made[1][0]), chain.partial_path(made[1][0]))
    (chain.path / JOURNAL).write_text(json.dumps({"point": made[1][0], "remove": [made[0][0]]}))
    with chain.lock():
        removed = chain.clean()
    assert removed == [made[1][0] + ".qcow2.partial"]
    assert [m.point for m in chain.points()] == [p for p, _ in made]


def test_point_without_manifest_does_not_exist_and_is_cleaned(tmp_path):
    chain, made = make_chain(tmp_path, 2)
    chain.manifest_path(made[1][0]).unlink()
    (chain.path / "20250101T000009.000000Z.json.tmp").write_text("{")
    (chain.path / "20250101T000009.000000Z.sums.tmp").write_bytes(b"x")
    assert [m.point for m in chain.points()] == [made[0][0]]
    with chain.lock():
        assert sorted(chain.clean()) == [
            made[1][0] + ".qcow2",
            made[1][0] + ".sums",
            "20250101T000009.000000Z.json.tmp",
            "20250101T000009.000000Z.sums.tmp",
        ]
    assert [p.name for p in chain.path.glob("*.sums")] == [made[0][0] + ".sums"]


def test_lock_is_exclusive(tmp_path):
    chain = Repository(tmp_path).chain(VM, VDI)
    with chain.lock(), pytest.raises(LockBusy, match="--wait"), chain.lock():
        pass


def test_settings_precedence(tmp_path, monkeypatch):
    conf = tmp_path / "xencbt.conf"
    conf.write_text("[xencbt]\nxapi = https://from-config\nuser = cfg\npassword_file = /p\n")
    monkeypatch.setenv("XENCBT_XAPI", "https://from-env")
    monkeypatch.delenv("XENCBT_USER", raising=False)
    monkeypatch.delenv("XENCBT_PASSWORD_FILE", raising=False)
    s = settings.resolve({}, str(conf))
    assert (s.xapi, s.user, s.password_file) == ("https://from-env", "cfg", "/p")
    s = settings.resolve({"xapi": "https://from-option"}, str(conf))
    assert s.xapi == "https://from-option"
    conf.write_text("[xencbt]\npassword = hunter22\n")
    with pytest.raises(UsageError, match="password_file"):
        settings.resolve({}, str(conf))


def test_connection_budget_never_exceeds_limit():
    budget = ConnectionBudget(16)
    peak = [0]
    lock = threading.Lock()

    def copy():
        with budget.take(10) as n:
            with lock:
                peak[0] = max(peak[0], 16 - budget.free)
            assert n == 10
            threading.Event().wait(0.05)

    threads = [threading.Thread(target=copy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 10 and budget.free == 16


def test_manifest_without_a_usable_digest_is_unreadable(tmp_path):
    chain, made = make_chain(tmp_path, 2)
    path = chain.manifest_path(made[0][0])
    m = json.loads(path.read_text())
    path.write_text(json.dumps(dict(m, chunk_size=None)))
    assert "no valid chunk_size" in chain.damaged()[made[0][0]]
    del m["digest"]
    path.write_text(json.dumps(m))
    assert "neither a digest nor a sha256" in chain.damaged()[made[0][0]]
    assert [p.point for p in chain.points()] == [made[1][0]]
