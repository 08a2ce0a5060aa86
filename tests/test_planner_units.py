"""The planner's and the scheduler's decisions on a registry of fake kinds, in memory.

No spec, no workspace, no apply: a graph of hand-built nodes, a :class:`MemoryState` standing in
for the state database and the store, and a digester that answers from a dict. Each test plans a
few times and checks what the planner decided and the reasons it gives (the end-to-end tests in
test_planner.py run the same decisions through real applies).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from runner.core import contract
from runner.engine.schedule import Scheduler
from runner.plan.graph import GraphError, graph_of
from runner.plan.planner import FileSetDigest, Plan, PriorRecord, make_plan

# --------------------------------------------------------------------------- fakes


def _noop_run(config, inputs, ctx):  # never called: nothing here executes a stage
    raise AssertionError("the planner never runs a stage")


def _no_expand(spec, graph):
    return []


def kind(name: str, version: int = 1, order: int = 10, **traits: Any) -> contract.StageKind:
    return contract.StageKind(kind=name, version=version, run=_noop_run, expand=_no_expand, order=order, **traits)


def fake_registry(**versions: int) -> contract.Registry:
    """source -> shape -> summary, plus an independent side branch; ``versions`` bumps a kind."""
    v = {"source": 1, "shape": 1, "side": 1, "summary": 1, **versions}
    return contract.Registry([
        kind("source", v["source"], 10),
        kind("shape", v["shape"], 20),
        kind("side", v["side"], 30),
        kind("summary", v["summary"], 100, summarizes=True),
    ])


PHOTOS = Path("/photos/hero")


def nodes_for(character: str = "hero", *, value: Any = 1, side: str = "a", workers: int = 2) -> list[contract.PlanNode]:
    sid = contract.node_id
    source = contract.PlanNode(id=sid(character, "source"), kind="source", character=character,
                               config={"scale": 1}, outputs=("images",),
                               inputs={"photos": contract.FileSetRef(root=PHOTOS / character)})
    shape = contract.PlanNode(id=sid(character, "shape"), kind="shape", character=character,
                              config={"value": value, "workers": workers}, unkeyed=("workers",),
                              inputs={"images": contract.StageOutputRef(source.id, "images")}, outputs=("out",))
    side_node = contract.PlanNode(id=sid(character, "side"), kind="side", character=character,
                                  config={"side": side},
                                  inputs={"images": contract.StageOutputRef(source.id, "images")}, outputs=("out",))
    # The summary reads only the source (its key does not move when shape or side change) and runs
    # after the others, so whether it re-runs with them is up to its trait.
    summary = contract.PlanNode(id=sid(character, "summary"), kind="summary", character=character, config={},
                                inputs={"images": contract.StageOutputRef(source.id, "images")},
                                after=(shape.id, side_node.id), outputs=("document",))
    return [source, shape, side_node, summary]


class MemoryDigester:
    """File-set digests from a dict: root -> {relative path: content digest}."""

    def __init__(self) -> None:
        self.files: dict[Path, dict[str, str]] = {PHOTOS / "hero": {"a.jpg": "1", "b.jpg": "2"},
                                                  PHOTOS / "villain": {"c.jpg": "3"}}

    def digest_fileset(self, ref: contract.FileSetRef) -> FileSetDigest:
        files = tuple(sorted(self.files.get(Path(ref.root), {}).items()))
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        return FileSetDigest(digest=digest, files=files, root=Path(ref.root))


class MemoryState:
    """The state database and store of earlier applies, in memory."""

    def __init__(self, scratch: Path | None = None) -> None:
        self.current: dict[str, PriorRecord] = {}
        self.stored: set[str] = set()
        self.listings: dict[str, dict[str, str]] = {}
        self.scratch = scratch or Path("/nonexistent/scratch")

    def last_success(self, stage_id: str) -> PriorRecord | None:
        return self.current.get(stage_id)

    def store_has(self, key: str) -> bool:
        return key in self.stored

    def load_outputs(self, key: str) -> dict[str, contract.Artifact]:
        return {}

    def scratch_dir(self, key: str) -> Path:
        return self.scratch / key

    def fileset_listing(self, digest: str) -> dict[str, str] | None:
        return self.listings.get(digest)

    def succeed(self, plan: Plan) -> None:
        """What a successful apply of ``plan`` leaves: every executed stage current and stored."""
        for ps in plan.stages:
            if ps.will_execute:
                self.current[ps.id] = PriorRecord(ps.key, json.dumps(ps.components), "run", 0.0)
                self.stored.add(ps.key)
                for fd in ps.fileset_digests.values():
                    self.listings[fd.digest] = dict(fd.files)


def plan(nodes: list[contract.PlanNode], state: MemoryState, digester: MemoryDigester | None = None,
         registry: contract.Registry | None = None, **kw: Any) -> Plan:
    registry = registry or fake_registry()
    return make_plan(graph_of(nodes, {}, registry), state, digester or MemoryDigester(), **kw)


def actions(p: Plan) -> dict[str, str]:
    return {ps.id: ps.action for ps in p.stages}


def reasons(p: Plan, stage_id: str) -> list[str]:
    return p.by_id(stage_id).reasons


def applied(nodes: list[contract.PlanNode] | None = None, **kw: Any) -> tuple[MemoryState, MemoryDigester]:
    """A state after one successful apply of ``nodes``."""
    state, digester = MemoryState(), MemoryDigester()
    state.succeed(plan(nodes or nodes_for(), state, digester, **kw))
    return state, digester


# --------------------------------------------------------------------------- decisions


def test_new_stages_run_then_are_cached():
    state, digester = MemoryState(), MemoryDigester()
    first = plan(nodes_for(), state, digester)
    assert set(actions(first).values()) == {"run"}
    assert all(ps.reasons == ["new stage"] for ps in first.stages)
    assert first.summary() == "Plan: 4 to run, 0 cached."
    state.succeed(first)
    again = plan(nodes_for(), state, digester)
    assert set(actions(again).values()) == {"cached"}
    assert all(ps.reasons == ["up to date"] for ps in again.stages)
    assert not again.has_changes and again.summary() == "No changes. 4 stages up to date."


def test_a_config_change_reruns_the_stage_and_what_reads_it_with_reasons():
    state, digester = applied()
    p = plan(nodes_for(value=2), state, digester)
    assert actions(p) == {"hero:source": "cached", "hero:shape": "rerun", "hero:side": "cached",
                          "hero:summary": "rerun"}
    assert reasons(p, "hero:shape") == ["config value changed: 1 -> 2"]
    assert reasons(p, "hero:summary") == ["1 stage of this character run"]


@pytest.mark.parametrize("old,new,why", [
    ({"value": 1}, {"value": 1, "extra": True}, "config extra added (true)"),
    ({"value": 1, "extra": True}, {"value": 1}, "config extra removed (was true)"),
    ({"value": 1}, {"value": 1.0}, "config value changed: 1 -> 1.0"),  # the key spells them apart
    ({"value": {"a": [1]}}, {"value": {"a": [2]}}, "config value.a changed: [1] -> [2]"),
])
def test_each_config_difference_is_named(old, new, why):
    before, after = nodes_for(), nodes_for()
    before[1].config, after[1].config = {**old, "workers": 2}, {**new, "workers": 2}
    state, digester = applied(before)
    p = plan(after, state, digester)
    assert p.by_id("hero:shape").action == "rerun" and why in reasons(p, "hero:shape")


def test_an_unkeyed_setting_changes_no_key():
    state, digester = applied(nodes_for(workers=2))
    p = plan(nodes_for(workers=16), state, digester)
    assert set(actions(p).values()) == {"cached"}


def test_a_stage_version_bump_reruns_that_kind_and_its_dependents():
    state, digester = applied()
    p = plan(nodes_for(), state, digester, registry=fake_registry(shape=2))
    assert actions(p)["hero:shape"] == "rerun" and actions(p)["hero:side"] == "cached"
    assert reasons(p, "hero:shape") == ["stage version changed (1 -> 2)"]


def test_changing_a_value_back_uses_the_outputs_still_in_the_store():
    state, digester = applied(nodes_for(value=1))
    state.succeed(plan(nodes_for(value=2), state, digester))
    p = plan(nodes_for(value=1), state, digester)
    assert actions(p)["hero:shape"] == "cached"
    assert reasons(p, "hero:shape") == ["outputs for these inputs exist from an earlier run"]


def test_outputs_missing_from_the_store_rerun():
    state, digester = applied()
    state.stored.discard(plan(nodes_for(), state, digester).by_id("hero:side").key)
    p = plan(nodes_for(), state, digester)
    assert actions(p)["hero:side"] == "rerun" and reasons(p, "hero:side") == ["outputs missing from the store"]


def test_a_data_change_names_the_files():
    state, digester = applied()
    digester.files[PHOTOS / "hero"] = {"a.jpg": "1", "b.jpg": "changed", "new.jpg": "9"}
    p = plan(nodes_for(), state, digester)
    assert reasons(p, "hero:source") == ["input photos: files 1 added, 1 modified (b.jpg)"]
    assert {a for a in actions(p).values()} == {"rerun"}  # everything reads the photos
    del digester.files[PHOTOS / "hero"]["a.jpg"]
    state.listings.clear()  # without the old listing the reason still counts the files
    assert reasons(plan(nodes_for(), state, digester), "hero:source") == ["input photos: files changed (2 -> 2 files)"]


def test_forced_stages_rerun_and_new_forced_stages_run():
    state, digester = applied()
    p = plan(nodes_for(), state, digester, force=["side"])
    assert actions(p) == {"hero:source": "cached", "hero:shape": "cached", "hero:side": "rerun",
                          "hero:summary": "rerun"}
    assert reasons(p, "hero:side") == ["forced (--force)"]
    fresh = plan(nodes_for(), MemoryState(), digester, force=["hero:sha*"])
    assert fresh.by_id("hero:shape").action == "run" and reasons(fresh, "hero:shape") == ["forced (--force)"]


def test_a_stage_with_resumable_state_resumes(tmp_path):
    def resume_info(scratch: Path) -> str | None:
        step = scratch / "step"
        return f"resume at step {step.read_text()}" if step.is_file() else None

    registry = fake_registry()
    registry._kinds["shape"] = kind("shape", 1, 20, resume_info=resume_info)
    state, digester = MemoryState(scratch=tmp_path), MemoryDigester()
    key = plan(nodes_for(), state, digester, registry=registry).by_id("hero:shape").key
    (tmp_path / key).mkdir()
    (tmp_path / key / "step").write_text("120")
    p = plan(nodes_for(), state, digester, registry=registry)
    assert actions(p)["hero:shape"] == "resume"
    assert reasons(p, "hero:shape") == ["resume at step 120", "new stage"]
    forced = plan(nodes_for(), state, digester, registry=registry, force=["shape"])
    assert reasons(forced, "hero:shape") == ["resume at step 120", "forced (--force)"]


def test_a_summarizing_stage_reruns_with_its_character_only():
    nodes = nodes_for("hero") + nodes_for("villain")
    state, digester = applied(nodes)
    changed = nodes_for("hero", side="b") + nodes_for("villain")
    p = plan(changed, state, digester)
    assert actions(p)["hero:summary"] == "rerun" and actions(p)["villain:summary"] == "cached"
    assert reasons(p, "hero:summary") == ["1 stage of this character run"]
    assert [ps.id for ps in p.pending_work()] == ["hero:side"]  # a summary is no work of its own


def test_a_summarizing_stage_is_told_by_its_trait_not_its_name():
    registry = contract.Registry([kind("source", 1, 10), kind("shape", 1, 20), kind("side", 1, 30),
                                  kind("summary", 1, 100)])  # same kinds, no trait
    state, digester = applied(registry=registry)
    p = plan(nodes_for(side="b"), state, digester, registry=registry)
    assert actions(p)["hero:summary"] == "cached" and not any(ps.summarizes for ps in p.stages)
    assert [ps.id for ps in p.pending_work()] == ["hero:side"]


def test_only_plans_a_stage_and_what_it_needs():
    state, digester = applied()
    p = plan(nodes_for(value=5), state, digester, only=["hero:shape"])
    assert [ps.id for ps in p.stages] == ["hero:source", "hero:shape"]
    assert actions(p) == {"hero:source": "cached", "hero:shape": "rerun"}
    by_kind = plan(nodes_for() + nodes_for("villain"), MemoryState(), digester, only=["side"])
    assert [ps.id for ps in by_kind.stages] == ["hero:source", "hero:side", "villain:source", "villain:side"]
    by_glob = plan(nodes_for() + nodes_for("villain"), MemoryState(), digester, only=["villain:s*"])
    assert {ps.node.character for ps in by_glob.stages} == {"villain"}


def test_a_pattern_that_matches_nothing_says_what_there_is():
    with pytest.raises(KeyError, match="no stage matches 'nope'; stages are: hero:source, hero:shape"):
        plan(nodes_for(), MemoryState(), only=["nope"])
    with pytest.raises(KeyError, match="no stage matches 'x:\\*'"):
        plan(nodes_for(), MemoryState(), force=["x:*"])


def test_the_key_hashes_kind_version_keyed_config_and_input_digests():
    """What goes into a cache key, computed here independently of the planner."""
    digester = MemoryDigester()
    p = plan(nodes_for(), MemoryState(), digester)
    photos = digester.digest_fileset(contract.FileSetRef(root=PHOTOS / "hero"))

    def sha(obj: Any) -> str:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    source = sha({"kind": "source", "version": 1, "config": {"scale": 1},
                  "inputs": {"photos": {"files": 2, "digest": photos.digest}}})
    shape = sha({"kind": "shape", "version": 1, "config": {"value": 1},
                 "inputs": {"images": {"stage": "hero:source", "output": "images", "key": source}}})
    assert p.by_id("hero:source").key == source
    assert p.by_id("hero:shape").key == shape


def test_the_planner_looks_kinds_up_in_the_registry_it_is_given():
    with pytest.raises(KeyError, match="unknown stage kind 'side'"):
        plan(nodes_for(), MemoryState(), registry=contract.Registry([kind("source"), kind("shape"),
                                                                     kind("summary", summarizes=True)]))


def test_a_graph_of_nodes_is_checked():
    nodes = nodes_for()
    with pytest.raises(GraphError, match="duplicate stage id 'hero:shape'"):
        graph_of(nodes + [nodes[1]], {}, fake_registry())
    reads_missing = nodes_for()
    reads_missing[3].inputs["shape"] = contract.StageOutputRef("hero:shape", "other")
    with pytest.raises(GraphError, match="wants output 'other' of hero:shape, which only has out"):
        graph_of(reads_missing, {}, fake_registry())
    with pytest.raises(GraphError, match="refers to unknown stage 'hero:gone'"):
        graph_of(nodes_for()[:3] + [contract.PlanNode(id="hero:x", kind="side", character="hero", config={},
                                                       inputs={"a": contract.StageOutputRef("hero:gone", "out")})],
                 {}, fake_registry())
    cyclic = nodes_for()
    cyclic[0].after = ("hero:shape",)
    with pytest.raises(GraphError, match="stage cycle"):
        graph_of(cyclic, {}, fake_registry())


# --------------------------------------------------------------------------- scheduling


def test_the_scheduler_takes_stages_in_order_and_skips_the_dependents_of_a_failure():
    state, digester = applied()
    p = plan(nodes_for(value=2, side="b"), state, digester)  # source cached; shape, side, summary run
    s = Scheduler(p.stages)
    steps = []
    while (step := s.next()) is not None:
        steps.append((step.ps.id, step.how, step.why))
        if step.how == "local":
            s.finished(step.ps.id, "failed" if step.ps.id == "hero:shape" else "succeeded")
    assert steps == [("hero:source", "cached", ""), ("hero:shape", "local", ""), ("hero:side", "local", ""),
                     ("hero:summary", "skip", "upstream hero:shape failed")]


def test_the_scheduler_stops_after_a_failure_unless_told_to_keep_going():
    p = plan(nodes_for(), MemoryState())
    s = Scheduler(p.stages)
    s.finished(s.next().ps.id, "succeeded")  # source
    shape = s.next()
    s.finished(shape.ps.id, "failed")
    rest = [s.next(stop=True) for _ in range(2)]
    assert [(x.ps.id, x.how, x.why) for x in rest] == [
        ("hero:side", "skip", "not run: an earlier stage failed"),  # independent of shape, but stopped
        ("hero:summary", "skip", "upstream hero:shape failed")]
    assert s.next() is None and s.stranded() == []
    kept = Scheduler(p.stages)  # --keep-going: the independent branch still runs
    kept.finished(kept.next().ps.id, "succeeded")
    kept.finished(kept.next().ps.id, "failed")
    assert [(x.ps.id, x.how) for x in (kept.next(), kept.next())] == [("hero:side", "local"), ("hero:summary", "skip")]


def test_remote_stages_wait_for_a_slot_and_stages_wait_for_running_upstreams():
    p = plan(nodes_for(), MemoryState())
    s = Scheduler(p.stages, remote_ids=["hero:shape", "hero:side"])
    assert s.next().how == "local"  # source
    assert s.next() is None  # shape and side wait for source, which is running
    s.finished("hero:source", "succeeded")
    assert s.next(remote_slot=False) is None  # no free slot
    shape = s.next(remote_slot=True)
    side = s.next(remote_slot=True)
    assert (shape.ps.id, shape.how, side.ps.id, side.how) == ("hero:shape", "remote", "hero:side", "remote")
    assert s.next(remote_slot=True) is None  # the summary waits for both
    s.finished("hero:side", "succeeded")
    s.finished("hero:shape", "succeeded")
    assert s.next().ps.id == "hero:summary"


def test_many_inputs_added_are_counted_in_one_reason():
    """A report reading a ride day's thousand new videos says how many inputs came, naming three."""
    from runner.plan.planner import explain_change

    old = {"kind": "k", "version": 1, "config": {}, "inputs": {"a": {"stage": "x:a", "key": "1"}}}
    added = {f"v{i:04d}": {"stage": f"x:v[{i}]", "key": str(i)} for i in range(1000)}
    new = {**old, "inputs": {**old["inputs"], **added}}
    assert explain_change(old, new) == ["1000 inputs added (v0000, v0001, v0002 and 997 more)"]
    few = {**old, "inputs": {**old["inputs"], "v1": {"stage": "x:v1", "key": "1"}}}
    assert explain_change(old, few) == ["input v1 added"]
    assert explain_change(new, old) == ["1000 inputs removed (v0000, v0001, v0002 and 997 more)"]


def test_many_changed_inputs_name_three_and_count_the_rest():
    from runner.plan.planner import explain_change

    inputs = {f"v{i}": {"stage": f"x:v{i}", "key": "a"} for i in range(10)}
    old = {"kind": "k", "version": 1, "config": {}, "inputs": inputs}
    new = {**old, "inputs": {f"v{i}": {"stage": f"x:v{i}", "key": "b"} for i in range(10)}}
    assert explain_change(old, new) == ["input v0: x:v0 changed", "input v1: x:v1 changed", "input v2: x:v2 changed",
                                        "and 7 more inputs changed"]
    four = {**old, "inputs": {**old["inputs"], **{f"v{i}": {"stage": f"x:v{i}", "key": "b"} for i in range(4)}}}
    assert len(explain_change(old, four)) == 4  # four are named: a count line would save nothing
