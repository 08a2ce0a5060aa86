"""Remote fan-out: remote stages on Modal (GPU stages, and CPU stages sent there by
hardware.stage_backend), or on a stand-in transport, run in a thread pool, up to
``hardware.modal.max_parallel`` at once.

A worker thread only uploads, calls and downloads into the stage's tmp folder
(:func:`runner.engine.run_one.run_body`); the apply's main thread promotes and records, so a
failure in one remote stage never loses the results of the others.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from runner.core import contract
from runner.engine.cost import stage_gpu
from runner.engine.request import ApplyError, ApplyOptions
from runner.engine.run_one import Outcome, Running, run_body
from runner.engine.workspace import Workspace
from runner.plan.graph import Graph


class LockedReporter:
    """Serializes reporter calls when stages run in threads (rich is not thread-safe)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


class RemoteFanout:
    """The remote backend of one apply, its session (for Modal: the running app) and the pool of
    threads that call it. Open with :meth:`start`, end with :meth:`close`."""

    def __init__(self, backend: Any, max_parallel: int, reporter: Any) -> None:
        self.backend = backend
        self.max_parallel = max_parallel
        self.reporter = LockedReporter(reporter)
        self.running: dict[Future, Running] = {}
        self._session: Any = None
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def start(cls, graph: Graph, ws: Workspace, options: ApplyOptions, remote_ids: list[str],
              reporter: Any) -> "RemoteFanout":
        """Declare the backend and enter its session before the run starts: a Modal app that
        cannot be built or started fails the apply cleanly (ApplyError)."""
        fan = cls(remote_backend(graph, ws, options, remote_ids), max_parallel(graph, options), reporter)
        if getattr(fan.backend.transport, "name", "") == "modal":
            reporter.log("modal", "info", f"starting the Modal app for {len(remote_ids)} remote stage(s) "
                         "(the first run builds the image: a few minutes)")
        session = fan.backend.session()
        try:
            session.__enter__()  # for Modal: app.run() (builds the image the first time)
        except Exception as exc:
            raise ApplyError(f"could not start the Modal app for the remote stages: {type(exc).__name__}: {exc}",
                             hint="check `modal token new` / `modal profile current`, or run with --backend local"
                             ) from None
        fan._session = session
        fan._pool = ThreadPoolExecutor(max_workers=fan.max_parallel, thread_name_prefix="remote-stage")
        return fan

    @property
    def has_slot(self) -> bool:
        return len(self.running) < self.max_parallel

    def submit(self, r: Running) -> None:
        assert self._pool is not None
        self.running[self._pool.submit(run_body, r)] = r

    def wait(self) -> list[tuple[Running, Outcome]]:
        """Block until at least one running stage ends; its (running stage, outcome) pairs."""
        finished, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
        return [(self.running.pop(fut), fut.result()) for fut in finished]

    def cancel(self) -> list[Running]:
        """Cancel every call in flight (Ctrl-C); returns the stages that were running."""
        self.backend.cancel_all()
        stages = list(self.running.values())
        self.running.clear()
        return stages

    def close(self, interrupted: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not interrupted, cancel_futures=True)
        if self._session is not None:
            try:
                self._session.__exit__(None, None, None)
            except Exception:  # leaving the Modal app can fail on a lost connection; results are in
                pass


def remote_backend(graph: Graph, ws: Workspace, options: ApplyOptions, remote_ids: list[str]) -> Any:
    """``options.remote`` (a backend, or a transport wrapped in one), else Modal's."""
    from runner.backends.remote import RemoteBackend

    def gpu_of(node: contract.PlanNode) -> str | None:
        return stage_gpu(node, graph.specs[node.character].data.get("hardware", {}), "modal")

    if options.remote is not None:
        r = options.remote
        return r if hasattr(r, "run_stage") else RemoteBackend(r, ws.dir, gpu_of)
    from runner.backends.modal_backend import ModalTransport, ModalUnavailable, build_stage_app

    try:
        stage_app = build_stage_app(graph, [graph.nodes[i] for i in remote_ids])
    except ModalUnavailable as exc:
        raise ApplyError(str(exc)) from None
    except Exception as exc:  # the SDK rejected a setting (a GPU name, a timeout...)
        raise ApplyError(f"the Modal app for the remote stages could not be declared: {type(exc).__name__}: {exc} "
                         "(check hardware.gpu, hardware.stage_gpu, hardware.cpu, hardware.stage_cpu and "
                         "hardware.modal)") from None
    return RemoteBackend(ModalTransport(stage_app), ws.dir, gpu_of)


def max_parallel(graph: Graph, options: ApplyOptions) -> int:
    if options.max_parallel:
        return max(1, int(options.max_parallel))
    values = [int(((s.data.get("hardware", {}).get("modal") or {}).get("max_parallel", 4)))
              for s in graph.specs.values()]
    return max(1, min(values or [4]))
