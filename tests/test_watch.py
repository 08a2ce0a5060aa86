"""`runner watch`: the polling loop (runner.engine.watch) driven in process by a fake clock, with
the real executor applying the real ingest stage to real photos; then the command itself."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.engine.executor import ApplyOptions, apply
from runner.engine.progress import PlainReporter
from runner.engine.watch import Clock, Root, Watch, WatchSettings, describe_change, signature, watched_roots
from runner.spec import load_specs

REPO = Path(__file__).resolve().parents[1]
SPEC = """\
version: 1
character:
  name: {name}
  trigger: {name}chr
  class_word: man
dataset:
  sources:
    - images: ../photos/{name}
  ingest: {{max_side: 512}}
"""


@pytest.fixture()
def watched(project: Path, shared_data: Path, monkeypatch) -> Path:
    """Two specs, each reading its own folder of one real photo."""
    for name in ("hero", "sidekick"):
        (project / "photos" / name).mkdir(parents=True)
        shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", project / "photos" / name)
        (project / "specs" / f"{name}.yaml").write_text(SPEC.format(name=name))
    monkeypatch.chdir(project)
    return project


class FakeClock(Clock):
    """Time moves only when the loop sleeps; ``events`` (time, action) happen as it passes them;
    at ``stop_at`` the sleep raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, events: list, stop_at: float) -> None:
        self.t, self.stop_at = 0.0, stop_at
        self.events = sorted(events, key=lambda e: e[0])
        super().__init__(now=lambda: self.t, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        self.t += seconds
        while self.events and self.events[0][0] <= self.t:
            self.events.pop(0)[1]()
        if self.t >= self.stop_at:
            raise KeyboardInterrupt


class Harness:
    """A Watch over specs/ whose applies are the executor's (ingest only), recorded with their time."""

    def __init__(self, clock: FakeClock, interval: float = 5, settle: float = 10) -> None:
        self.clock, self.lines, self.applied, self.results = clock, [], [], []
        self.watch = Watch(["specs"], self.apply_once, WatchSettings(interval, settle), clock=clock,
                           echo=lambda text, err=False: self.lines.append(text))

    def apply_once(self, on_plan):
        self.applied.append(self.clock.now())
        specs = load_specs(["specs"])  # a spec error raises here, as in `runner apply`
        result = apply(specs, ApplyOptions(only=["ingest"], command="test"), PlainReporter(io.StringIO()),
                       on_plan=on_plan)
        self.results.append(result)
        return result

    def ran(self, k: int) -> list[str]:
        return sorted(r.stage_id for r in self.results[k].results if r.status == "succeeded")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def copy_in(project: Path, shared_data: Path, name: str, who: str = "hero"):
    return lambda: shutil.copy(shared_data / "faces" / "obama" / name, project / "photos" / who / name)


def test_a_new_photo_triggers_one_apply_after_settling(watched, shared_data):
    h = Harness(FakeClock([(7, copy_in(watched, shared_data, "obama_240p.jpg"))], stop_at=60))
    assert h.watch.run() == 2
    # polls at 5 and 10 (the photo is seen), unchanged at 15 and 20: applied at 20, once
    assert h.applied == [0, 20]
    assert h.ran(0) == ["hero:ingest", "sidekick:ingest"] and h.ran(1) == ["hero:ingest"]
    assert "change: photos/hero (1 added); applying once it is unchanged for 10s" in h.output
    assert h.output.endswith("watch stopped (Ctrl-C) after 2 apply(s)")


def test_a_file_still_growing_delays_the_apply(watched, shared_data):
    data = (shared_data / "faces" / "obama" / "obama_02.jpg").read_bytes()
    part = watched / "photos" / "hero" / "obama_02.jpg"
    quarter = len(data) // 4

    def grow(k: int):
        return lambda: part.write_bytes(data[: quarter * k] if k < 4 else data)

    h = Harness(FakeClock([(7, grow(1)), (12, grow(2)), (17, grow(3)), (22, grow(4))], stop_at=60))
    h.watch.run()
    # seen at 10, still changing at 15, 20 and 25, unchanged at 30 and 35
    assert h.applied == [0, 35]
    ingest = h.results[1].plan.by_id("hero:ingest")
    assert ingest.action == "rerun"
    listing = dict(next(iter(ingest.fileset_digests.values())).files)
    assert sorted(listing) == ["obama_02.jpg", "obama_small.jpg"]
    assert listing["obama_02.jpg"] == hashlib.sha256(data).hexdigest()  # applied to the whole file
    assert h.output.count("change:") == 1


def test_a_spec_broken_mid_watch_is_reported_and_the_watch_goes_on(watched):
    spec = watched / "specs" / "hero.yaml"
    text = spec.read_text()

    def write(body: str):
        return lambda: spec.write_text(body)

    h = Harness(FakeClock([(7, write(text.replace("max_side: 512", "max_side: big"))),
                           (27, write(text.replace("max_side: 512", "max_side: 256")))], stop_at=50))
    assert h.watch.run() == 3
    assert h.applied == [0, 20, 40]
    assert len(h.results) == 2  # the apply at 20 was refused before anything ran
    assert "specs/hero.yaml:9:" in h.output and "max_side" in h.output
    assert "apply refused; the watch goes on and applies on the next change" in h.output
    assert h.ran(1) == ["hero:ingest"]
    assert h.results[1].plan.by_id("hero:ingest").reasons == ["config max_side changed: 512 -> 256"]


def test_files_arriving_during_an_apply_are_seen_next(watched, shared_data):
    clock = FakeClock([], stop_at=40)
    h = Harness(clock, interval=5, settle=5)
    first = h.apply_once

    def slow_apply(on_plan):  # a photo lands while the first apply runs (after its plan)
        result = first(on_plan)
        if len(h.applied) == 1:
            copy_in(watched, shared_data, "obama_240p.jpg", "sidekick")()
        return result

    h.watch.apply_fn = slow_apply
    h.watch.run()
    assert h.applied == [0, 10] and h.ran(1) == ["sidekick:ingest"]


def test_a_locked_workspace_keeps_the_change_pending(watched, shared_data):
    from contextlib import ExitStack

    from runner.engine.lock import workspace_lock

    held = ExitStack()  # another apply holds the workspace from 7 to 27 (the refusal waits 1 s for it)

    def lock():
        held.enter_context(workspace_lock(watched / ".runner", command="runner apply (someone else)"))
        copy_in(watched, shared_data, "obama_240p.jpg")()

    h = Harness(FakeClock([(7, lock), (27, held.close)], stop_at=60))
    assert h.watch.run() == 3
    assert h.applied == [0, 20, 35]  # refused at 20; seen again at 25, applied once free
    assert "locked by pid" in h.output and "the workspace is busy; the watch tries again once it is free" in h.output
    assert len(h.results) == 2 and h.ran(1) == ["hero:ingest"]


def test_stops_after_max_applies_and_a_change_undone_applies_nothing(watched, shared_data):
    extra = watched / "photos" / "hero" / "obama_240p.jpg"
    clock = FakeClock([(7, copy_in(watched, shared_data, "obama_240p.jpg")), (12, extra.unlink),
                       (30, copy_in(watched, shared_data, "obama_240p.jpg"))], stop_at=1000)
    h = Harness(clock)
    h.watch.settings = WatchSettings(5, 10, max_applies=2)
    assert h.watch.run() == 2
    assert h.applied == [0, 40] and "everything is back as it was: nothing to apply" in h.output
    assert "Ctrl-C" not in h.output.splitlines()[-1]


def test_what_is_watched(watched):
    (watched / "photos" / "hero" / ".partial.jpg").write_bytes(b"x")  # hidden: a copy in progress
    plan = apply(load_specs(["specs"]), ApplyOptions(only=["ingest"], command="test"),
                 PlainReporter(io.StringIO())).plan
    roots = watched_roots(["specs"], plan)
    assert sorted(str(r.path.relative_to(watched)) for r in roots) == ["photos/hero", "photos/sidekick", "specs"]
    assert Root(watched / "specs", recursive=False) in roots  # the review files live in it
    before = signature(roots)
    assert [e[0] for e in before[Root(watched / "photos" / "hero")]] == ["obama_small.jpg"]
    (watched / "specs" / "villain.yaml").write_text(SPEC.format(name="villain"))
    assert describe_change(before, signature(roots)) == "specs (1 added)"


@pytest.mark.parametrize("source", ["../rides", "../rides/*/*.mp4"])
def test_an_empty_video_folder_is_watched_before_any_stage_reads_it(watched, shared_data, source):
    """The post-ride case: the spec names the ride's folder (or a glob in it) before its videos
    are copied in; a glob's folder is walked whole."""
    from runner.engine.executor import plan_specs

    (watched / "rides" / "day1").mkdir(parents=True)
    spec = watched / "specs" / "hero.yaml"
    spec.write_text(spec.read_text().replace("    - images: ../photos/hero\n",
                                             f"    - images: ../photos/hero\n    - video: {source}\n"))
    plan, ws = plan_specs(load_specs(["specs"]))
    ws.close()
    assert not any(n.kind.startswith("video") for n in plan.graph.nodes.values())  # nothing reads it yet
    roots = watched_roots(["specs"], plan)
    assert Root(watched / "rides", recursive=True) in roots
    before = signature(roots)
    shutil.copy(shared_data / "video" / "carphone.mp4", watched / "rides" / "day1")
    assert describe_change(before, signature(roots)) == "rides (1 added)"


def runner_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", *args]


def test_the_command_applies_once_and_exits_0(watched):
    r = subprocess.run(runner_cmd("watch", "specs/", "--only", "ingest", "-q", "--max-applies", "1"),
                       cwd=watched, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Apply complete: 2 succeeded" in r.stdout and "Traceback" not in r.stderr


def test_ctrl_c_stops_the_command_with_exit_0(watched):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(runner_cmd("watch", "specs/", "--only", "ingest", "-q", "--interval", "0.2"),
                            cwd=watched, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("watching "):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(seen) + out + err
    assert "watch stopped (Ctrl-C) after 1 apply(s)" in out and "Traceback" not in err
