"""The StageContext a running stage gets (also usable directly in tests and notebooks).

It lives with the backends, not the engine, because both sides construct one: the engine opens
one per stage execution in this process, and the worker (:mod:`runner.backends.worker`) opens one
next to the volume for a remote stage. Backends sit below the engine (docs/architecture.md,
layers), so the engine imports it from here and nothing in ``runner.backends`` imports
``runner.engine``. It needs nothing but the standard library.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol


class Reporter(Protocol):
    """Receives progress and log events (the CLI renders them with rich or plain lines)."""

    def progress(self, stage_id: str, desc: str, completed: int, total: int | None) -> None: ...

    def log(self, stage_id: str, level: str, message: str) -> None: ...


class NullReporter:
    def progress(self, stage_id: str, desc: str, completed: int, total: int | None) -> None:
        pass

    def log(self, stage_id: str, level: str, message: str) -> None:
        pass


class _Progress:
    def __init__(self, ctx: "LocalStageContext", total: int | None, desc: str) -> None:
        self.ctx = ctx
        self.total = total
        self.desc = desc
        self.completed = 0
        self._last_log = 0.0
        ctx.reporter.progress(ctx.stage_id, desc, 0, total)

    def update(self, advance: int = 1, **fields: Any) -> None:
        self.completed += advance
        self.ctx.reporter.progress(self.ctx.stage_id, self.desc, self.completed, self.total)
        now = time.monotonic()
        if now - self._last_log > 5.0:  # the structured log gets a line every few seconds
            self._last_log = now
            self.ctx._write({"event": "progress", "desc": self.desc, "completed": self.completed,
                             "total": self.total, **fields})

    def close(self) -> None:
        self.ctx._write({"event": "progress", "desc": self.desc, "completed": self.completed,
                         "total": self.total, "done": True})


class LocalStageContext:
    """Implements :class:`runner.core.contract.StageContext`.

    Everything a stage reports goes to one JSONL log per stage execution (``log_file``) and to the
    reporter; metrics are also kept in ``self.metrics`` (last value per name) for the state db.
    """

    def __init__(
        self,
        *,
        stage_id: str,
        character: str,
        out_dir: Path,
        scratch_dir: Path,
        cache_dir: Path,
        project_root: Path,
        run_id: str = "test",
        log_file: Path | None = None,
        reporter: Reporter | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.stage_id = stage_id
        self.character = character
        self.out_dir = out_dir
        self.scratch_dir = scratch_dir
        self.cache_dir = cache_dir
        self.project_root = project_root
        self.run_id = run_id
        self.log_file = log_file
        self.reporter: Reporter = reporter or NullReporter()
        self.metrics: dict[str, float] = {}
        self.metric_history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        # Run-level facts a few stages need (the report's timeline); not part of any cache key.
        self.extra: dict[str, Any] = extra or {}
        self._lock = threading.Lock()
        # Runs ctx.map_items over containers (runner.backends.mapping.VolumeMapper): set by the
        # remote worker; None here, where the items are mapped in this process.
        self.mapper: Callable[..., Iterator[dict[str, Any]]] | None = None
        for d in (out_dir, scratch_dir, cache_dir):
            d.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_folder(cls, root: Path, *, stage_id: str = "test:stage", character: str = "test",
                   project_root: Path | None = None) -> "LocalStageContext":
        """A context whose folders live under ``root`` (for tests and notebooks)."""
        return cls(
            stage_id=stage_id,
            character=character,
            out_dir=root / "out",
            scratch_dir=root / "scratch",
            cache_dir=root / "cache",
            project_root=project_root or root,
            log_file=root / "stage.log.jsonl",
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self.log_file is None:
            return
        record = {"t": round(time.time(), 3), "stage": self.stage_id, **record}
        line = json.dumps(record, default=str)
        with self._lock:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def progress(self, total: int | None, desc: str) -> _Progress:
        return _Progress(self, total, desc)

    def log(self, message: str, **fields: Any) -> None:
        self._write({"event": "log", "level": "info", "message": message, **fields})
        self.reporter.log(self.stage_id, "info", message)

    def warn(self, message: str, **fields: Any) -> None:
        self.warnings.append(message)
        self._write({"event": "log", "level": "warning", "message": message, **fields})
        self.reporter.log(self.stage_id, "warning", message)

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        value = float(value)
        self.metrics[name] = value
        entry = {"name": name, "value": value, "step": step}
        self.metric_history.append(entry)
        self._write({"event": "metric", **entry})

    def map_items(self, fn: str, items: list[dict[str, Any]], shared: dict[str, Any], *,
                  containers: int | None = None) -> Iterator[dict[str, Any]]:
        """``fn`` over ``items``, results in input order (runner.core.contract.StageContext): over
        ``containers`` containers where the remote worker set a mapper, else in this process."""
        from runner.backends.mapping import run_here

        wanted = int(containers or 1)
        if self.mapper is not None and wanted > 1 and len(items) > 1:
            return self.mapper(self, fn, items, shared, wanted)
        if wanted > 1:
            self.log(f"hardware.stage_map: {wanted} containers apply when the stage runs on Modal "
                     "(hardware.stage_backend); here the items are mapped in this process",
                     map_containers=1)
        return run_here(fn, items, shared)
