"""The Modal app built from specs: one Modal function per remote stage kind (and GPU type, or CPU
container for a CPU stage sent there by hardware.stage_backend), an image
built from the package's own pinned requirements, a Volume for the artifact store and the model
cache, secrets from ``modal.Secret.from_name``, ``modal.Retries`` and a timeout from the spec.

Nothing here contacts Modal until a call is made: :func:`build_stage_app` only declares objects
(tests inspect them through ``modal.Function.info()``), and :func:`require_credentials` checks the
token without importing the SDK or touching the network, so ``apply --backend modal`` without a
token fails at once.

Every stage function runs the same body, :func:`modal_stage_entry`, which calls
:func:`runner.backends.worker.run_stage_in_volume` with the Volume mounted at ``/vol``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from runner.core import contract
from runner.core.errors import UserError
from runner.core.pricing import remote_cpu, remote_gpu, stage_backend

VOLUME_MOUNT = "/vol"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PACKAGE_DIR.parent
# Extras a remote stage needs (train, evaluate, storyboard, video) and the serving app.
REMOTE_EXTRAS = ("train", "faces", "video", "generate", "serve")
DEFAULTS = {"volume": "character-runner-store", "secrets": [], "timeout_s": 14400, "retries": 2,
            "max_parallel": 4, "app_name": None}


class ModalUnavailable(UserError):
    """Modal cannot be used from here (no credentials, no SDK); the message says what to do.
    Exit 2: the request cannot be carried out as given (like `runner deploy` without a token)."""

    exit_code = 2


# ----------------------------------------------------------------------------- credentials


def credentials_source() -> str | None:
    """Where Modal credentials would come from, or None. Mirrors the SDK's lookup (environment,
    then the active profile of ~/.modal.toml) without importing it or using the network."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"
    path = Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml").expanduser()
    if not path.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            return f"{path} (not parsed)"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    profiles = {k: v for k, v in data.items() if isinstance(v, dict)}
    wanted = os.environ.get("MODAL_PROFILE")
    if wanted:
        prof = profiles.get(wanted)
    else:
        active = [v for v in profiles.values() if v.get("active")]
        prof = active[0] if active else (next(iter(profiles.values())) if len(profiles) == 1 else None)
    if prof and prof.get("token_id") and prof.get("token_secret"):
        return str(path)
    return None


def require_credentials(what: str = "hardware.backend: modal") -> str:
    src = credentials_source()
    if src is None:
        raise ModalUnavailable(
            f"{what} needs Modal credentials, and none were found (no MODAL_TOKEN_ID/MODAL_TOKEN_SECRET "
            "in the environment, no token in ~/.modal.toml). Run `modal token new` (or set both "
            "variables), or run with --backend local. `runner plan` works without them."
        )
    try:
        import modal  # noqa: F401
    except ImportError:
        raise ModalUnavailable(
            f"{what} needs the modal package: pip install 'character-runner[modal]'"
        ) from None
    return src


# ----------------------------------------------------------------------------- settings


def modal_settings(hardware: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULTS, **((hardware or {}).get("modal") or {})}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pinned_requirements(extras: tuple[str, ...] = REMOTE_EXTRAS) -> list[str]:
    """The package's requirements (core + ``extras``), each pinned: to constraints.txt in a
    source checkout, else to the version installed here (what local runs use)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    constraints = REPO_DIR / "constraints.txt"
    if constraints.is_file():
        for line in constraints.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                pins[_norm(name)] = ver.strip()
    names: dict[str, None] = {}
    for raw in md.requires("character-runner") or []:
        req = Requirement(raw)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        names.setdefault(req.name, None)
    out = []
    for name in names:
        ver = pins.get(_norm(name))
        if ver is None:
            try:
                ver = md.version(name)
            except md.PackageNotFoundError:
                ver = None
        out.append(f"{name}=={ver}" if ver else name)
    return sorted(out, key=str.lower)


def _insightface_pin() -> str:
    import importlib.metadata as md

    try:
        return f"insightface=={md.version('insightface')}"
    except md.PackageNotFoundError:
        return "insightface==2.1"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_image(python_version: str | None = None):
    """debian_slim + the pinned requirements + this package (source, presets, schemas, templates)."""
    import modal

    py = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    ignore = ["**/__pycache__", "**/*.pyc", "**/.*"]
    image = (
        modal.Image.debian_slim(python_version=py)
        .apt_install("libgl1", "libglib2.0-0", "ffmpeg")
        .pip_install(*pinned_requirements())
        # as in the README: insightface's wheel wants the GUI OpenCV, so it goes in without deps
        .pip_install(_insightface_pin(), extra_options="--no-deps")
        .env({"CHARACTER_RUNNER_CACHE": f"{VOLUME_MOUNT}/cache", "HF_HOME": f"{VOLUME_MOUNT}/cache/hf",
              "TORCH_HOME": f"{VOLUME_MOUNT}/cache/torch", "PYTHONUNBUFFERED": "1"})
        .add_local_dir(PACKAGE_DIR, "/root/runner", ignore=ignore)
    )
    for res in ("schemas", "templates"):
        if (REPO_DIR / res).is_dir():
            image = image.add_local_dir(REPO_DIR / res, f"/root/{res}", ignore=ignore)
    return image


# ----------------------------------------------------------------------------- the function body


def modal_stage_entry(kind: str, config: dict[str, Any], manifest: dict[str, Any], volume_name: str,
                      map_fn: Any = None) -> dict[str, Any]:
    """Body of every stage function, run in the Modal container. ``map_fn`` (the stage's map
    function, hydrated by the client's app and passed as an argument) runs the stage's
    ``ctx.map_items`` over containers (hardware.stage_map)."""
    from runner.backends.worker import run_stage_in_volume

    vol = _reloaded(volume_name)
    launcher = None if map_fn is None else _ModalMapLauncher(map_fn, volume_name)
    return run_stage_in_volume(kind, config, manifest, VOLUME_MOUNT, commit=vol.commit, launcher=launcher,
                               volume_files=(lambda rel, dest: _read_file(vol, rel, dest),
                                             lambda rel: vol.remove_file("/" + rel, recursive=True)))


def modal_map_entry(request: dict[str, Any], volume_name: str) -> dict[str, Any]:
    """Body of every map function: one chunk of a stage's map (runner.backends.mapping)."""
    from runner.backends.mapping import run_chunk_in_volume

    vol = _reloaded(volume_name)
    return run_chunk_in_volume(request, VOLUME_MOUNT, commit=vol.commit)


def _reloaded(volume_name: str) -> Any:
    import modal

    vol = modal.Volume.from_name(volume_name)
    try:
        vol.reload()  # see the inputs the client uploaded after this container started
    except Exception:
        pass
    return vol


def _read_file(vol: Any, rel: str, dest: Path) -> None:
    """A file of the volume through the SDK, which sees what other containers committed (the
    mount shows it only after a reload, which the stage's open files can refuse)."""
    from runner.core.fs import atomic_path

    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        vol.read_file_into_fileobj("/" + rel, fh)


class _ModalMapLauncher:
    """Chunk requests through ``map_fn.map``: one input per chunk, retried each on its own by the
    function's modal.Retries, results in input order."""

    def __init__(self, map_fn: Any, volume_name: str) -> None:
        self.map_fn = map_fn
        self.volume_name = volume_name

    def __call__(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from self.map_fn.map(requests, kwargs={"volume_name": self.volume_name}, order_outputs=True)


def _entry_named(name: str):
    def entry(kind: str, config: dict[str, Any], manifest: dict[str, Any], volume_name: str,
              map_fn: Any = None) -> dict[str, Any]:
        return modal_stage_entry(kind, config, manifest, volume_name, map_fn)

    entry.__name__ = entry.__qualname__ = name
    return entry


def _map_entry_named(name: str):
    def entry(request: dict[str, Any], volume_name: str) -> dict[str, Any]:
        return modal_map_entry(request, volume_name)

    entry.__name__ = entry.__qualname__ = name
    return entry


# ----------------------------------------------------------------------------- the app


@dataclass
class StageFunction:
    name: str
    kind: str
    gpu: str | None  # the GPU setting, or a CPU container's label (runner.core.pricing.cpu_label)
    timeout_s: int
    retries: int
    function: Any  # modal.Function
    map_function: Any = None  # the function of its per-item map (hardware.stage_map), or None


@dataclass
class ModalStageApp:
    app: Any  # modal.App
    app_name: str
    volume_name: str
    volume: Any  # modal.Volume
    secrets: list[str]
    max_parallel: int
    functions: dict[str, StageFunction] = field(default_factory=dict)
    by_node: dict[str, str] = field(default_factory=dict)  # stage id -> function name

    def function_for(self, node: contract.PlanNode) -> StageFunction:
        return self.functions[self.by_node[node.id]]


def _common_settings(specs_hw: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The volume and app name must agree across one batch (one store for all its artifacts)."""
    settings = {c: modal_settings(hw) for c, hw in specs_hw.items()}
    volumes = {s["volume"] for s in settings.values()}
    if len(volumes) > 1:
        raise ModalUnavailable(
            "the specs of one batch name different Modal volumes (hardware.modal.volume: "
            + ", ".join(sorted(volumes)) + "); use one volume per batch or apply them separately")
    names = {s["app_name"] or f"character-runner-{slug(c)}" for c, s in settings.items()}
    app_name = names.pop() if len(names) == 1 else "character-runner-batch"
    return app_name, settings


def build_stage_app(graph: Any, nodes: list[contract.PlanNode] | None = None) -> ModalStageApp:
    """Declare the Modal app for ``nodes`` (default: the GPU stages of ``graph``, a
    runner.plan.graph.Graph, and the CPU stages its hardware.stage_backend sends to Modal): one
    function per (kind, GPU or CPU container); no network call happens here."""
    import modal

    hw_of = {c: s.data.get("hardware", {}) for c, s in graph.specs.items()}
    if nodes is None:
        nodes = [n for n in graph.nodes.values()
                 if n.gpu is not None or stage_backend(n.kind, n.gpu, hw_of[n.character]) == "modal"]
    app_name, settings = _common_settings({c: hw_of[c] for c in {n.character for n in nodes} or hw_of})
    first = next(iter(settings.values()))
    secret_names = sorted({name for s in settings.values() for name in s["secrets"]})
    volume = modal.Volume.from_name(first["volume"], create_if_missing=True)
    app = modal.App(app_name)
    image = build_image()
    secrets = [modal.Secret.from_name(n) for n in secret_names]
    out = ModalStageApp(app=app, app_name=app_name, volume_name=first["volume"], volume=volume,
                        secrets=secret_names, max_parallel=min(int(s["max_parallel"]) for s in settings.values()))
    for node in nodes:
        s = settings[node.character]
        gpu = remote_gpu(node.kind, node.gpu, hw_of[node.character])
        # a CPU stage asks for its container's cores and memory instead of a GPU (Modal bills both)
        box = remote_cpu(node.kind, hw_of[node.character]) if gpu is None else None
        resources = {"gpu": gpu} if box is None else {"cpu": box.cores, "memory": box.memory_mib}
        what = gpu if box is None else f"cpu{box.cores:g}-m{box.memory_mib}"
        containers = int(((hw_of[node.character].get("stage_map") or {}).get(node.kind)) or 1)
        name = (f"stage-{slug(node.kind)}-{slug(what)}-t{int(s['timeout_s'])}-r{int(s['retries'])}"
                + ("-map" if containers > 1 else ""))
        if name not in out.functions:
            declare = _declarer(app, image, resources, s, volume, secrets)
            # the map's containers are the stage's (hardware.stage_map): same image, box and retries
            map_fn = declare("map" + name[len("stage"):-len("-map")], _map_entry_named) if containers > 1 else None
            out.functions[name] = StageFunction(name, node.kind, gpu if box is None else box.label,
                                                int(s["timeout_s"]), int(s["retries"]),
                                                declare(name, _entry_named), map_fn)
        out.by_node[node.id] = name
    return out


def _declarer(app: Any, image: Any, resources: dict[str, Any], s: dict[str, Any], volume: Any, secrets: list):
    """Declares a function of the app named ``name`` with the body ``entry(name)`` returns."""
    import modal

    def declare(name: str, entry: Any) -> Any:
        return app.function(
            image=image,
            **resources,
            timeout=int(s["timeout_s"]),
            retries=modal.Retries(max_retries=int(s["retries"]), backoff_coefficient=1.0, initial_delay=5.0),
            volumes={VOLUME_MOUNT: volume},
            secrets=secrets,
            serialized=True,
            name=name,
        )(entry(name.replace("-", "_")))

    return declare


# ----------------------------------------------------------------------------- transport


class _ModalCall:
    def __init__(self, fc: Any) -> None:
        self.fc = fc
        self.call_id = fc.object_id

    def result(self) -> dict[str, Any]:
        from runner.backends.remote import RemoteCallError

        try:
            return self.fc.get()
        except Exception as exc:  # a crash on every attempt, a timeout, a lost container
            raise RemoteCallError(f"Modal call {self.call_id} failed: {type(exc).__name__}: {exc}") from None

    def cancel(self) -> None:
        self.fc.cancel()


class ModalTransport:
    """Volume operations through the SDK; calls through ``Function.spawn`` (the call id is known
    at once and recorded)."""

    name = "modal"
    progress_poll_s = 30.0

    def __init__(self, stage_app: ModalStageApp) -> None:
        self.stage_app = stage_app
        self.volume = stage_app.volume
        self._blobs: set[str] | None = None
        self._lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[None]:
        with self.stage_app.app.run():
            yield

    def _listing(self) -> set[str]:
        with self._lock:
            if self._blobs is None:
                import modal

                try:
                    entries = self.volume.listdir("/blobs", recursive=True)
                except (FileNotFoundError, modal.exception.NotFoundError):
                    entries = []  # a new volume
                self._blobs = {Path(e.path).name for e in entries}
            return self._blobs

    def missing(self, shas: set[str]) -> set[str]:
        return set(shas) - self._listing()

    def note_present(self, shas: set[str]) -> None:
        """Blobs a stage wrote on the volume (its outputs): no need to list the volume again."""
        with self._lock:
            if self._blobs is not None:
                self._blobs |= set(shas)

    def upload(self, files: dict[str, Path]) -> None:
        from runner.backends.volume import blob_relpath

        with self.volume.batch_upload(force=True) as batch:
            for sha, path in files.items():
                batch.put_file(str(path), "/" + blob_relpath(sha))
        with self._lock:
            if self._blobs is not None:
                self._blobs |= set(files)

    def fetch(self, sha: str, dest: Path) -> None:
        from runner.backends.volume import blob_relpath
        from runner.core.fs import atomic_path

        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            self.volume.read_file_into_fileobj("/" + blob_relpath(sha), fh)

    def read_result(self, key: str) -> dict[str, Any] | None:
        from runner.backends.volume import result_relpath

        try:
            data = b"".join(self.volume.read_file("/" + result_relpath(key)))
        except FileNotFoundError:
            return None
        except Exception as exc:
            if "not found" in str(exc).lower() or type(exc).__name__ == "NotFoundError":
                return None
            raise
        return json.loads(data.decode("utf-8"))

    def progress_events(self, key: str) -> tuple[str, list[dict[str, Any]]]:
        """The running attempt's log as last committed by the worker (every minute)."""
        from runner.backends.remote import parse_events
        from runner.backends.volume import WORK

        try:
            entries = self.volume.listdir(f"/{WORK}/{key}")
        except Exception:
            return "", []
        attempts = sorted((Path(e.path).name for e in entries if Path(e.path).name.startswith("attempt")),
                          key=lambda n: int(n[7:] or 0))
        if not attempts:
            return "", []
        try:
            data = b"".join(self.volume.read_file(f"/{WORK}/{key}/{attempts[-1]}/log.jsonl"))
        except Exception:
            return "", []
        return attempts[-1], parse_events(data.decode("utf-8", errors="replace"))

    def invoke(self, kind: str, config: dict[str, Any], manifest: dict[str, Any],
               node: contract.PlanNode) -> _ModalCall:
        sf = self.stage_app.function_for(node)
        extra = () if sf.map_function is None else (sf.map_function,)  # hydrated: it pickles as a handle
        return _ModalCall(sf.function.spawn(kind, config, manifest, self.stage_app.volume_name, *extra))
