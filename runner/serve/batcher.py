"""A bounded queue in front of one pipeline, batching compatible requests into one call.

Requests wait in a FIFO of at most ``max_queue`` entries (a request that finds it full is
refused at once: the API answers 429). One worker thread takes the oldest request and, with it,
the next waiting requests that have the same :meth:`batch_key` (same size, steps, guidance,
negative prompt, LoRA scale) up to ``max_batch``; requests with other parameters keep their place.
After the first request of an idle period arrives, the worker waits ``batch_window_s`` for others
to join it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} requests are waiting (generate.api.max_queue is {limit}); retry later")
        self.waiting = waiting
        self.limit = limit


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0
    refused: int = 0
    sizes: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"batches": self.batches, "jobs": self.jobs, "largest_batch": self.largest_batch,
                "busy_s": round(self.busy_s, 3), "refused": self.refused}


@dataclass
class _Entry:
    job: Any
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchResult:
    value: Any
    batch_size: int
    queued_s: float
    run_s: float


class Batcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], *, max_queue: int, max_batch: int,
                 batch_window_s: float = 0.02) -> None:
        self.run_batch = run_batch
        self.max_queue = int(max_queue)
        self.max_batch = int(max_batch)
        self.batch_window_s = batch_window_s
        self.stats = BatchStats()
        self._pending: collections.deque[_Entry] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for e in self._pending:
            if not e.future.done():
                e.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Any) -> asyncio.Future:
        """Queue ``job``; raises :class:`QueueFull` at once when the queue is full."""
        if len(self._pending) >= self.max_queue:
            self.stats.refused += 1
            raise QueueFull(len(self._pending), self.max_queue)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Entry(job, fut, time.monotonic()))
        assert self._wake is not None, "Batcher.start() was not called"
        self._wake.set()
        return fut

    def _take_batch(self) -> list[_Entry]:
        first = self._pending.popleft()
        batch = [first]
        key = first.job.batch_key()
        keep = []
        while self._pending and len(batch) < self.max_batch:
            e = self._pending.popleft()
            (batch if e.job.batch_key() == key else keep).append(e)
        self._pending.extendleft(reversed(keep))
        return [e for e in batch if not e.future.cancelled()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending and self.batch_window_s > 0:
                await asyncio.sleep(self.batch_window_s)  # let concurrent requests join
            while self._pending:
                batch = self._take_batch()
                if not batch:
                    continue
                t0 = time.monotonic()
                self.running = len(batch)
                try:
                    values = await loop.run_in_executor(self._pool, self.run_batch, [e.job for e in batch])
                    error = None
                except Exception as exc:  # handed to every request of the batch
                    values, error = None, exc
                finally:
                    self.running = 0
                run_s = time.monotonic() - t0
                self.stats.batches += 1
                self.stats.jobs += len(batch)
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
                self.stats.busy_s += run_s
                for i, e in enumerate(batch):
                    if e.future.done():
                        continue
                    if error is not None:
                        e.future.set_exception(error)
                    else:
                        e.future.set_result(BatchResult(values[i], len(batch), t0 - e.enqueued, run_s))
