"""`runner deploy SPEC`: the serve app as a Modal web endpoint (``modal.asgi_app``).

1. the LoRA (and a local base model folder or file) go up to the spec's Modal Volume,
   content-addressed like stage inputs (only what the volume lacks); each container copies them
   to its own disk at start-up;
2. a Modal app is declared: one function on the serving GPU (``hardware.stage_gpu.serve`` or
   ``hardware.gpu``) with the package image, the volume, the spec's secrets plus the secret that
   holds the API token (its key is generate.api.token_env), ``@modal.concurrent`` so that
   concurrent requests reach one container and get batched, and ``@modal.asgi_app``;
3. ``app.deploy()`` publishes it and the URL is printed.

The container rebuilds the same :class:`runner.serve.character.ServeTarget` from the manifest with
paths on the volume and calls :func:`runner.serve.build_app`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.backends.modal_backend import (
    VOLUME_MOUNT,
    build_image,
    modal_settings,
    require_credentials,
    slug,
)

DEFAULT_TOKEN_SECRET = "character-runner-api"
# Serving files are copied from the volume's blobs to the container's own disk at start-up (the
# loaders want real file names; concurrent containers never write to the volume).
LOCAL_SERVE_DIR = "/tmp/character-runner-serve"


@dataclass
class Deployment:
    app: Any
    function: Any
    app_name: str
    manifest: dict[str, Any]
    uploads: dict[str, Path]  # sha -> local file the volume needs


def serving_files(target: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """The target with local paths replaced by volume blob paths, and the files to upload."""
    from runner.backends.remote import DigestCache
    from runner.backends.volume import blob_relpath, sha256_file

    data = target.as_json()
    uploads: dict[str, Path] = {}
    if target.lora_file:
        p = Path(target.lora_file)
        sha = sha256_file(p)
        uploads[sha] = p
        data["lora_file"] = f"{LOCAL_SERVE_DIR}/{sha}/{p.name}"
        data["_links"] = [[blob_relpath(sha), data["lora_file"]]]
    bm = Path(target.base_model)
    if not target.base_model.startswith("builtin:") and bm.exists():
        files = [bm] if bm.is_file() else sorted(f for f in bm.rglob("*") if f.is_file())
        cache = DigestCache(Path(target.project_root) / ".runner" / "remote" / "digests")
        listing = cache.digest_tree(bm, files)
        dest = f"{LOCAL_SERVE_DIR}/models/{slug(bm.name)}"
        data["base_model"] = dest if bm.is_dir() else f"{dest}/{bm.name}"
        links = data.setdefault("_links", [])
        for (rel, sha, _), f in zip(listing, files):
            uploads[sha] = f
            links.append([blob_relpath(sha), f"{dest}/{rel}"])
    data["project_root"] = ""
    return data, uploads


def prepare_target(manifest: dict[str, Any], volume_root: str | Path) -> Any:
    """In the container: copy the serving files from the volume's blobs to where the manifest's
    target expects them, and return that :class:`ServeTarget`."""
    from runner.core.fs import copy_atomic
    from runner.serve.character import ServeTarget

    for blob, dest in manifest.get("_links", []):
        if not Path(dest).is_file():
            copy_atomic(Path(volume_root) / blob, dest)
    return ServeTarget.from_json({k: v for k, v in manifest.items() if not k.startswith("_")})


def _serve_entry(manifest: dict[str, Any], token_env: str, device: str):
    """Build the ASGI app inside the container (called once per container)."""
    import os

    import modal

    from runner.serve import build_app, token_from_env

    vol = modal.Volume.from_name(manifest["_volume"])
    try:
        vol.reload()
    except Exception:
        pass
    target = prepare_target(manifest, VOLUME_MOUNT)
    token = token_from_env(token_env, insecure_no_auth=os.environ.get("RUNNER_INSECURE_NO_AUTH") == "1")
    return build_app(target, token=token, device=device)


def build_deployment(spec: Any, target: Any, *, token_secret: str = DEFAULT_TOKEN_SECRET,
                     app_name: str | None = None, min_containers: int = 0) -> Deployment:
    """Declare the Modal app for ``target`` (no network call)."""
    import modal

    from runner.serve import api_settings

    hw = spec.data.get("hardware") or {}
    ms = modal_settings(hw)
    api = api_settings(target)
    name = app_name or f"{ms['app_name'] or 'character-runner-' + slug(spec.name)}-api"
    manifest, uploads = serving_files(target)
    manifest["_volume"] = ms["volume"]
    volume = modal.Volume.from_name(ms["volume"], create_if_missing=True)
    secrets = [modal.Secret.from_name(n) for n in [*ms["secrets"], token_secret]]
    gpu = (hw.get("stage_gpu") or {}).get("serve") or hw.get("gpu") or "A10G"
    token_env = api["token_env"]

    app = modal.App(name)

    def api_app():
        return _serve_entry(manifest, token_env, "cuda")

    api_app.__name__ = api_app.__qualname__ = "api"
    fn = app.function(
        image=build_image(), gpu=gpu, volumes={VOLUME_MOUNT: volume}, secrets=secrets, serialized=True,
        timeout=int(ms["timeout_s"]), min_containers=min_containers, scaledown_window=300, name="api",
    )(modal.concurrent(max_inputs=int(api["max_queue"]) + int(api["max_batch"]))(modal.asgi_app()(api_app)))
    return Deployment(app=app, function=fn, app_name=name, manifest=manifest, uploads=uploads)


def deploy(spec: Any, target: Any, **kw: Any) -> tuple[Deployment, str | None]:
    """Upload what the endpoint needs and deploy it; returns (deployment, URL)."""
    require_credentials("runner deploy")
    dep = build_deployment(spec, target, **kw)
    if dep.uploads:
        from runner.backends.volume import blob_relpath

        import modal

        vol = modal.Volume.from_name(dep.manifest["_volume"], create_if_missing=True)
        try:
            have = {Path(e.path).name for e in vol.listdir("/blobs", recursive=True)}
        except (FileNotFoundError, modal.exception.NotFoundError):
            have = set()
        todo = {sha: p for sha, p in dep.uploads.items() if sha not in have}
        if todo:
            with vol.batch_upload(force=True) as batch:
                for sha, p in todo.items():
                    batch.put_file(str(p), "/" + blob_relpath(sha))
    dep.app.deploy(name=dep.app_name)
    url = None
    try:
        url = dep.function.get_web_url()
    except Exception:
        pass
    return dep, url
