"""The HTML report: self-contained, autoescaped, with gallery, quarantine and timeline."""

from __future__ import annotations

import re
import shutil

import pytest

from runner.engine.executor import ApplyOptions, apply
from runner.engine.progress import QuietReporter
from runner.spec import load_spec
from runner.core import contract
from runner.stages import registry as stage_registry

HOSTILE = "<script>alert('pwned')</script>"

SPEC = f"""\
version: 1
character:
  name: hero
  display_name: "Hero \\"><img src=x onerror=alert(1)>"
  trigger: hrochr
  description: "{HOSTILE} & friends"
  traits: {{fixed: ["<b>bold</b>"]}}
  references: [../refs]
dataset:
  sources:
    - images: ../photos
report:
  gallery_limit: 2
"""


@pytest.fixture()
def only_ingest_and_report() -> contract.Registry:
    builtin = stage_registry()
    return contract.Registry([builtin.get("ingest"), builtin.get("report")])


def test_report_is_self_contained_and_escapes_spec_text(project, shared_data, only_ingest_and_report):
    photos = project / "photos"
    photos.mkdir()
    for name in ("obama_01.jpg", "obama_02.jpg", "obama_small.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / name, photos / name)
    (photos / "broken.jpg").write_text("not a jpeg")
    (project / "refs").mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_04.jpg", project / "refs" / "ref.jpg")
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text(SPEC)
    res = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter(), registry=only_ingest_and_report)
    assert res.status == "succeeded"
    path = res.reports["hero"]
    assert path.parent == project / "reports" / "hero" and path.name == f"{res.run_id}.html"
    assert (project / "reports" / "hero" / "latest.html").read_text() == path.read_text()
    html = path.read_text()
    # hostile text stays text
    assert HOSTILE not in html and "&lt;script&gt;alert(" in html
    assert "<img src=x" not in html and "<b>bold</b>" not in html
    assert "&amp; friends" in html
    assert not re.search(r"<script", html, re.I)
    # self-contained: every image is a data URI, nothing is fetched from anywhere
    srcs = re.findall(r'(?:src|href)="([^"#][^"]*)"', html)
    assert srcs and all(s.startswith("data:") for s in srcs), [s[:40] for s in srcs if not s.startswith("data:")]
    # gallery capped at gallery_limit, with the count; quarantine list with the reason; timeline
    assert html.count('<figure><img src="data:image/jpeg;base64,') == 2
    assert "Showing the first 2." in html
    assert "broken.jpg" in html and "not an image" in html
    assert "hero:ingest" in html and "Timeline" in html
    assert 'alt="ref.jpg"' in html  # the reference thumbnail


def test_runner_report_rerenders(project, shared_data, only_ingest_and_report):
    photos = project / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", photos / "a.jpg")
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text(SPEC.replace("  references: [../refs]\n", ""))
    first = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter(), registry=only_ingest_and_report)
    from runner.engine.executor import rerender_reports

    again = rerender_reports([load_spec(spec_file)], QuietReporter(), registry=only_ingest_and_report)
    statuses = {r.stage_id: r.status for r in again.results}
    assert statuses == {"hero:ingest": "cached", "hero:report": "succeeded"}
    assert again.reports["hero"] != first.reports["hero"] and again.reports["hero"].exists()


def _ride_registry(n: int) -> contract.Registry:
    """A stand-in for a ride day: ``n`` stages of one kind with a section each and a report row
    (the third one needs attention), plus the real report."""
    def expand(spec, graph):
        return [contract.PlanNode(id=contract.node_id(graph.character, "ride", f"0:guest_{i}.mp4"), kind="ride",
                                  character=graph.character, config={"i": i}, outputs=("sets",)) for i in range(n)]

    def run(config, inputs, ctx):
        (ctx.out_dir / "sets").mkdir()
        (ctx.out_dir / "sets" / "count.txt").write_text(str(config["i"] * 10))
        return {"sets": contract.Artifact("sets", ctx.out_dir / "sets")}

    def section(config, outputs, env):
        return [contract.ReportSection(title=f"Ride {config['i']}", template="sections/tracking.html.j2",
                                       anchor=f"ride-{config['i']}", context={"runs": []})]

    def row(config, outputs):
        images = int((outputs["sets"].path / "count.txt").read_text())
        return {"images": images, "attention": "no face found" if config["i"] == 3 else None}

    reg = contract.Registry([stage_registry().get("report")])
    reg.register("ride", version=1, order=15, expand=expand, report=section, report_row=row)(run)
    return reg


@pytest.mark.parametrize("rides, tables", [(3, 0), (6, 1)])
def test_a_kind_with_many_stages_gets_one_table_and_a_few_sections(project, rides, tables):
    """Above report.max_sections_per_kind stages of a kind, the report holds one table with a row
    per stage and the detailed sections of that many (those needing attention first); at or
    under it, every stage keeps its section."""
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text("version: 1\ncharacter: {name: hero, trigger: hrochr}\nreport: {max_sections_per_kind: 3}\n")
    res = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter(), registry=_ride_registry(rides))
    assert res.status == "succeeded"
    html = res.reports["hero"].read_text()
    assert html.count('class="stage-table"') == tables
    shown = sorted(int(i) for i in re.findall(r'<section id="ride-(\d+)"', html))
    if not tables:
        assert shown == list(range(rides))
        return
    table = re.search(r'<table class="stage-table">.*?</table>', html, re.S).group(0)
    assert "6 ride stages" in html and table.count("<code>hero:ride[0:guest_") == 6
    assert shown == [0, 1, 3]  # the one needing attention, then the first ones in plan order
    assert table.count('<tr class="attention">') == 1 and "no face found" in table
    assert '<td class="num">50</td>' in table  # hero:ride[0:guest_5.mp4] row: its images
