"""The Modal app built from a spec, inspected offline through the SDK's public objects
(modal.Function.info(): GPU, timeout, retries, volumes, secrets); credentials; plan estimates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fake_gpu_stages  # noqa: F401
from runner.backends import modal_backend
from runner.plan.graph import build_graph
from runner.spec import load_specs

TESTS = Path(__file__).resolve().parent

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
dataset:
  sources:
    - images: ../photos
hardware:
  backend: modal
  gpu: A10G
  stage_gpu: {fake_gpu_train: A100-80GB, fake_gpu_eval: L40S}
  modal: {volume: hero-store, secrets: [huggingface, wandb], timeout_s: 7200, retries: 3, max_parallel: 2}
"""


@pytest.fixture()
def hero(project, shared_data):
    photos = project / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", photos / "a.jpg")
    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC)
    return spec


@pytest.fixture()
def no_credentials(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_CONFIG_PATH", "MODAL_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_app_from_spec_declares_one_function_per_gpu_stage(hero, monkeypatch):
    import modal

    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a,b")
    graph = build_graph(load_specs([str(hero)]))
    built = modal_backend.build_stage_app(graph)
    assert isinstance(built.app, modal.App) and built.app_name == "character-runner-hero"
    assert built.volume_name == "hero-store" and built.max_parallel == 2
    # two variants share one function per (kind, GPU); only GPU stages are remote
    assert sorted(built.functions) == ["stage-fake-gpu-eval-l40s-t7200-r3", "stage-fake-gpu-train-a100-80gb-t7200-r3"]
    assert built.by_node["hero:fake_gpu_train[b]"] == "stage-fake-gpu-train-a100-80gb-t7200-r3"
    assert "hero:ingest" not in built.by_node
    for name, sf in built.functions.items():
        assert isinstance(sf.function, modal.Function)
        info = sf.function.info()  # local metadata of an undeployed function: no network
        assert info.gpus == [("A100-80GB" if "train" in name else "L40S", 1)]
        assert info.timeout == 7200 and info.max_retries == 3
        assert list(info.volumes) == [modal_backend.VOLUME_MOUNT]
        assert info.volumes[modal_backend.VOLUME_MOUNT].name == "hero-store"
        assert sorted(info.secrets) == ["modal.Secret.from_name('huggingface')", "modal.Secret.from_name('wandb')"]


def test_image_pins_the_package_requirements():
    reqs = modal_backend.pinned_requirements()
    pins = dict(r.split("==", 1) for r in reqs if "==" in r)
    constraints = dict(
        line.split("==", 1) for line in (TESTS.parent / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#"))
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "fastapi", "uvicorn"):
        assert pins[name] == constraints[name], name
    assert all("==" in r for r in reqs), [r for r in reqs if "==" not in r]
    import modal

    assert isinstance(modal_backend.build_image(), modal.Image)


def test_credentials_are_found_like_the_sdk_finds_them(no_credentials, monkeypatch):
    assert modal_backend.credentials_source() is None
    with pytest.raises(modal_backend.ModalUnavailable, match="modal token new"):
        modal_backend.require_credentials()
    (no_credentials / ".modal.toml").write_text('[me]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n')
    assert modal_backend.credentials_source() == str(no_credentials / ".modal.toml")
    (no_credentials / ".modal.toml").write_text('[me]\ntoken_id = "ak-1"\n')
    assert modal_backend.credentials_source() is None
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-2")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-2")
    assert modal_backend.credentials_source() == "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"


def cli(project: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def cli_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(home), CHARACTER_RUNNER_STAGE_PLUGINS="fake_gpu_stages", FAKE_GPU_VARIANTS="a",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
               # were anything to try the network, it would fail fast rather than hang
               MODAL_SERVER_URL="http://127.0.0.1:9")
    env.update(extra)
    return env


def test_apply_without_credentials_fails_at_once_and_plan_still_works(hero, no_credentials):
    project = hero.parent.parent
    env = cli_env(no_credentials)
    t0 = time.monotonic()
    r = cli(project, "apply", "specs/hero.yaml", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    assert "modal token new" in r.stderr and "hero:fake_gpu_train[a]" in r.stderr
    assert "--backend local" in r.stderr and "Traceback" not in r.stderr
    # nothing ran, not even the local stages
    assert not (project / ".runner" / "store").exists() or not any((project / ".runner" / "store").iterdir())

    r = cli(project, "plan", "specs/hero.yaml", env=env)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "fake_gpu_train[a]" in ln)
    assert "modal A100-80GB" in line and "default estimate" in line
    assert "Estimated Modal cost of this plan" in r.stdout
    r = cli(project, "plan", "--json", "specs/hero.yaml", env=env)
    stages = {s["stage"]: s for s in json.loads(r.stdout)["stages"]}
    est = stages["hero:fake_gpu_train[a]"]["remote"]
    # 90 min of A100-80GB at the built-in 2.50 USD/h would be 3.75; fake kinds use the 30 min fallback
    assert est["gpu"] == "A100-80GB" and est["source"] == "default" and est["cost"] == pytest.approx(1.25)
    assert "remote" not in stages["hero:ingest"]
    # --backend local: no remote stages, no estimates; the apply would run everything here
    r = cli(project, "plan", "--backend", "local", "specs/hero.yaml", env=env)
    assert "modal" not in r.stdout and "[gpu stage, local]" in r.stdout


def test_plan_estimates_from_earlier_runs(hero, tmp_path, monkeypatch, no_credentials):
    """After a remote run, the estimate comes from its recorded (billed) duration."""
    from test_fanout import run, transport

    project = hero.parent.parent
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    monkeypatch.setenv("FAKE_GPU_SLEEP", "0.05")
    result = run(hero, transport(tmp_path))
    assert result.status == "succeeded"
    r = cli(project, "plan", "--json", "--force", "fake_gpu_train*", "specs/hero.yaml", env=cli_env(no_credentials))
    stages = {s["stage"]: s for s in json.loads(r.stdout)["stages"]}
    est = stages["hero:fake_gpu_train[a]"]["remote"]
    assert est["source"] == "history" and est["runs"] == 1 and 0 < est["seconds"] < 60
    assert "this stage" in est["note"]


def test_deploy_declares_an_asgi_web_endpoint(hero, tmp_path):
    from runner.serve.character import ServeTarget
    from runner.serve.deploy import build_deployment

    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"lora bytes")
    spec = load_specs([str(hero)])[0]
    target = ServeTarget(character="hero", trigger="hrochr", class_word="man", base_model="builtin:tiny-sd",
                         family="sd15", lora_file=str(lora), lora_source="test", lora_scale=0.8, resolution=64,
                         project_root=str(spec.project_root), api={"token_env": "HERO_TOKEN"})
    dep = build_deployment(spec, target, token_secret="hero-api")
    info = dep.function.info()
    assert dep.app_name == "character-runner-hero-api"
    assert info.web_info is not None  # modal.asgi_app
    assert info.gpus == [("A10G", 1)]  # hardware.gpu (no stage_gpu.serve in this spec)
    assert "modal.Secret.from_name('hero-api')" in info.secrets
    assert "modal.Secret.from_name('huggingface')" in info.secrets
    assert info.volumes[modal_backend.VOLUME_MOUNT].name == "hero-store"
    assert info.concurrency_info is not None
    # the LoRA goes up content-addressed; the container finds it at a volume path
    (sha, path), = dep.uploads.items()
    assert path == lora and dep.manifest["lora_file"].endswith(f"/{sha}/pytorch_lora_weights.safetensors")
    assert dep.manifest["_links"] == [[f"blobs/{sha[:2]}/{sha}", dep.manifest["lora_file"]]]
    # what the container does at start-up, with a folder standing in for the volume
    from runner.backends.volume import FolderVolume
    from runner.serve.deploy import prepare_target

    vol = tmp_path / "vol"
    FolderVolume(vol).upload(dep.uploads)
    manifest = {**dep.manifest,
                "_links": [[b, str(tmp_path / "local" / Path(d).name)] for b, d in dep.manifest["_links"]],
                "lora_file": str(tmp_path / "local" / "pytorch_lora_weights.safetensors")}
    t = prepare_target(manifest, vol)
    assert Path(t.lora_file).read_bytes() == b"lora bytes" and t.lora_scale == 0.8 and t.character == "hero"


class FolderBackedVolume:
    """Stands in for a hydrated modal.Volume: the methods ModalTransport calls, over a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def listdir(self, path, recursive=False):
        from types import SimpleNamespace

        base = self.root / path.lstrip("/")
        if not base.exists():
            import modal

            raise modal.exception.NotFoundError(f"{path} not found")
        it = base.rglob("*") if recursive else base.iterdir()
        return [SimpleNamespace(path=str(p.relative_to(self.root))) for p in it]

    def batch_upload(self, force=False):
        vol = self

        class Batch:
            def __enter__(self):
                return self

            def put_file(self, local, remote):
                dest = vol.root / remote.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(Path(local).read_bytes())

            def __exit__(self, *exc):
                return False

        return Batch()

    def read_file(self, path):
        p = self.root / path.lstrip("/")
        if not p.is_file():
            raise FileNotFoundError(path)
        yield p.read_bytes()

    def read_file_into_fileobj(self, path, fileobj):
        fileobj.write(next(self.read_file(path)))


def test_modal_transport_volume_calls(tmp_path):
    """ModalTransport's volume traffic, against the method names modal.Volume really has."""
    import modal

    from runner.backends.volume import blob_relpath, sha256_file

    for name in ("listdir", "batch_upload", "read_file", "read_file_into_fileobj", "reload", "commit"):
        assert callable(getattr(modal.Volume, name)), name
    vol_root = tmp_path / "vol"
    vol_root.mkdir()
    app = modal_backend.ModalStageApp(app=None, app_name="x", volume_name="v", volume=FolderBackedVolume(vol_root),
                                      secrets=[], max_parallel=1)
    tr = modal_backend.ModalTransport(app)
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    sha = sha256_file(f)
    assert tr.missing({sha}) == {sha}  # a new volume has no blobs folder yet
    tr.upload({sha: f})
    assert (vol_root / blob_relpath(sha)).read_bytes() == b"abc"
    assert tr.missing({sha, "0" * 64}) == {"0" * 64}
    tr.fetch(sha, tmp_path / "back" / "a.bin")
    assert (tmp_path / "back" / "a.bin").read_bytes() == b"abc"
    assert tr.read_result("nokey") is None
    (vol_root / "results").mkdir()
    (vol_root / "results" / "k.json").write_text('{"status": "succeeded"}')
    assert tr.read_result("k") == {"status": "succeeded"}
    (vol_root / "work" / "k" / "attempt2").mkdir(parents=True)
    (vol_root / "work" / "k" / "attempt2" / "log.jsonl").write_text('{"event": "progress"}\n{"event": "lo')
    assert tr.progress_events("k") == ("attempt2", [{"event": "progress"}])
