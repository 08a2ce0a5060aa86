"""Progress: rich bars on a terminal, plain lines otherwise; one structured log per execution."""

from __future__ import annotations

import io
import json

from runner.backends.context import LocalStageContext
from runner.engine.progress import PlainReporter, RichReporter, make_reporter


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reporter_choice_follows_the_terminal():
    assert type(make_reporter(io.StringIO())) is PlainReporter
    r = make_reporter(TTY())
    assert isinstance(r, RichReporter)
    r.close()


def test_plain_lines_are_throttled():
    out = io.StringIO()
    rep = PlainReporter(out)
    rep.stage_started("demo:ingest", "run", "new stage")
    for i in range(1, 1001):
        rep.progress("demo:ingest", "images", i, 1000)
    rep.stage_finished("demo:ingest", "succeeded", 1.5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[demo:ingest] run: new stage"
    assert lines[-1] == "[demo:ingest] succeeded in 1.5s"
    progress = [line for line in lines if "images:" in line]
    assert 5 <= len(progress) <= 12  # every 10%, not 1000 lines
    assert progress[-1] == "[demo:ingest] images: 1000/1000"


def test_rich_reporter_draws_bars_on_a_terminal():
    out = TTY()
    rep = RichReporter(out)
    rep.stage_started("demo:train", "run", "new stage")
    for i in range(1, 11):
        rep.progress("demo:train", "steps", i, 10)
    rep.stage_finished("demo:train", "succeeded", 2.0)
    rep.close()
    text = out.getvalue()
    assert "demo:train" in text and "succeeded in 2.0s" in text


def test_structured_log_per_stage(tmp_path):
    ctx = LocalStageContext.for_folder(tmp_path, stage_id="demo:x")
    p = ctx.progress(3, "items")
    for _ in range(3):
        p.update()
    p.close()
    ctx.log("hello", n=1)
    ctx.warn("careful")
    ctx.metric("loss", 0.5, step=3)
    records = [json.loads(line) for line in (tmp_path / "stage.log.jsonl").read_text().splitlines()]
    events = [(r["event"], r.get("level")) for r in records]
    assert ("log", "info") in events and ("log", "warning") in events and ("metric", None) in events
    assert all(r["stage"] == "demo:x" and "t" in r for r in records)
    assert ctx.metrics == {"loss": 0.5} and ctx.warnings == ["careful"]
