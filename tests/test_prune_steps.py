"""prune.prune_to with points kept apart (a retention policy): the kept point after
removed ones is rebased onto the kept point before them, journalled, and an interrupted
step is rolled forward or back.  Real qemu-img images; truth: each point's flattened
sha256 recorded when it was made."""

from __future__ import annotations

import json

from repo_chains import flat_sha, make_chain, verified
from xencbt_cli.jobs import prune, verify
from xencbt_cli.proc import qemu_img
from xencbt_cli.repo import image
from xencbt_cli.repo.journal import JOURNAL
from xencbt_cli.repo.repository import Repository


def test_kept_points_apart_are_rebased_byte_identical(tmp_path):
    chain, made = make_chain(tmp_path, 5)
    keep = {made[1][0], made[4][0]}
    sums = {p: chain.sums_path(p).read_bytes() for p in keep}
    with chain.lock():
        removed = prune.prune_to(chain, keep)
    assert removed == [made[0][0], made[2][0], made[3][0]]
    points = chain.points()
    assert [m.point for m in points] == [made[1][0], made[4][0]]
    assert points[0].base_point is None and points[1].base_point == made[1][0]
    assert qemu_img.backing(chain.image_path(made[4][0])) == made[1][0] + ".qcow2"
    for point, whole in (made[1], made[4]):
        assert flat_sha(chain.image_path(point), tmp_path) == whole
    assert {p: chain.sums_path(p).read_bytes() for p in keep} == sums
    assert verified(chain) == [None, None]
    assert not list(chain.path.glob("*.partial"))


def test_the_newest_point_is_always_kept(tmp_path):
    chain, made = make_chain(tmp_path, 3)
    with chain.lock():
        assert prune.prune_to(chain, {made[0][0]}) == [made[1][0]]
    assert [m.point for m in chain.points()] == [made[0][0], made[2][0]]
    assert flat_sha(chain.image_path(made[2][0]), tmp_path) == made[2][1]


def interrupted(chain, made, swapped: bool) -> None:
    """A rebase step of point 3 onto point 1 (removing 2) stopped after its journal, the
    swap done or not."""
    target, partial = chain.image_path(made[3][0]), chain.partial_path(made[3][0])
    image.rebased(target, chain.image_path(made[1][0]), partial)
    journal = {"point": made[3][0], "base": made[1][0], "remove": [made[2][0]]}
    (chain.path / JOURNAL).write_text(json.dumps(journal))
    if swapped:
        partial.replace(target)


def test_rebase_step_interrupted_after_swap_is_rolled_forward(tmp_path):
    chain, made = make_chain(tmp_path, 4)
    interrupted(chain, made, swapped=True)
    # verify judges it as it will end (point 3 backed by point 1), changing nothing.
    said: list[str] = []
    assert verify.verify(Repository(chain.path.parent.parent), [], said.append) == 4
    assert any("interrupted after point %s absorbed" % made[3][0] in s for s in said), said
    assert (chain.path / JOURNAL).exists()
    with chain.lock():
        chain.clean()
    points = {m.point: m for m in chain.points()}
    assert list(points) == [made[0][0], made[1][0], made[3][0]]
    assert points[made[3][0]].base_point == made[1][0]
    assert "merged %s" % made[2][0] in points[made[3][0]].history[0]
    assert not (chain.path / JOURNAL).exists()
    for point, whole in (made[0], made[1], made[3]):
        assert flat_sha(chain.image_path(point), tmp_path) == whole
    assert verified(chain) == [None] * 3


def test_rebase_step_interrupted_before_swap_is_undone(tmp_path):
    chain, made = make_chain(tmp_path, 4)
    interrupted(chain, made, swapped=False)
    with chain.lock():
        assert chain.clean() == [made[3][0] + ".qcow2.partial"]
    assert [m.point for m in chain.points()] == [p for p, _ in made]
    assert qemu_img.backing(chain.image_path(made[3][0])) == made[2][0] + ".qcow2"
    for point, whole in made:
        assert flat_sha(chain.image_path(point), tmp_path) == whole
