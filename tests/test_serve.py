"""`runner serve`: the generation API over real HTTP on 127.0.0.1 (uvicorn in a thread, httpx),
with builtin:tiny-sd (a tiny random model: its images are noise) and a random LoRA."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from runner.engine.workspace import Workspace
from runner.serve import ServeError, token_from_env
from runner.serve.character import resolve_target
from runner.spec import load_specs
from runner.core.errors import StageError

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
dataset:
  sources:
    - images: ../photos
train:
  base_model: builtin:tiny-sd
  resolution: 64
generate:
  checkpoint: {checkpoint}
  api: {{token_env: HERO_API_TOKEN, max_queue: 8, max_batch: 4, max_side: 128}}
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_lora(folder: Path) -> Path:
    """A random, non-zero LoRA for builtin:tiny-sd in diffusers format."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="x")
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="x"))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=sd)
    return folder / "pytorch_lora_weights.safetensors"


def promote(ws: Workspace, stage_id: str, key: str, build) -> None:
    tmp = ws.new_tmp_dir(key)
    outputs = build(tmp)
    ws.promote(tmp, key, {"stage_id": stage_id, "kind": stage_id.split(":")[1].split("[")[0], "key": key,
                          "outputs": outputs, "meta": {}})
    ws.set_current(stage_id, key, {}, "test-run", {})


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A project whose workspace holds a train output (two checkpoints) and an evaluation."""
    root = tmp_path_factory.mktemp("serveproj")
    (root / "runner.toml").write_text("")
    (root / "specs").mkdir()
    (root / "photos").mkdir()
    spec = root / "specs" / "hero.yaml"
    spec.write_text(SPEC.format(checkpoint="best"))
    ws = Workspace(root)

    def train(tmp: Path):
        lora = tmp / "lora"
        for step in (5, 10):
            (lora / f"checkpoint-{step}").mkdir(parents=True)
            make_lora(lora / f"checkpoint-{step}")
        (lora / "index.json").write_text(json.dumps({
            "base_model": "builtin:tiny-sd", "model_family": "sd15", "resolution": 64, "trigger": "hrochr",
            "class_word": "man", "variant": None, "tiny_random_model": True, "final": 1,
            "checkpoints": [{"step": s, "phase": "main", "val_loss": None, "samples": [], "kohya": None,
                             "diffusers": f"checkpoint-{s}/pytorch_lora_weights.safetensors"} for s in (5, 10)]}))
        return {"lora": "lora"}

    promote(ws, "hero:train", "k" * 64, train)
    ws.close()
    return root, spec


def add_evaluation(root: Path) -> None:
    ws = Workspace(root)

    def evaluation(tmp: Path):
        ev = tmp / "evaluation"
        (ev / "best").mkdir(parents=True)
        make_lora(ev / "best")
        (ev / "evaluation.json").write_text(json.dumps({
            "base_model": "builtin:tiny-sd", "model_family": "sd15",
            "generation": {"steps": 4, "guidance": 5.0, "resolution": 64},
            "best": {"variant": None, "step": 5, "lora_scale": 0.8, "score": 0.61,
                     "lora_diffusers": "best/pytorch_lora_weights.safetensors"}}))
        return {"evaluation": "evaluation"}

    promote(ws, "hero:evaluate", "e" * 64, evaluation)
    ws.close()


def test_target_best_falls_back_to_last_then_uses_the_evaluation(proj, tmp_path):
    root, spec = proj
    s = load_specs([str(spec)])[0]
    t = resolve_target(s)
    assert t.lora_source.startswith("last checkpoint of hero:train (step 10)")
    assert t.warnings and "no evaluation" in t.warnings[0]
    assert t.lora_file.endswith("checkpoint-10/pytorch_lora_weights.safetensors")
    assert resolve_target(s, checkpoint="last").lora_file == t.lora_file
    add_evaluation(root)
    t = resolve_target(s)
    assert t.lora_source == "best of hero:evaluate: step 5 at LoRA scale 0.8 (score 0.610)"
    assert t.lora_scale == 0.8 and t.steps == 4 and t.guidance == 5.0 and t.resolution == 64
    assert Path(t.lora_file).is_file() and "/evaluation/best/" in t.lora_file
    assert not t.warnings
    with pytest.raises(StageError, match="is not a file"):
        resolve_target(s, checkpoint="nope.safetensors")
    empty = tmp_path / "empty"
    (empty / "specs").mkdir(parents=True)
    (empty / "photos").mkdir()
    (empty / "runner.toml").write_text("")
    (empty / "specs" / "hero.yaml").write_text(SPEC.format(checkpoint="best"))
    with pytest.raises(StageError, match="no trained LoRA"):
        resolve_target(load_specs([str(empty / "specs" / "hero.yaml")])[0])


def test_token_is_required_unless_auth_is_turned_off(monkeypatch):
    monkeypatch.delenv("HERO_API_TOKEN", raising=False)
    with pytest.raises(ServeError, match=r"HERO_API_TOKEN.*--insecure-no-auth"):
        token_from_env("HERO_API_TOKEN", insecure_no_auth=False)
    assert token_from_env("HERO_API_TOKEN", insecure_no_auth=True) is None
    monkeypatch.setenv("HERO_API_TOKEN", "short")
    with pytest.raises(ServeError, match="at least 16"):
        token_from_env("HERO_API_TOKEN", insecure_no_auth=False)
    monkeypatch.setenv("HERO_API_TOKEN", TOKEN)
    assert token_from_env("HERO_API_TOKEN", insecure_no_auth=False) == TOKEN


def test_cli_serve_refuses_to_start_without_a_token(proj):
    root, spec = proj
    env = {k: v for k, v in os.environ.items() if k != "HERO_API_TOKEN"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "runner.cli", "serve", str(spec)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HERO_API_TOKEN" in r.stderr and "--insecure-no-auth" in r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 30
    no_modal = {k: v for k, v in env.items() if not k.startswith("MODAL_")}
    r = subprocess.run([sys.executable, "-m", "runner.cli", "deploy", str(spec)], cwd=root,
                       env={**no_modal, "HOME": str(root)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "modal token new" in r.stderr


# ----------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(proj):
    from runner.serve.engine import ImageEngine

    root, spec = proj
    add_evaluation(root)
    return ImageEngine(resolve_target(load_specs([str(spec)])[0]), device="cpu")


def app_for(engine, **kw):
    from runner.serve.app import create_app

    settings = {"token": TOKEN, "max_queue": 8, "max_batch": 4, "max_side": 128, **kw}
    return create_app(engine, **settings)


def wait_until(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_auth_validation_generation_and_errors(engine):
    with Server(app_for(engine)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.get("/v1/info")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/info", headers={"Authorization": "Bearer wrong-token-000000000"}).status_code == 401
        r = c.post("/v1/images", json={"prompt": "a portrait"})
        assert r.status_code == 401
        info = c.get("/v1/info", headers=AUTH).json()
        assert info["lora"].startswith("best of hero:evaluate") and info["lora_loaded"]
        assert info["tiny_random_model"] and info["defaults"]["lora_scale"] == 0.8

        r = c.post("/v1/images", headers=AUTH, json={"prompt": "", "steps": 0, "guidance": -1, "colour": "red"})
        assert r.status_code == 422
        err = r.json()["error"]
        fields = {d["field"]: d["reason"] for d in err["details"]}
        assert err["code"] == "invalid_request"
        assert set(fields) == {"prompt", "steps", "guidance", "colour"}
        assert "greater than or equal to 1" in fields["steps"] and "not permitted" in fields["colour"]
        r = c.post("/v1/images", headers=AUTH, json={"prompt": "x", "width": 70, "height": 256})
        fields = {d["field"]: d["reason"] for d in r.json()["error"]["details"]}
        assert r.status_code == 422 and "multiple of 8" in fields["width"] and "at most 128" in fields["height"]
        assert c.post("/v1/images", headers={**AUTH, "Content-Type": "application/json"}, content=b"not json",
                      ).status_code == 422
        assert c.post("/v1/images", headers=AUTH, content=b"not json").status_code == 415  # no Content-Type

        r = c.post("/v1/images", headers=AUTH, json={"prompt": "a portrait in the rain", "seed": 42, "steps": 2})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "42"
        assert r.headers["x-tiny-random-model"] == "true"
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "PNG" and im.size == (64, 64)
        again = c.post("/v1/images", headers=AUTH, json={"prompt": "a portrait in the rain", "seed": 42, "steps": 2})
        assert again.content == r.content  # same seed, same image
        other = c.post("/v1/images", headers=AUTH, json={"prompt": "a portrait in the rain", "seed": 42,
                                                         "steps": 2, "lora_scale": 0.0})
        assert other.content != r.content  # the LoRA scale reaches the pipeline
        j = c.post("/v1/images", headers=AUTH, json={"prompt": "p", "steps": 2, "response_format": "json"}).json()
        assert j["width"] == 64 and j["png_base64"] and isinstance(j["seed"], int)

        r = c.post("/v1/videos", headers=AUTH, json={"prompt": "walks"})
        assert r.status_code == 501 and r.json()["error"]["code"] == "video_not_available"
        assert "generate.video" in r.json()["error"]["message"]
        assert c.get("/nope", headers=AUTH).json()["error"]["code"] == "not_found"


def test_concurrent_compatible_requests_share_one_pipeline_call(engine):
    app = app_for(engine)
    batcher = app.state.batcher
    with Server(app) as url, httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(4) as pool:
        slow = pool.submit(c.post, "/v1/images", headers=AUTH, json={"prompt": "slow", "seed": 1, "steps": 25})
        wait_until(lambda: batcher.running == 1)
        body = {"prompt": "batch", "steps": 3, "guidance": 4.0}
        futs = [pool.submit(c.post, "/v1/images", headers=AUTH, json={**body, "seed": s}) for s in (11, 12, 13)]
        rs = [f.result() for f in futs]
        assert slow.result().headers["x-batch-size"] == "1"
        assert [r.status_code for r in rs] == [200, 200, 200]
        assert [r.headers["x-batch-size"] for r in rs] == ["3", "3", "3"]
        assert batcher.stats.largest_batch == 3
        # an image comes out the same whether it was generated alone or in the batch
        solo = c.post("/v1/images", headers=AUTH, json={**body, "seed": 12})
        assert solo.headers["x-batch-size"] == "1"
        a = np.asarray(Image.open(io.BytesIO(solo.content)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(rs[1].content)), dtype=np.int16)
        assert np.abs(a - b).max() <= 2


def test_full_queue_answers_429(engine):
    app = app_for(engine, max_queue=1, max_batch=1)
    batcher = app.state.batcher
    with Server(app) as url, httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(3) as pool:
        first = pool.submit(c.post, "/v1/images", headers=AUTH, json={"prompt": "a", "seed": 1, "steps": 25})
        wait_until(lambda: batcher.running == 1)
        second = pool.submit(c.post, "/v1/images", headers=AUTH, json={"prompt": "b", "seed": 2, "steps": 2})
        wait_until(lambda: batcher.waiting == 1)
        r = c.post("/v1/images", headers=AUTH, json={"prompt": "c", "seed": 3, "steps": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "5"
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert c.get("/v1/info", headers=AUTH).json()["queue"]["refused"] == 1


def tiny_safety_checker(folder: Path, weight: float) -> Path:
    """A tiny StableDiffusionSafetyChecker whose concept thresholds flag every image (weight < -1)
    or none (weight > 1): cosine similarities lie in [-1, 1]."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 100},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(cfg)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(weight)
        checker.special_care_embeds_weights.fill_(weight)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_safety_filter_withholds_flagged_images(engine, tmp_path):
    from runner.serve.engine import SafetyFilter

    try:
        engine.safety = SafetyFilter(str(tiny_safety_checker(tmp_path / "flag-all", -2.0)))
        with Server(app_for(engine)) as url, httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/v1/info", headers=AUTH).json()["safety_filter"] is True
            r = c.post("/v1/images", headers=AUTH, json={"prompt": "p", "seed": 1, "steps": 2})
            assert r.status_code == 400 and r.json()["error"]["code"] == "content_filtered"
        engine.safety = SafetyFilter(str(tiny_safety_checker(tmp_path / "flag-none", 2.0)))
        with Server(app_for(engine)) as url, httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/images", headers=AUTH, json={"prompt": "p", "seed": 1, "steps": 2})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        engine.safety = None


def test_video_job_with_the_tiny_video_model(engine):
    """A clip from a given image, and one from the character generated first (builtin:tiny-ltx)."""
    import av

    still = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 90, 60)).save(still, format="PNG")
    body = {"prompt": "turns the head", "seed": 5, "steps": 2, "frames": 9, "fps": 8, "width": 64, "height": 64}
    engine.target.video = {"model": "builtin:tiny-ltx", "steps": 2}
    try:
        with Server(app_for(engine)) as url, httpx.Client(base_url=url, timeout=300) as c:
            assert c.get("/v1/info", headers=AUTH).json()["video"]["available"] is True
            import base64

            r = c.post("/v1/videos", headers=AUTH,
                       json={**body, "image_base64": base64.b64encode(still.getvalue()).decode()})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "video/mp4"
            with av.open(io.BytesIO(r.content)) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
            r = c.post("/v1/videos", headers=AUTH, json=body)  # the character first, then the motion
            assert r.status_code == 200 and len(r.content) > 100
            r = c.post("/v1/videos", headers=AUTH, json={**body, "frames": 12})
            assert r.status_code == 422 and "frames must be" in r.json()["error"]["message"]
            r = c.post("/v1/videos", headers=AUTH, json={**body, "image_base64": "not base64!"})
            assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "image_base64"
    finally:
        engine.target.video = None


# ----------------------------------------------------------------------------- body limits, JSON errors


class _NoModelEngine:
    """Enough of an engine for requests that are refused before any generation."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.target = SimpleNamespace(character="hero", trigger="hrochr", class_word="man", resolution=64)

    def run_batch(self, jobs):  # pragma: no cover - never reached by these requests
        raise AssertionError("no request in these tests reaches the model")


@pytest.fixture(scope="module")
def small_limit_server():
    from runner.serve.app import create_app

    app = create_app(_NoModelEngine(), token=TOKEN, max_body_bytes=2048)
    with Server(app) as url:
        yield url


@pytest.mark.parametrize("size", [2049, 4096, 100_000, 3 * 2**20])
@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_the_limit_get_413_with_or_without_content_length(small_limit_server, size, chunked):
    body = json.dumps({"prompt": "x" * size}).encode()

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    with httpx.Client(base_url=small_limit_server, timeout=30) as c:
        r = c.post("/v1/images", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunks() if chunked else body)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "payload_too_large"
    assert "2048 bytes" in err["message"] and "generate.api.max_body_bytes" in err["message"]


def test_bodies_under_the_limit_pass_the_cap(small_limit_server):
    with httpx.Client(base_url=small_limit_server, timeout=30) as c:
        # chunked, under the cap: reaches validation (422), not 413
        r = c.post("/v1/images", headers={**AUTH, "Content-Type": "application/json"},
                   content=iter([b'{"prompt": "', b"x" * 500, b'", "steps": 0}']))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "steps"


def test_the_default_limit_comes_from_the_schema():
    from runner.serve import api_default
    from runner.serve.app import create_app

    app = create_app(_NoModelEngine(), token=None)
    assert app.state.max_body_bytes == api_default("max_body_bytes") == 16 * 2**20


def _broken_json_docs():
    """(document, offset of the first error as json.loads reports it) for many kinds of breakage."""
    good = '{\n  "prompt": "a portrait",\n  "seed": 7,\n  "steps": 3\n}'
    docs = [
        good.replace('"seed": 7,', '"seed": 7'),     # missing comma
        good.replace('"steps": 3', '"steps": '),      # missing value
        good.replace('"prompt"', "prompt"),           # unquoted key
        good[:-2],                                    # truncated
        good.replace(": 7", ": 07"),                  # leading zero
        good + "\n  garbage",                         # trailing data
        "",                                           # nothing at all (with a JSON content type)
        "\n\n\n   {",
        '{"prompt": "tab\there"}',                    # control character in a string
    ]
    out = []
    for d in docs:
        try:
            json.loads(d)
        except json.JSONDecodeError as exc:
            out.append((d, exc))
    assert len(out) >= 8
    return out


def test_malformed_json_is_placed_by_line_and_column_not_named_as_a_field(small_limit_server):
    with httpx.Client(base_url=small_limit_server, timeout=30) as c:
        for doc, exc in _broken_json_docs():
            r = c.post("/v1/images", headers={**AUTH, "Content-Type": "application/json"}, content=doc.encode())
            if not doc:  # an empty body is "field required", not a syntax error
                assert r.status_code == 422
                continue
            assert r.status_code == 422, (doc, r.text)
            err = r.json()["error"]
            (d,) = err["details"]
            assert d["field"] == "body", (doc, d)  # never the offset as if it were a field name
            assert (d["line"], d["column"], d["char"]) == (exc.lineno, exc.colno, exc.pos), (doc, d)
            assert f"line {exc.lineno}, column {exc.colno}" in err["message"]
            assert exc.msg in err["message"]


# (headers, body): bodies the API cannot read as JSON, each answered 415 with what to send
_UNREADABLE = [
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, "gzip"),
    ({"Content-Type": "application/json", "Content-Encoding": "br"}, "raw"),
    ({"Content-Type": "application/json; charset=latin-1"}, "raw"),
    ({"Content-Type": 'application/json; charset="UTF-16"'}, "raw"),
    ({"Content-Type": "text/plain"}, "raw"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, "raw"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, "raw"),
    ({}, "raw"),
]


@pytest.mark.parametrize("headers,encode", _UNREADABLE, ids=[str(h) for h, _ in _UNREADABLE])
def test_bodies_that_are_not_json_get_415_saying_what_to_send(small_limit_server, headers, encode):
    import gzip

    body = json.dumps({"prompt": "a portrait", "steps": 0}).encode()
    with httpx.Client(base_url=small_limit_server, timeout=30) as c:
        r = c.post("/v1/images", headers={**AUTH, **headers}, content=gzip.compress(body) if encode == "gzip" else body)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_media_type" and "Content-Type: application/json" in err["message"]


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                   "application/merge-patch+json"])
def test_json_bodies_pass_the_media_type_check(small_limit_server, ctype):
    body = json.dumps({"prompt": "a portrait", "steps": 0}).encode()
    with httpx.Client(base_url=small_limit_server, timeout=30) as c:
        r = c.post("/v1/images", headers={**AUTH, "Content-Type": ctype}, content=body)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "steps", r.text
