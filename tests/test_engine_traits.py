"""The engine goes by stage traits, never by kind names: a summarizing kind of any name re-runs
with its character and has its document published; `runner report` re-runs the kinds with the
trait; plan estimates use a kind's typical duration. Whole applies, on a registry of two fake kinds
(milliseconds each); and the remote side's digest cache on the one HashIndex."""

from __future__ import annotations

from pathlib import Path

from runner.core import contract
from runner.engine.executor import ApplyOptions, apply, plan_estimates, plan_specs, rerender_reports
from runner.engine.progress import QuietReporter
from runner.spec import load_spec

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  description: first
"""


def expand_collect(spec, graph):
    return [contract.PlanNode(id=contract.node_id(graph.character, "collect"), kind="collect",
                              character=graph.character, config={"value": spec["character"]["description"]},
                              outputs=("items",), gpu="L4")]


def run_collect(config, inputs, ctx):
    out = ctx.out_dir / "items.txt"
    out.write_text(config["value"])
    return {"items": contract.Artifact("items", out)}


def expand_digest(spec, graph):
    # No inputs: its key never changes, so only the trait makes it re-run with the others.
    return [contract.PlanNode(id=contract.node_id(graph.character, "digest"), kind="digest",
                              character=graph.character, config={}, outputs=("document", "extra"),
                              after=tuple(n.id for n in graph.nodes))]


def run_digest(config, inputs, ctx):
    doc = ctx.out_dir / "summary.md"
    doc.write_text(f"# run {ctx.run_id}\n")
    (ctx.out_dir / "extra").mkdir()
    return {"document": contract.Artifact("document", doc), "extra": contract.Artifact("extra", ctx.out_dir / "extra")}


def fake_registry(*, summarizes: bool = True) -> contract.Registry:
    reg = contract.Registry()
    reg.register("collect", version=1, order=10, expand=expand_collect, typical_seconds=120.0)(run_collect)
    reg.register("digest", version=1, order=90, expand=expand_digest, summarizes=summarizes)(run_digest)
    return reg


def write_spec(project: Path, description: str = "first") -> Path:
    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC.replace("first", description))
    return spec


def run(spec: Path, registry: contract.Registry, **kw):
    return apply([load_spec(spec)], ApplyOptions(**kw), QuietReporter(), registry=registry)


def test_a_summarizing_kind_of_any_name_reruns_with_its_character_and_is_published(project):
    registry = fake_registry()
    spec = write_spec(project)
    first = run(spec, registry)
    assert first.status == "succeeded"
    folder = project / "reports" / "hero"
    assert first.reports["hero"] == folder / f"{first.run_id}.md"
    assert (folder / "latest.md").read_text() == f"# run {first.run_id}\n"
    assert run(spec, registry).status == "no-op"

    write_spec(project, "second")
    plan, ws = plan_specs([load_spec(spec)], registry=registry)
    ws.close()
    assert {ps.id: ps.action for ps in plan.stages} == {"hero:collect": "rerun", "hero:digest": "rerun"}
    assert plan.by_id("hero:digest").reasons == ["1 stage of this character run"]
    assert [ps.id for ps in plan.pending_work()] == ["hero:collect"]
    again = run(spec, registry)
    assert [r.status for r in again.results] == ["succeeded", "succeeded"]
    assert (folder / "latest.md").read_text() == f"# run {again.run_id}\n"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{first.run_id}.md", f"{again.run_id}.md", "latest.md"])


def test_without_the_trait_the_same_kind_is_neither_rerun_nor_published(project):
    registry = fake_registry(summarizes=False)
    spec = write_spec(project)
    assert run(spec, registry).reports == {}
    write_spec(project, "second")
    again = run(spec, registry)
    assert {r.stage_id: r.status for r in again.results} == {"hero:collect": "succeeded", "hero:digest": "cached"}
    assert not (project / "reports" / "hero").exists()


def test_runner_report_reruns_exactly_the_summarizing_kinds(project):
    registry = fake_registry()
    spec = write_spec(project)
    run(spec, registry)
    res = rerender_reports([load_spec(spec)], QuietReporter(), registry=registry)
    assert {r.stage_id: r.status for r in res.results} == {"hero:collect": "cached", "hero:digest": "succeeded"}
    assert res.reports["hero"].name == f"{res.run_id}.md"


def test_plan_estimates_use_the_kinds_typical_duration(project):
    spec = write_spec(project)
    for typical, seconds in ((120.0, 120.0), (None, 1800.0)):  # 1800: the engine's fallback
        registry = fake_registry()
        if typical is None:
            registry.add(contract.StageKind("collect", 1, run_collect, expand_collect, 10))
        plan, ws = plan_specs([load_spec(spec)], registry=registry)
        est = plan_estimates(plan, "modal", ws)["hero:collect"]
        ws.close()
        assert (est.gpu, est.seconds, est.source) == ("L4", seconds, "default")
        assert f"({seconds / 60:.0f} min)" in est.note


def test_the_remote_digest_cache_keeps_what_other_stages_named(tmp_path):
    """Stages name different files of one project: digesting one subset must not make the cache
    forget another (each file is read once while it is unchanged)."""
    from runner.backends.remote import DigestCache
    from runner.core.hashing import file_sha256

    root = tmp_path / "project"
    root.mkdir()
    files = []
    for i in range(4):
        f = root / f"f{i}.txt"
        f.write_text(f"content {i}")
        files.append(f)
    reads: list[str] = []

    def hasher(path):
        reads.append(Path(path).name)
        return file_sha256(path)

    cache = DigestCache(tmp_path / "digests", hasher=hasher)
    first = cache.digest_tree(root, files[:2])
    cache.digest_tree(root, files[2:])
    assert reads == ["f0.txt", "f1.txt", "f2.txt", "f3.txt"]
    again = DigestCache(tmp_path / "digests", hasher=hasher)  # a new apply: the cache file
    assert again.digest_tree(root, files[:2]) == first and again.digest_tree(root, files[2:])
    assert len(reads) == 4
    files[1].write_text("changed")
    assert again.digest_tree(root, files[:2])[1][1] == file_sha256(files[1])
    assert reads[4:] == ["f1.txt"]
    assert again.local_copy(first[0][1], first[0][2]) == files[0]
