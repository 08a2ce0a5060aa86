"""`runner apply specs/`: a folder of many specs is one batch, through the real CLI (in process).

Fifty characters run their ingest stage in one call on a real photo (`--only ingest`: the
cheapest stage; the whole pipeline costs about 0.35 s a character on 2 cores, analyze's dlib face
descriptor and the report's template compilation, plus a one-off 2-4 s load of the dlib models,
so it runs here over a handful of specs). The review files `runner review` writes next to the
specs (runner.review.decisions.review_path) are never taken as specs; any other YAML that is not a
spec is refused with its file:line, before anything runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.engine.workspace import Workspace
from runner.review.decisions import review_path
from runner.spec import REVIEW_SUFFIX, SpecError, collect_spec_files

N = 50
SPEC = """\
version: 1
character:
  name: {name}
  trigger: {name}chr
  class_word: man
dataset:
  sources:
    - images: ../photos
  ingest: {{max_side: 512}}
"""


def write_specs(project: Path, shared_data: Path, n: int) -> list[str]:
    (project / "photos").mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", project / "photos")
    names = [f"c{i:02d}" for i in range(n)]
    for name in names:
        (project / "specs" / f"{name}.yaml").write_text(SPEC.format(name=name))
    # what `runner review` saves next to a spec: a valid decisions file, read by c00's stages
    review_path(project / "specs" / "c00.yaml").write_text("format: 1\n")
    return names


def invoke(*args: str):
    r = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in r.output, r.output
    return r


def succeeded(project: Path) -> list[str]:
    """The stages the latest run executed (cached ones are not executions)."""
    ws = Workspace(project)
    try:
        return sorted(e["stage_id"] for e in ws.executions(ws.runs(limit=1)[0]["id"]) if e["status"] == "succeeded")
    finally:
        ws.close()


def run_count(project: Path) -> int:
    if not (project / ".runner" / "state.db").exists():
        return 0
    ws = Workspace(project)
    try:
        return len(ws.runs(limit=1000))
    finally:
        ws.close()


def test_fifty_specs_in_one_apply(project, shared_data, monkeypatch):
    names = write_specs(project, shared_data, N)
    monkeypatch.chdir(project)

    r = invoke("apply", "specs/", "--only", "ingest", "-q")
    assert r.exit_code == 0, r.output
    assert f"Apply complete: {N} succeeded" in r.output
    assert succeeded(project) == [f"{n}:ingest" for n in names]

    r = invoke("apply", "specs/", "--only", "ingest", "-q")
    assert r.exit_code == 0 and f"No changes: {N} stages up to date" in r.output, r.output

    spec = project / "specs" / "c07.yaml"
    spec.write_text(spec.read_text().replace("max_side: 512", "max_side: 256"))
    plan = json.loads(invoke("plan", "specs/", "--only", "ingest", "--json").output)
    assert {s["stage"]: s["action"] for s in plan["stages"] if s["action"] != "cached"} == {"c07:ingest": "rerun"}
    r = invoke("apply", "specs/", "--only", "ingest", "-q")
    assert r.exit_code == 0 and f"{N - 1} cached, 1 succeeded" in r.output, r.output
    assert succeeded(project) == ["c07:ingest"]


def test_one_broken_spec_refuses_the_whole_batch(project, shared_data, monkeypatch):
    write_specs(project, shared_data, N)
    monkeypatch.chdir(project)
    bad = project / "specs" / "c23.yaml"
    bad.write_text(bad.read_text().replace("max_side: 512", "max_side: big"))

    r = invoke("apply", "specs/", "--only", "ingest")
    assert r.exit_code == 2, r.output
    assert "specs/c23.yaml:9:" in r.output and "max_side" in r.output, r.output
    assert "c22" not in r.output and "Apply" not in r.output
    assert run_count(project) == 0  # refused before the workspace was touched: nothing ran


@pytest.mark.slow  # the whole pipeline: the dlib models load once (2-4 s), then ~0.35 s a character
def test_the_whole_pipeline_over_a_handful(project, shared_data, monkeypatch):
    names = write_specs(project, shared_data, 3)
    monkeypatch.chdir(project)
    r = invoke("apply", "specs/", "-q")
    assert r.exit_code == 0, r.output
    ran = succeeded(project)
    kinds = sorted({sid.split(":")[1] for sid in ran})
    assert {"ingest", "analyze", "curate", "report"} <= set(kinds), ran
    assert ran == sorted(f"{n}:{k}" for n in names for k in kinds)  # every character, every stage
    reports = [line.split(": ", 1) for line in r.output.splitlines() if line.startswith("Report for")]
    assert [who for who, _ in reports] == [f"Report for {n}" for n in names]
    assert all((project / where).is_file() for _, where in reports)
    r = invoke("apply", "specs/", "-q")
    assert r.exit_code == 0 and f"No changes: {3 * len(kinds)} stages up to date" in r.output, r.output


def test_which_files_of_a_folder_are_specs(project, shared_data):
    write_specs(project, shared_data, 2)
    specs = project / "specs"
    (specs / ".c00.yaml.swp.yaml").write_text("editor: backup\n")  # hidden: skipped
    (specs / "sub").mkdir()
    (specs / "sub" / "nested.yaml").write_text(SPEC.format(name="nested"))  # sub-folders are not read
    assert review_path(specs / "c00.yaml").name.endswith(REVIEW_SUFFIX)
    assert [p.name for p in collect_spec_files([specs])] == ["c00.yaml", "c01.yaml"]
    # a folder and a file in it: each spec once
    assert [p.name for p in collect_spec_files([specs, specs / "c01.yaml"])] == ["c00.yaml", "c01.yaml"]

    with pytest.raises(SpecError) as exc:  # a review file named on its own is not a spec
        collect_spec_files([review_path(specs / "c00.yaml")])
    assert "c00.review.yaml:1:1" in str(exc.value) and "not a spec" in str(exc.value)
    assert "c00.yaml" in exc.value.problems[0].hint

    only_reviews = project / "reviews"
    only_reviews.mkdir()
    (only_reviews / f"x{REVIEW_SUFFIX}").write_text("format: 1\n")
    with pytest.raises(SpecError, match="no .yaml spec files in this folder"):
        collect_spec_files([only_reviews])


def test_other_yaml_in_the_folder_is_refused_with_its_line(project, shared_data, monkeypatch):
    write_specs(project, shared_data, 3)
    (project / "specs" / "notes.yaml").write_text("todo:\n  - more photos\n")
    monkeypatch.chdir(project)
    r = invoke("validate", "specs/")
    assert r.exit_code == 2
    assert "specs/notes.yaml:1:1: (top level): missing required key 'version'" in r.output, r.output
    assert "c00.review.yaml" not in r.output
