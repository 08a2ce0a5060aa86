"""runner.buildcache.build_once: concurrent builders build once; a failed or unfinished build
leaves nothing half-made (the folder swap is runner.core.fs.replace_folder)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from runner.buildcache import build_once
from runner.core.fs import replace_folder


def _slow_build(tmp: Path) -> None:
    time.sleep(0.2)
    (tmp / "weights.bin").write_bytes(b"w")
    with open(tmp.parent / "builds.log", "a") as fh:
        fh.write("built\n")


def _build_in_child(final: str) -> list[str]:
    out = build_once(Path(final), _slow_build, notes={"TINY_RANDOM_MODEL.txt": "noise\n"})
    return sorted(p.name for p in out.iterdir())


def test_concurrent_builders_build_once(tmp_path):
    final = tmp_path / "model"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        listings = pool.map(_build_in_child, [str(final)] * 3)
    assert listings == [["DONE", "TINY_RANDOM_MODEL.txt", "weights.bin"]] * 3
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "builds.log", "model"]


@pytest.mark.parametrize("fails_in", ["build", "notes"])
def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path, fails_in):
    final = tmp_path / "model"

    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"h")
        if fails_in == "build":
            raise RuntimeError("killed")

    notes = {"no-such-folder/NOTE.txt": "n"} if fails_in == "notes" else None
    with pytest.raises((RuntimeError, FileNotFoundError)):
        build_once(final, build, notes=notes)
    assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]
    build_once(final, lambda tmp: (tmp / "ok.bin").write_bytes(b"o"))
    assert sorted(p.name for p in final.iterdir()) == ["DONE", "ok.bin"]


def test_an_unfinished_folder_is_rebuilt_and_a_finished_one_kept(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"s")  # no marker: a build killed before the rename
    build_once(final, lambda tmp: (tmp / "new.bin").write_bytes(b"n"))
    assert sorted(p.name for p in final.iterdir()) == ["DONE", "new.bin"]
    build_once(final, lambda tmp: pytest.fail("built again"))


def test_replace_folder_removes_what_a_failed_fill_made(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "partial.txt").write_text("p")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(dest, fill)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dest / "old.txt").read_text() == "old"
