"""Planner change detection and engine behaviour on a small diamond of fake stages after ingest."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from runner.engine.executor import ApplyOptions, apply, plan_specs
from runner.engine.progress import QuietReporter
from runner.spec import load_spec
from runner.core import contract
from runner.stages import registry as stage_registry

TESTS = Path(__file__).resolve().parent


class _Kinds:
    """The registry the helpers below plan and apply with (set by the ``fake_kinds`` fixture)."""

    registry: contract.Registry | None = None


@pytest.fixture()
def fake_kinds():
    """Only ingest, report and the fake kinds: engine behaviour, not the real pipeline's cost."""
    builtin = stage_registry()
    sys.path.insert(0, str(TESTS))
    try:
        import fake_stages

        _Kinds.registry = contract.Registry([builtin.get("ingest"), builtin.get("report"), *fake_stages.REGISTRY])
        yield _Kinds.registry
    finally:
        _Kinds.registry = None
        sys.path.remove(str(TESTS))


SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
  description: first
  traits: {fixed: [tall], variable: [hat]}
dataset:
  sources:
    - images: ../photos
"""


@pytest.fixture()
def hero(project, shared_data, fake_kinds):
    photos = project / "photos"
    photos.mkdir()
    for name in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / name, photos / name)
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text(SPEC)
    return spec_file


def edit(spec_file: Path, old: str, new: str) -> None:
    spec_file.write_text(spec_file.read_text().replace(old, new))


def plan_of(spec_file: Path, **kw):
    p, ws = plan_specs([load_spec(spec_file)], registry=_Kinds.registry, **kw)
    ws.close()
    return {s.id: s for s in p.stages}, p


def run(spec_file: Path, **kw):
    return apply([load_spec(spec_file)], ApplyOptions(**kw), QuietReporter(), registry=_Kinds.registry)


def actions(plan_stages) -> dict[str, str]:
    return {k: v.action for k, v in plan_stages.items()}


def test_first_plan_runs_everything_then_noop(hero):
    stages, p = plan_of(hero)
    assert list(stages) == ["hero:ingest", "hero:fake_a", "hero:fake_b", "hero:fake_c", "hero:fake_slow", "hero:report"]
    assert set(actions(stages).values()) == {"run"}
    assert p.summary() == "Plan: 6 to run, 0 cached."
    res = run(hero)
    assert res.status == "succeeded" and not res.failed
    stages, p = plan_of(hero)
    assert set(actions(stages).values()) == {"cached"}
    assert not p.has_changes and p.summary().startswith("No changes.")
    res = run(hero)
    assert res.status == "no-op"
    assert [r.status for r in res.results] == ["cached"] * 6


def test_changing_one_parameter_reruns_exactly_that_stage_and_dependents(hero):
    run(hero)
    edit(hero, "description: first", "description: second")
    stages, _ = plan_of(hero)
    assert actions(stages) == {
        "hero:ingest": "cached", "hero:fake_a": "rerun", "hero:fake_b": "rerun",
        "hero:fake_c": "cached", "hero:fake_slow": "cached", "hero:report": "rerun",
    }
    assert stages["hero:fake_a"].reasons == ['config value changed: "first" -> "second"']
    assert stages["hero:fake_b"].reasons == ["input a: hero:fake_a re-runs"]
    res = run(hero)
    executed = [r.stage_id for r in res.results if r.status == "succeeded"]
    assert executed == ["hero:fake_a", "hero:fake_b", "hero:report"]

    edit(hero, "fixed: [tall]", "fixed: [tall, bald]")
    stages, _ = plan_of(hero)
    assert [k for k, v in actions(stages).items() if v != "cached"] == ["hero:fake_b", "hero:report"]


def test_changing_a_value_back_restores_cached_outputs(hero):
    run(hero)
    edit(hero, "description: first", "description: second")
    run(hero)
    edit(hero, "description: second", "description: first")
    stages, _ = plan_of(hero)
    assert stages["hero:fake_a"].action == "cached"
    assert "earlier run" in stages["hero:fake_a"].reasons[0]


@pytest.mark.slow  # three whole applies over real photos (test_planner_units checks the same reasons in memory)
def test_data_change_is_detected_and_explained(hero, shared_data):
    run(hero)
    shutil.copy(shared_data / "faces" / "obama" / "obama_03.jpg", hero.parent.parent / "photos" / "new.jpg")
    stages, _ = plan_of(hero)
    assert stages["hero:ingest"].action == "rerun"
    assert stages["hero:ingest"].reasons == ["input source0: files 1 added"]
    assert all(s.action == "rerun" for s in stages.values())
    # touching a file without changing its bytes is not a change
    run(hero)
    p = hero.parent.parent / "photos" / "new.jpg"
    p.write_bytes(p.read_bytes())
    stages, _ = plan_of(hero)
    assert all(s.action == "cached" for s in stages.values())


def test_force_and_only(hero):
    run(hero)
    stages, _ = plan_of(hero, force=["fake_c"])
    assert [k for k, v in actions(stages).items() if v != "cached"] == ["hero:fake_c", "hero:report"]
    assert stages["hero:fake_c"].reasons == ["forced (--force)"]
    edit(hero, "description: first", "description: other")
    stages, _ = plan_of(hero, only=["hero:fake_b"])
    assert list(stages) == ["hero:ingest", "hero:fake_a", "hero:fake_b"]
    res = run(hero, only=["fake_b"])
    assert [r.stage_id for r in res.results if r.status == "succeeded"] == ["hero:fake_a", "hero:fake_b"]
    with pytest.raises(Exception, match="no stage matches 'nope'"):
        plan_of(hero, only=["nope"])


def test_failure_stops_or_keeps_going(hero):
    edit(hero, "variable: [hat]", "variable: [FAIL]")
    res = run(hero)
    status = {r.stage_id: r.status for r in res.results}
    assert res.status == "failed"
    assert status["hero:fake_c"] == "failed"
    assert status["hero:fake_slow"] == "skipped" and status["hero:report"] == "skipped"
    assert "hint: remove FAIL" in res.failed[0].error

    res = run(hero, keep_going=True)
    status = {r.stage_id: r.status for r in res.results}
    assert status["hero:fake_c"] == "failed"
    assert status["hero:fake_slow"] == "succeeded"  # independent branch kept going
    assert status["hero:report"] == "skipped"  # depends on the failed stage
    # the successful stages are cached for the next apply
    edit(hero, "variable: [FAIL]", "variable: [hat]")
    stages, _ = plan_of(hero)
    assert actions(stages)["hero:fake_slow"] == "cached"
    assert actions(stages)["hero:fake_c"] == "run"


def test_state_db_records_runs_and_executions(hero):
    from runner.engine.workspace import Workspace

    res = run(hero)
    ws = Workspace(hero.parent.parent)
    rows = ws.executions(res.run_id)
    assert [r["stage_id"] for r in rows][0] == "hero:ingest"
    ing = rows[0]
    assert ing["status"] == "succeeded" and ing["duration"] > 0 and ing["action"] == "run"
    assert ing["metrics"]["images_kept"] == 2
    assert ing["cost"] == 0.0 and ing["currency"] == "USD"
    assert Path(ing["log_path"]).is_file()
    assert ws.runs()[0]["status"] == "succeeded"
    ws.close()


def test_stat_cache_avoids_rereading_unchanged_files(hero, monkeypatch):
    from runner.engine import workspace as wsmod

    run(hero)
    calls = []
    real = wsmod.file_digest
    monkeypatch.setattr(wsmod, "file_digest", lambda p, *a: calls.append(p) or real(p, *a))
    plan_of(hero)
    assert calls == []
    (hero.parent.parent / "photos" / "obama_01.jpg").touch()
    plan_of(hero)
    assert [Path(c).name for c in calls] == ["obama_01.jpg"]


def test_batch_of_specs_and_duplicate_names(hero, project):
    other = project / "specs" / "villain.yaml"
    other.write_text(SPEC.replace("name: hero", "name: villain"))
    from runner.spec import load_specs

    p, ws = plan_specs(load_specs([project / "specs"]), registry=_Kinds.registry)
    ws.close()
    ids = [s.id for s in p.stages]
    assert "hero:ingest" in ids and "villain:ingest" in ids
    dup = project / "specs" / "zz.yaml"
    dup.write_text(SPEC)
    from runner.plan.graph import GraphError

    with pytest.raises(GraphError, match="two specs define the character 'hero'"):
        plan_specs(load_specs([project / "specs"]), registry=_Kinds.registry)


def test_a_first_plan_of_many_new_files_in_one_folder_writes_its_stat_cache_once(tmp_path):
    """A day of ride videos: one file set per video, all new. The root's stat cache is written once
    when the plan is flushed (not once per file set: that was quadratic at 10,000 videos), and a
    fresh workspace reads every file back without re-hashing."""
    import glob

    from runner.engine import workspace as wsmod

    videos = tmp_path / "videos"
    videos.mkdir()
    names = [f"ride_{i:03d}.mp4" for i in range(40)]
    for n in names:
        (videos / n).write_bytes(n.encode())
    refs = [contract.FileSetRef(root=videos, patterns=(glob.escape(n),), recursive=False, spec_key="k") for n in names]
    ws = wsmod.Workspace(tmp_path)
    writes = []
    ws.db.set_trace_callback(lambda sql: writes.append(sql) if "stat_blob" in sql and "INSERT" in sql else None)
    try:
        for r in refs:
            ws.digest_fileset(r)
        assert writes == []
        ws.flush_digests()
        assert len(writes) == 1
        ws.flush_digests()
        assert len(writes) == 1  # nothing changed since
    finally:
        ws.close()
    ws = wsmod.Workspace(tmp_path)
    try:
        cached = ws._stat_root(str(videos))
        assert sorted(cached) == names
    finally:
        ws.close()


def test_a_plan_killed_while_hashing_keeps_what_it_read_until_the_last_periodic_flush(tmp_path, monkeypatch):
    """While a first plan hashes new files it writes the stat cache every DIGEST_FLUSH_S, so a kill
    (the workspace never closed, no final flush) costs only the files read since."""
    import glob

    from runner.engine import workspace as wsmod

    videos = tmp_path / "videos"
    videos.mkdir()
    names = [f"ride_{i}.mp4" for i in range(6)]
    for n in names:
        (videos / n).write_bytes(n.encode())
    refs = [contract.FileSetRef(root=videos, patterns=(glob.escape(n),), recursive=False, spec_key="k") for n in names]
    monkeypatch.setattr(wsmod, "DIGEST_FLUSH_S", -1.0)  # every new file set flushes
    ws = wsmod.Workspace(tmp_path)
    for r in refs[:4]:
        ws.digest_fileset(r)  # then the process dies: no flush_digests, no close
    again = wsmod.Workspace(tmp_path)
    try:
        assert sorted(again._stat_root(str(videos))) == names[:4]
    finally:
        again.close()
        ws._db.close()


def test_symlink_loops_in_a_photo_folder_are_followed_once(hero):
    photos = hero.parent.parent / "photos"
    (photos / "loop").symlink_to(photos)
    stages, _ = plan_of(hero)
    assert stages["hero:ingest"].fileset_digests["source0"].count == 2


def test_file_sets_sharing_a_folder_keep_each_others_stat_cache(tmp_path, monkeypatch):
    """One file set per video of a folder (a video source each) plus a glob over the folder: after
    the first digest nothing is read again, a changed file is read once for all the sets naming it,
    a deleted one leaves the sets, and a set naming its files never scans the folder."""
    import glob

    from runner.engine import workspace as wsmod

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4", "c [1].mp4"):
        (videos / name).write_bytes(name.encode())
    one = [contract.FileSetRef(root=videos, patterns=(glob.escape(n),), recursive=False, spec_key="k")
           for n in ("a.mp4", "b.mp4", "c [1].mp4")]
    every = contract.FileSetRef(root=videos, patterns=("*.mp4",), recursive=False, spec_key="k")
    calls, scans = [], []
    real_digest, real_tree = wsmod.file_digest, wsmod.iter_tree
    monkeypatch.setattr(wsmod, "file_digest", lambda p, *a: calls.append(Path(p).name) or real_digest(p, *a))
    monkeypatch.setattr(wsmod, "iter_tree", lambda *a, **k: scans.append(a) or real_tree(*a, **k))

    def digest_all():
        ws = wsmod.Workspace(tmp_path)
        try:
            return [[rel for rel, _ in ws.digest_fileset(r).files] for r in (*one, every)]
        finally:
            ws.close()

    assert digest_all() == [["a.mp4"], ["b.mp4"], ["c [1].mp4"], ["a.mp4", "b.mp4", "c [1].mp4"]]
    assert sorted(calls) == ["a.mp4", "b.mp4", "c [1].mp4"] and len(scans) == 1  # only the glob scans
    calls.clear()
    digest_all()
    assert calls == []
    (videos / "a.mp4").write_bytes(b"changed")
    (videos / "b.mp4").unlink()
    got = digest_all()
    assert calls == ["a.mp4"] and got[1] == [] and got[3] == ["a.mp4", "c [1].mp4"]
    calls.clear()
    digest_all()
    assert calls == []
