"""A stage's per-item map over containers (hardware.stage_map): the real analyze stage over twelve
photos runs once here and once through the worker entry point with its images split over three
chunk containers (subprocesses of `python -m runner.backends.worker map`, a folder standing in
for the Modal Volume); records.jsonl, references.json and every thumbnail are byte-identical, and
summary.json is identical once its two timing fields (seconds, images_per_s) are dropped, as
between any two local runs. A chunk whose container dies is run again and changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from runner.backends.mapping import rebase, split
from runner.backends.remote import FolderTransport
from runner.core import pricing
from runner.core.errors import UserError
from runner.engine.executor import ApplyOptions, apply
from runner.engine.progress import PlainReporter
from runner.engine.workspace import Workspace
from runner.spec import load_specs

PHOTOS = ["obama/obama_02.jpg", "obama/obama_03.jpg", "obama/obama_04.jpg", "obama/obama_small.jpg",
          "kit_harington/kit_01.jpg", "kit_harington/kit_02.jpg", "kit_harington/kit_03.jpg",
          "biden/biden_01.jpg", "biden/biden_02.jpg", "rose_leslie/rose_01.jpg", "alex_lacamoire/alex_01.jpg",
          "groups/two_people.jpg"]

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
  references: [../refs]
dataset:
  sources:
    - images: ../photos
  analysis: {backend: dlib, workers: 1}
hardware:
  stage_backend: {analyze: modal}
  stage_map: {analyze: 3}
  cpu: {cores: 2, memory_gib: 4}
  modal: {retries: 0}
"""

# Fields two local runs do not share either (the stage's own wall time).
TIMINGS = {"analysis/summary.json": ("seconds", "images_per_s")}

# Runs the worker entry point. The first chunk container to start dies (os._exit, as a preempted
# container) while analyzing its second image, after the first image's thumbnail was written; the
# stage's first container dies once its map has finished, before it wrote any output.
CRASH_ONCE = """\
import os, runpy, sys
module, args = sys.argv[2], sys.argv[3:]
sys.argv = [module, *args]
def first(marker):
    try:
        os.mkdir(os.environ[marker])
    except FileExistsError:
        return False
    return True
if args[:1] == ["map"] and first("MAP_CRASH_MARKER"):
    import runner.vision.analysis as analysis
    real, seen = analysis.analyze_job, []
    def dying(job):
        seen.append(job["id"])
        if len(seen) == 2:
            os._exit(137)
        return real(job)
    analysis.analyze_job = dying
elif args[:1] != ["map"] and first("STAGE_CRASH_MARKER"):
    import runner.backends.mapping as mapping
    mapping.VolumeMapper._record = lambda self, ctx, done: os._exit(137)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def make_project(root: Path, shared_data: Path, spec_text: str = SPEC) -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("# character-runner project\n")
    (root / "photos").mkdir()
    (root / "refs").mkdir()
    faces = shared_data / "faces"
    shutil.copy(faces / "obama" / "obama_01.jpg", root / "refs")
    for rel in PHOTOS:
        shutil.copy(faces / rel, root / "photos" / Path(rel).name)
    spec = root / "specs" / "hero.yaml"
    spec.write_text(spec_text)
    return spec


def _digest(rel: str, p: Path) -> str:
    if rel not in TIMINGS:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    data = json.loads(p.read_text())
    assert all(k in data for k in TIMINGS[rel]), rel
    return json.dumps({k: v for k, v in data.items() if k not in TIMINGS[rel]}, sort_keys=True)


def analyze_outputs(project: Path, run_id: str) -> tuple[str, dict[str, str], dict]:
    """(cache key, {relative path: digest} of the outputs, the execution row) of hero:analyze."""
    ws = Workspace(project)
    try:
        key = ws.last_success("hero:analyze").key
        root = ws.store_path(key)
        row = {e["stage_id"]: e for e in ws.executions(run_id)}["hero:analyze"]
    finally:
        ws.close()
    files = {p.relative_to(root).as_posix(): _digest(p.relative_to(root).as_posix(), p)
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != "_manifest.json"}
    return key, files, row


def run_local(project_spec: Path):
    result = apply(load_specs([str(project_spec)]), ApplyOptions(only=["analyze"], backend="local", command="test"),
                   PlainReporter(io.StringIO()))
    assert result.status == "succeeded", [(r.stage_id, r.error) for r in result.failed]
    return analyze_outputs(project_spec.parent.parent, result.run_id)


def run_remote(project_spec: Path, transport: FolderTransport):
    result = apply(load_specs([str(project_spec)]), ApplyOptions(only=["analyze"], remote=transport, command="test"),
                   PlainReporter(io.StringIO()))
    assert result.status == "succeeded", [(r.stage_id, r.error) for r in result.failed]
    return analyze_outputs(project_spec.parent.parent, result.run_id)


def log_events(row: dict) -> list[dict]:
    return [json.loads(line) for line in Path(row["log_path"]).read_text().splitlines()]


def chunk_lines(row: dict) -> list[dict]:
    return [e for e in log_events(row) if "map_chunk" in e]


def test_the_map_over_three_containers_equals_the_local_run(tmp_path, shared_data):
    key_here, here, local_row = run_local(make_project(tmp_path / "here", shared_data))
    # stage_map on a stage that runs here is a no-op, and the log says so
    assert local_row["backend"] == "local"
    assert any("hardware.stage_map: 3 containers apply when the stage runs on Modal" in e.get("message", "")
               for e in log_events(local_row))
    assert not chunk_lines(local_row)

    key_there, there, row = run_remote(make_project(tmp_path / "there", shared_data),
                                       FolderTransport(tmp_path / "volume"))
    assert key_here == key_there  # hardware.stage_map is in no cache key
    assert "analysis/records.jsonl" in here and "analysis/references.json" in here
    assert sum(1 for f in here if f.startswith("analysis/thumbs/")) == len(PHOTOS)
    assert there == here  # every byte, thumbnails included (summary.json without its timings)

    chunks = chunk_lines(row)
    assert [c["map_chunk"] for c in chunks] == [0, 1, 2] and [c["items"] for c in chunks] == [4, 4, 4]
    assert all(c["remote"] and c["attempts"] == 1 for c in chunks)
    (summary,) = [e["map"] for e in log_events(row) if "map" in e]
    assert summary["containers"] == 3 and summary["items"] == [4, 4, 4]
    m = row["metrics"]
    assert m["map.containers"] == 3 and m["map.attempts"] == 3 and m["map.items_max"] == 4
    # billed: the stage's container and the map's three, all at the stage's CPU price
    assert m["map.billed_s"] >= sum(c["seconds"] for c in chunks) * 0.99
    assert m["remote.billed_s"] > m["remote.duration_s"] + m["map.billed_s"] * 0.99
    box = pricing.parse_cpu_label(row["gpu"])
    assert row["gpu"] == "cpu 2 cores 4 GiB" and box is not None
    per_hour = 0.0472 * box.cores + 0.0080 * box.memory_gib
    assert row["cost"] == pytest.approx(per_hour * m["remote.billed_s"] / 3600, rel=1e-3, abs=1e-6)

    # the chunks' outputs and manifests are gone from the volume once the stage succeeded
    volume = tmp_path / "volume"
    assert (volume / "results" / f"{key_there}.json").is_file()
    assert not (volume / "map" / key_there).exists() and not list((volume / "results").glob("*-map*"))


def test_containers_that_die_are_retried_and_the_outputs_are_unchanged(tmp_path, shared_data, monkeypatch):
    _key, here, _row = run_local(make_project(tmp_path / "here", shared_data))
    (tmp_path / "crash_once.py").write_text(CRASH_ONCE)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "crash_once.py"}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("MAP_CRASH_MARKER", str(tmp_path / "chunk-died"))
    monkeypatch.setenv("STAGE_CRASH_MARKER", str(tmp_path / "stage-died"))
    transport = FolderTransport(tmp_path / "volume", retries=1, python=str(python))  # as modal.Retries(1)

    _key, there, row = run_remote(make_project(tmp_path / "there", shared_data), transport)
    assert (tmp_path / "chunk-died").is_dir() and (tmp_path / "stage-died").is_dir()  # both did die
    assert there == here
    assert row["metrics"]["remote.attempts"] == 2
    # the stage's second container found its three chunks finished on the volume, one of them in
    # its second attempt
    chunks = chunk_lines(row)
    assert [c["reused"] for c in chunks] == [True, True, True]
    assert sorted(c["attempts"] for c in chunks) == [1, 1, 2]
    assert row["metrics"]["map.attempts"] == 4
    # the dead attempt is billed too, up to its retry's start
    assert row["metrics"]["map.billed_s"] > sum(c["seconds"] for c in chunks)
    # four chunk attempts, each recorded on the volume
    attempts = [p for p in (tmp_path / "volume" / "attempts").glob("*-map*.jsonl")]
    assert len(attempts) == 3
    starts = sum(1 for p in attempts for line in p.read_text().splitlines() if json.loads(line)["event"] == "start")
    assert starts == 4


@pytest.mark.parametrize("entry, where", [
    ("{analyze: 0}", r"hardware\.stage_map\.analyze"),
    ("{analyze: -2}", r"hardware\.stage_map\.analyze"),
    ("{analyze: many}", r"hardware\.stage_map\.analyze.*not an integer"),
    ("{ingset: 4}", r"(?s)hardware\.stage_map\.ingset: unknown key.*one of: analyze"),
    ("{ingest: 4}", r"(?s)hardware\.stage_map\.ingest: unknown key.*one of: analyze"),  # a kind without a per-item map
])
def test_a_bad_stage_map_is_a_spec_error_naming_the_key(tmp_path, shared_data, entry, where):
    spec = make_project(tmp_path / "p", shared_data, SPEC.replace("stage_map: {analyze: 3}", f"stage_map: {entry}"))
    with pytest.raises(UserError, match=where):
        load_specs([str(spec)])


def test_chunks_are_contiguous_and_paths_move_with_their_folder():
    items = list(range(11))
    chunks = split(items, 3)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]] and sum(chunks, []) == items
    assert split(items[:2], 8) == [[0], [1]]  # never an empty chunk
    base = os.sep.join(["", "vol", "work", "k", "attempt1"])
    job = {"path": base + "/project/photos/a.jpg", "thumb": base + "/out/t/a.jpg", "id": "attempt1",
           "other": base + "x/y", "nested": [{"p": base}]}
    moved = rebase(job, base, "/tmp/chunk")
    assert moved == {"path": "/tmp/chunk/project/photos/a.jpg", "thumb": "/tmp/chunk/out/t/a.jpg", "id": "attempt1",
                     "other": base + "x/y", "nested": [{"p": "/tmp/chunk"}]}
    assert rebase(moved, "/tmp/chunk", base) == job


def test_modal_declares_a_map_function_with_the_stage_container(tmp_path, shared_data):
    pytest.importorskip("modal")
    from runner.backends import modal_backend
    from runner.plan.graph import build_graph

    graph = build_graph(load_specs([str(make_project(tmp_path / "p", shared_data))]))
    built = modal_backend.build_stage_app(graph)
    fn = built.function_for(graph.nodes["hero:analyze"])
    assert fn.map_function is not None and fn.name.endswith("-map")
    stage, chunk = fn.function.info(), fn.map_function.info()  # local metadata: no network
    assert (chunk.cpu, chunk.memory_mib, chunk.max_retries) == (stage.cpu, stage.memory_mib, stage.max_retries)
    assert (stage.cpu, stage.memory_mib) == (2.0, 4096)
