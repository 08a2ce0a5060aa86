"""The dataset stages planned from a spec and applied through the engine (with --only export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.engine.executor import ApplyOptions, apply, plan_specs
from runner.engine.progress import QuietReporter
from runner.plan.graph import build_graph
from runner.spec import load_spec

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
  shots:
    strategy: reweight
    targets: {close_up: [0.4, 0.6], medium: [0.4, 0.6]}
  export: {formats: [kohya, jsonl], repeats: 5}
"""


@pytest.fixture()
def hero(project: Path, shared_data: Path) -> Path:
    (project / "photos").mkdir()
    (project / "refs").mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", project / "refs")
    for name in ("obama_02.jpg", "obama_04.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / name, project / "photos" / name)
    shutil.copy(shared_data / "faces" / "kit_harington" / "kit_02.jpg", project / "photos")
    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC)
    return spec


def test_expand_wires_ingest_references_and_the_chain(hero: Path) -> None:
    spec = load_spec(hero)
    graph = build_graph([spec])
    an = graph.nodes["hero:analyze"]
    assert an.inputs["images"].stage_id == "hero:ingest"
    ref = an.inputs["reference0"]
    assert ref.spec_key == "character.references[0]" and Path(ref.root) == spec.project_root / "refs"
    assert an.config["name"] == "dlib" and an.config["workers"] == 1
    assert graph.nodes["hero:curate"].inputs["analysis"].stage_id == "hero:analyze"
    assert graph.nodes["hero:curate"].config["targets"] == {"close_up": [0.4, 0.6], "medium": [0.4, 0.6]}
    assert graph.nodes["hero:caption"].inputs["curated"].stage_id == "hero:curate"
    assert graph.nodes["hero:caption"].outputs == ("dataset", "balance")
    assert graph.nodes["hero:export"].inputs["dataset"].stage_id == "hero:caption"
    json.dumps([n.config for n in graph.nodes.values()])  # configs are JSON


@pytest.mark.slow  # about 4 s
def test_apply_through_the_engine_then_noop_then_curate_only_change(hero: Path) -> None:
    res = apply([load_spec(hero)], ApplyOptions(only=["export"]), QuietReporter())
    assert res.status == "succeeded", [(r.stage_id, r.error) for r in res.failed]
    ran = {r.stage_id for r in res.results if r.status == "succeeded"}
    assert {"hero:ingest", "hero:analyze", "hero:curate", "hero:caption", "hero:export"} <= ran

    store = hero.parent.parent / ".runner" / "store"
    meta_files = list(store.rglob("metadata.jsonl"))
    assert len(meta_files) == 1
    records = [json.loads(line) for line in meta_files[0].read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in records) == ["obama_02.jpg", "obama_04.jpg"]  # kit dropped
    assert {r["shot"]: r["repeats"] for r in records} == {"medium": 1, "close_up": 1}

    plan, ws = plan_specs([load_spec(hero)], only=["export"])
    ws.close()
    assert all(s.action == "cached" for s in plan.stages), [(s.id, s.action) for s in plan.stages]

    # A curation change re-runs curate and what follows it, not ingest or analyze.
    hero.write_text(SPEC.replace("  export:", "  curation: {dedupe_hamming: 0}\n  export:"))
    plan, ws = plan_specs([load_spec(hero)], only=["export"])
    ws.close()
    actions = {s.id: s.action for s in plan.stages}
    assert actions["hero:ingest"] == "cached" and actions["hero:analyze"] == "cached"
    assert actions["hero:curate"] != "cached" and actions["hero:export"] != "cached"


def test_video_identity_images_feed_analyze(project: Path, shared_data: Path) -> None:
    (project / "clips").mkdir()
    shutil.copy(shared_data / "video" / "carphone.mp4", project / "clips" / "carphone.mp4")
    spec = project / "specs" / "clip.yaml"
    spec.write_text(SPEC.replace("name: hero", "name: clip").replace("references: [../refs]", "references: []")
                    .replace("    - images: ../photos", "    - video: ../clips/carphone.mp4"))
    graph = build_graph([load_spec(spec)])
    assert "clip:ingest" not in graph.nodes
    video_nodes = [n for n in graph.nodes.values() if n.kind == "video_identity"]
    assert video_nodes
    inputs = graph.nodes["clip:analyze"].inputs
    assert {ref.stage_id for name, ref in inputs.items() if name.startswith("images")} == {n.id for n in video_nodes}
    assert not any(name.startswith("reference") for name in inputs)
