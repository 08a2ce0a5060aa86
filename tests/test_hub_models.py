"""Offline or missing hub models fail fast, and `runner plan` warns about them before anything runs.

Every loader that takes a hub id goes through runner.hub: with HF_HUB_OFFLINE=1, or with the hub
unreachable (HF_ENDPOINT on a closed port), a hub id that is not in an empty cache (HF_HOME in a
temporary folder) fails in seconds, naming the model, the cache folder and what to do. The same
id in the cache loads without any network. `runner plan` walks every model-valued schema key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runner.spec import schema as S

REPO = Path(__file__).resolve().parents[1]

# One call per loader that accepts a hub id; each prints JSON (seconds, error type, message, hint).
LOADERS = r'''
import json, sys, time
from pathlib import Path
ref, cache = sys.argv[1], Path(sys.argv[2])

def call(name, fn):
    t0 = time.monotonic()
    try:
        fn()
        out = {"loader": name, "error": None}
    except BaseException as exc:
        out = {"loader": name, "error": type(exc).__name__, "message": str(exc), "hint": getattr(exc, "hint", "")}
    out["seconds"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)

from runner.diffusion.models import load_pipeline
from runner.metrics.embedders import load_image_embedder
from runner.stages.caption import ModelCaptioner
from runner.video.descriptors import load_general_embedder
from runner.generate import guided, ltx
from runner.serve.engine import SafetyFilter

call("base model", lambda: load_pipeline(ref))
call("sdxl base model", lambda: load_pipeline(ref, family="sdxl"))
call("clip/dino", lambda: load_image_embedder(ref, cache))
call("open_clip hf-hub", lambda: load_image_embedder("open_clip:hf-hub:" + ref, cache))
call("captioner", lambda: ModelCaptioner(ref, Path.cwd())._load())
call("general vision", lambda: load_general_embedder(ref, cache_dir=cache, fallback="never"))
call("video model", lambda: ltx.load_video_pipeline(ref))
call("video upsampler", lambda: ltx.latent_upscale(None, None, ref, width=64, height=64, seed=1,
                                                   decode_timestep=0.0, decode_noise_scale=0.0))
call("controlnet", lambda: guided.controlnet_pipeline(None, ref, family="sd15"))
call("ip-adapter", lambda: guided.load_ip_adapter(None, ref, weight_name=None, subfolder=None,
                                                  image_encoder_folder=None, scale=1.0, family="sd15"))
call("safety checker", lambda: SafetyFilter(ref))
'''


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connecting is refused


def hub_env(tmp_path: Path, mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
    env["HF_HOME"] = str(tmp_path / "hf")
    if mode == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # no network: the hub endpoint refuses connections
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_every_loader_fails_fast_on_an_uncached_hub_id(tmp_path, mode):
    ref = f"no-such-org-{mode}/sd-xl-{tmp_path.name[-6:]}"
    env = hub_env(tmp_path, mode)
    r = subprocess.run([sys.executable, "-c", LOADERS, ref, str(tmp_path / "cache")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == LOADERS.count('\ncall("'), r.stderr[-3000:]
    hub_cache = str(tmp_path / "hf" / "hub")
    for row in rows:
        assert row["error"], row
        assert row["seconds"] < 5.0, row  # the hub client's retries take about 99 s
        text = row["message"] + " " + row.get("hint", "")
        assert ref in row["message"] and hub_cache in row["message"], row
        assert ("HF_HUB_OFFLINE" if mode == "offline" else "cannot be reached") in row["message"], row
        assert f"hf download {ref}" in text, row


def fake_cached_snapshot(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Put ``folder`` into the hub cache the way huggingface_hub lays out a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
@pytest.mark.slow  # 7-8 s each
def test_a_cached_hub_model_loads_without_network(tmp_path, mode):
    from runner.metrics.embedders import ensure_tiny_model

    tiny = ensure_tiny_model("clip", tmp_path / "cache")
    snapshot = fake_cached_snapshot(tmp_path / "hf", "test-org/tiny-clip", tiny)
    code = (
        "import sys, time; from pathlib import Path\n"
        "from runner.hub import resolve_hub_model, uncached_reason\n"
        "from runner.metrics.embedders import load_image_embedder\n"
        "t0 = time.monotonic(); emb = load_image_embedder('test-org/tiny-clip', Path(sys.argv[1]))\n"
        "print(resolve_hub_model('test-org/tiny-clip')); print(uncached_reason('test-org/tiny-clip'))\n"
        "print(emb.name, len(emb.embed_texts(['a photo'])[0]), round(time.monotonic() - t0, 1))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=hub_env(tmp_path, mode),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where, why, loaded = r.stdout.strip().splitlines()[-3:]
    assert Path(where) == snapshot and why == "None"
    assert loaded.startswith("test-org/tiny-clip ")


def test_hub_ids_are_told_from_paths_and_builtins(tmp_path):
    from runner.hub import is_hub_id

    (tmp_path / "models" / "sd").mkdir(parents=True)
    hub = ["stabilityai/stable-diffusion-xl-base-1.0", "openai/clip-vit-large-patch14", "h94/IP-Adapter",
           "facebook/dinov2-small", "Lightricks/LTX-Video", "a/b", "org_1/name.v2"]
    not_hub = ["builtin:tiny-sd", "open_clip:ViT-B-32/laion2b", "./models/sd", "../x/y", "/abs/path", "~/m/x",
               "models/sd", "a/b/c", "noslash", "org/", "/name", "org/../etc", "org/name with space", ""]
    assert [r for r in hub if not is_hub_id(r, tmp_path)] == []
    assert [r for r in not_hub if is_hub_id(r, tmp_path)] == []


# ----------------------------------------------------------------------------- runner plan


PLAN_SPEC = """\
version: 1
character: {{name: hero, trigger: hrochr, class_word: man, references: [../photos]}}
dataset:
  sources:
    - images: ../photos
    - video: ../clips/clip.mp4
      video_options: {{general_model: {general_model}}}
  captions: {{model: {captions}}}
  export: {{formats: [kohya, identity_crops], identity_crops: {{background: {{model: {matting}, session: u2net}}}}}}
train: {{base_model: {base}, steps: 2, resolution: 64}}
train_video: {{base_model: {video_lora_base}, model_family: wan22_ti2v, steps: 2, resolution: 64}}
evaluate: {{clip_model: {clip}, dino_model: {dino}, seeds: [1], resolution: 64, prompts_per_category: 1}}
generate:
  storyboard:
    planner: manual
    scenes: [{{text: The hero arrives., shot: close_up, prompt: "{{trigger}} arrives"}}]
    width: 64
    height: 64
    validation: {{clip_i: 0.5, clip_model: {validation_clip}}}
    reference_guided: {{enabled: true, ip_adapter: {ip_adapter}, controlnet: {controlnet}, control: pose,
                       pose_model: {pose}}}
  video:
    key_frames: [1]
    model: {video}
    upscale: true
    upsampler: {upsampler}
"""

SLOTS = {  # template slot -> the schema key it fills
    "general_model": "dataset.sources.[].video_options.general_model", "captions": "dataset.captions.model",
    "base": "train.base_model", "clip": "evaluate.clip_model", "dino": "evaluate.dino_model",
    "validation_clip": "generate.storyboard.validation.clip_model",
    "ip_adapter": "generate.storyboard.reference_guided.ip_adapter",
    "controlnet": "generate.storyboard.reference_guided.controlnet",
    "video": "generate.video.model", "upsampler": "generate.video.upsampler",
    "video_lora_base": "train_video.base_model",
    "pose": "generate.storyboard.reference_guided.pose_model",
    "matting": "dataset.export.identity_crops.background.model",
}


def schema_model_keys() -> set[str]:
    keys = set()
    for path, sch in S.iter_schema_fields(S.root_schema(), S.root_uri()):
        if sch.get("x-path") == "model" and sch.get("type") in ("string", ["string", "null"], ["null", "string"]):
            keys.add(".".join(path))
    return keys


def plan_project(tmp_path: Path, shared_data: Path, values: dict[str, str]) -> Path:
    root = tmp_path / "proj"
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("")
    (root / "photos").mkdir()
    (root / "clips").mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", root / "photos" / "a.jpg")
    shutil.copy(shared_data / "video" / "carphone.mp4", root / "clips" / "clip.mp4")
    spec = root / "specs" / "hero.yaml"
    spec.write_text(PLAN_SPEC.format(**values))
    return spec


def run_plan(spec: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = hub_env(tmp_path, "offline")
    return subprocess.run([sys.executable, "-m", "runner.cli", "plan", str(spec), *args], env=env,
                          cwd=spec.parent.parent, capture_output=True, text=True, timeout=300)


def test_plan_warns_about_every_uncached_hub_model_key(tmp_path, shared_data):
    # the template fills every string-valued model key of the schema (but the insightface packs,
    # which are pack names, not hub ids); a new model key shows up here
    not_slots = {"generate.base_model", "generate.video.lora"}
    expected = {k for k in schema_model_keys() if "insightface" not in k} - not_slots
    assert set(SLOTS.values()) == expected
    values = {slot: f"test-org/{slot.replace('_', '-')}-model" for slot in SLOTS}
    spec = plan_project(tmp_path, shared_data, values)
    r = run_plan(spec, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: model ")]
    hub_cache = str(tmp_path / "hf" / "hub")
    for slot, key in SLOTS.items():
        hits = [w for w in warnings if f"'{values[slot]}'" in w]
        assert len(hits) == 1, (key, r.stderr)
        assert key in re.sub(r"\[\d+\]", ".[]", hits[0]) and hub_cache in hits[0], hits[0]
        assert "hero:" in hits[0] and "hero:report" not in hits[0], hits[0]
        assert "will fail when it starts (HF_HUB_OFFLINE is set" in hits[0] and "will download" not in hits[0], hits[0]
    data = json.loads(run_plan(spec, tmp_path, "--json").stdout)
    assert {m["model"] for m in data["uncached_models"]} == set(values.values())


def test_plan_is_quiet_about_builtin_local_and_cached_models(tmp_path, shared_data):
    from runner.metrics.embedders import ensure_tiny_model

    values = {slot: "builtin:tiny-clip" if slot in ("clip", "validation_clip") else "builtin:tiny-dino"
              for slot in SLOTS}
    values.update(base="builtin:tiny-sd", video="builtin:tiny-ltx", upsampler="builtin:tiny-ltx-upsampler",
                  ip_adapter="builtin:tiny-ip-adapter", controlnet="../models/cn", captions="test-org/cached-captioner",
                  general_model="builtin:tiny-dino", pose="builtin:tiny-dwpose", matting="rembg:u2net",
                  video_lora_base="builtin:tiny-wan22-ti2v")
    spec = plan_project(tmp_path, shared_data, values)
    (spec.parent.parent / "models" / "cn").mkdir(parents=True)
    (spec.parent.parent / "models" / "cn" / "config.json").write_text("{}")
    fake_cached_snapshot(tmp_path / "hf", "test-org/cached-captioner", ensure_tiny_model("clip", tmp_path / "c"))
    r = run_plan(spec, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Plan:" in r.stdout and "warning: model" not in r.stderr, r.stderr


@pytest.mark.parametrize("offline", ["1", "true", "ON", ""])
def test_the_plan_warning_says_what_will_happen_with_this_environment(monkeypatch, offline):
    """With HF_HUB_OFFLINE set the warning says the stage will fail (not that it will download)."""
    from huggingface_hub import constants

    from runner.plan.preflight import UncachedModel

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    text = UncachedModel("org/m", "not in the Hugging Face cache (/c)", ["train.base_model"], ["hero:train"]).message()
    if offline:
        assert "hero:train will fail when it starts (HF_HUB_OFFLINE is set" in text and "will download" not in text
    else:
        assert "hero:train will download it when it runs" in text
    assert "hf download org/m" in text
