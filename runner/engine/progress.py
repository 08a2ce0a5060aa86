"""How an apply shows its progress: rich bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class PlainReporter:
    """One line per event; progress lines at most every 10% or 10 s per task."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._last: dict[tuple[str, str], tuple[float, float]] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def stage_started(self, stage_id: str, action: str, reason: str) -> None:
        self._print(f"[{stage_id}] {action}: {reason}")

    def stage_finished(self, stage_id: str, status: str, duration: float, note: str = "") -> None:
        self._print(f"[{stage_id}] {status} in {duration:.1f}s" + (f" ({note})" if note else ""))

    def progress(self, stage_id: str, desc: str, completed: int, total: int | None) -> None:
        now = time.monotonic()
        frac = (completed / total) if total else 0.0
        last_t, last_f = self._last.get((stage_id, desc), (0.0, -1.0))
        done = bool(total) and completed >= (total or 0)
        if done or frac - last_f >= 0.1 or now - last_t >= 10.0:
            self._last[(stage_id, desc)] = (now, frac)
            of = f"/{total}" if total else ""
            self._print(f"[{stage_id}] {desc}: {completed}{of}")

    def log(self, stage_id: str, level: str, message: str) -> None:
        prefix = "warning: " if level == "warning" else ""
        self._print(f"[{stage_id}] {prefix}{message}")

    def close(self) -> None:
        pass


class RichReporter(PlainReporter):
    """Progress bars with rich; stage start/finish lines are printed above them."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=self.stream)
        self.bars = Progress(
            TextColumn("[bold]{task.fields[stage]}[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.bars.start()
        self._tasks: dict[tuple[str, str], Any] = {}

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def progress(self, stage_id: str, desc: str, completed: int, total: int | None) -> None:
        k = (stage_id, desc)
        if k not in self._tasks:
            self._tasks[k] = self.bars.add_task(desc, total=total, stage=stage_id)
        self.bars.update(self._tasks[k], completed=completed, total=total)
        if total and completed >= total:
            self.bars.remove_task(self._tasks.pop(k))

    def stage_finished(self, stage_id: str, status: str, duration: float, note: str = "") -> None:
        for k in [k for k in self._tasks if k[0] == stage_id]:
            self.bars.remove_task(self._tasks.pop(k))
        super().stage_finished(stage_id, status, duration, note)

    def close(self) -> None:
        self.bars.stop()


def make_reporter(stream: TextIO | None = None, *, quiet: bool = False) -> PlainReporter:
    stream = stream or sys.stderr
    if quiet:
        return QuietReporter(stream)
    if getattr(stream, "isatty", lambda: False)():
        return RichReporter(stream)
    return PlainReporter(stream)


class QuietReporter(PlainReporter):
    def stage_started(self, stage_id: str, action: str, reason: str) -> None:
        pass

    def progress(self, stage_id: str, desc: str, completed: int, total: int | None) -> None:
        pass

    def log(self, stage_id: str, level: str, message: str) -> None:
        if level == "warning":
            super().log(stage_id, level, message)
