"""`runner publish`: versions uploaded to a local S3-compatible server (moto in server mode on
127.0.0.1, started here; credentials only in this test's environment) and to a file:// folder,
through the same fsspec code. The workspace holds a train output (two checkpoints, diffusers and
kohya files) and an evaluation grid laid out as those stages write them, and a report."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.engine.workspace import Workspace
from test_serve import free_port, promote

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "releases"
SECRET = "publish-test-secret-0123456789"
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
{extra}"""
STEPS = (5, 10)
SCALES = (0.8, 1.0)


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    """A moto S3 server on a free port of 127.0.0.1, with the bucket; stopped at the end."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit {proc.poll()})") from exc
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=url, aws_access_key_id="test-key", aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Credentials and endpoint in the environment only (nothing from ~/.aws or an instance)."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    return moto_endpoint


def s3fs_client(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key="test-key", secret=SECRET, endpoint_url=endpoint, skip_instance_cache=True)


def _promote(ws: Workspace, stage_id: str, build) -> None:
    promote(ws, stage_id, hashlib.sha256(stage_id.encode()).hexdigest(), build)


def _train(tmp: Path) -> dict:
    lora = tmp / "lora"
    cks = []
    for i, step in enumerate(STEPS):
        folder = lora / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(3000 + 100 * i))
        (folder / f"hero_s{step}.safetensors").write_bytes(os.urandom(2000 + 100 * i))
        cks.append({"step": step, "phase": "main", "val_loss": None, "samples": [],
                    "diffusers": f"{folder.name}/pytorch_lora_weights.safetensors",
                    "kohya": f"{folder.name}/hero_s{step}.safetensors"})
    (lora / "index.json").write_text(json.dumps({
        "base_model": "builtin:tiny-sd", "model_family": "sd15", "resolution": 64, "trigger": "hrochr",
        "class_word": "man", "variant": None, "tiny_random_model": True, "final": 1, "checkpoints": cks}))
    return {"lora": "lora"}


def _cells() -> list[dict]:
    return [{"cell": f"s{step}_x{scale:g}", "step": step, "checkpoint_index": i, "lora_scale": scale,
             "overall": {"face_similarity": 0.5 + step / 100 + scale / 10, "clip_t": 0.2 + scale / 100,
                         "no_face_rate": 0.0},
             "score": round(step / 10 + scale, 3), "targets_passed": 1, "targets_total": 2}
            for i, step in enumerate(STEPS) for scale in SCALES]


def _evaluation(train_root: Path):
    def build(tmp: Path) -> dict:
        ev = tmp / "evaluation"
        (ev / "best").mkdir(parents=True)
        src = train_root / "step-000010" / "pytorch_lora_weights.safetensors"
        (ev / "best" / src.name).write_bytes(src.read_bytes())
        (ev / "evaluation.json").write_text(json.dumps({
            "format": 1, "character": "hero", "base_model": "builtin:tiny-sd", "model_family": "sd15",
            "generation": {"steps": 4, "guidance": 5.0, "resolution": 64}, "cells": _cells(),
            "best": {"variant": None, "step": 10, "lora_scale": 0.8, "score": 1.8, "cell": "s10_x0.8",
                     "checkpoint_index": 1, "lora_diffusers": f"best/{src.name}"}}))
        return {"evaluation": "evaluation"}
    return build


def make_project(root: Path, *, evaluate: bool = True, train: bool = True, extra: str = "") -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "photos").mkdir()
    (root / "runner.toml").write_text("")
    spec = root / "specs" / "hero.yaml"
    spec.write_text(SPEC.format(extra=extra))
    if not train:
        return spec
    ws = Workspace(root)
    try:
        _promote(ws, "hero:train", _train)
        train_root = ws.load_outputs(hashlib.sha256(b"hero:train").hexdigest())["lora"].path
        if evaluate:
            _promote(ws, "hero:evaluate", _evaluation(Path(train_root)))
    finally:
        ws.close()
    (root / "reports" / "hero").mkdir(parents=True)
    (root / "reports" / "hero" / "latest.html").write_text("<html>report of run 1</html>")
    return spec


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.output


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Dest:
    """One destination kind: its URL and a reader that is not the code under test."""

    def __init__(self, kind: str, tmp: Path, endpoint: str | None) -> None:
        self.kind = kind
        if kind == "s3":
            self.root = f"{BUCKET}/{tmp.name}"  # one prefix per test: the server lives for the module
            self.fs, self.url = s3fs_client(endpoint), f"s3://{self.root}"
        else:
            import fsspec

            self.fs, self.root = fsspec.filesystem("file"), str(tmp / "published")
            self.url = Path(self.root).as_uri()

    def objects(self) -> dict[str, bytes]:
        self.fs.invalidate_cache()
        try:
            names = self.fs.find(self.root)
        except FileNotFoundError:
            return {}
        return {n[len(self.root.rstrip("/")) + 1:]: self.fs.cat_file(n) for n in names}


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.slow), "file"])  # s3: a moto server, seconds
def dest(request, tmp_path):
    endpoint = request.getfixturevalue("s3_env") if request.param == "s3" else None
    return Dest(request.param, tmp_path, endpoint)


def test_publish_is_content_addressed_idempotent_and_never_overwrites(dest, tmp_path):
    spec = make_project(tmp_path / "proj")
    code, out = run("publish", str(spec), "--to", dest.url, "--tag", "v1")
    assert code == 0, out
    assert "published hero v1: best of hero:evaluate: step 10 at LoRA scale 0.8" in out
    objs = dest.objects()
    manifest = json.loads(objs["hero/versions/v1/manifest.json"])
    # every file is a blob named by its hash, with its size; the download matches
    roles = {f["role"]: f for f in manifest["files"]}
    assert set(roles) == {"lora", "lora_kohya", "metadata", "evaluation", "report", "spec"}
    for f in manifest["files"]:
        blob = objs[f"hero/{f['blob']}"]
        assert f["blob"] == f"blobs/sha256/{f['sha256']}" and _sha(blob) == f["sha256"] and len(blob) == f["size"]
    blobs = {k for k in objs if k.startswith("hero/blobs/sha256/")}
    assert blobs == {f"hero/blobs/sha256/{f['sha256']}" for f in manifest["files"]}
    train_ck = next((tmp_path / "proj" / ".runner" / "store").glob("*/lora/step-000010"))
    assert roles["lora"]["sha256"] == _sha((train_ck / "pytorch_lora_weights.safetensors").read_bytes())
    assert roles["lora_kohya"]["sha256"] == _sha((train_ck / "hero_s10.safetensors").read_bytes())
    assert roles["report"]["sha256"] == _sha(b"<html>report of run 1</html>")
    meta = json.loads(objs[f"hero/{roles['metadata']['blob']}"])
    assert meta["trigger"] == "hrochr" and meta["base_model"] == "builtin:tiny-sd" and meta["step"] == 10
    best = next(c for c in _cells() if c["cell"] == "s10_x0.8")
    assert manifest["checkpoint"]["step"] == 10 and manifest["checkpoint"]["lora_scale"] == 0.8
    assert manifest["metrics"] == {**best["overall"], "score": best["score"], "targets_passed": 1, "targets_total": 2}
    assert manifest["tag"] == "v1" and manifest["spec"]["digest"].startswith("sha256:")
    assert manifest["content_digest"].startswith("sha256:") and manifest["runner_version"] and manifest["created"]
    assert "git" in manifest
    assert SECRET not in json.dumps(manifest) and SECRET not in out

    # the same content again: a no-op that says so, nothing written
    code, out = run("publish", str(spec), "--to", dest.url, "--tag", "v1")
    assert code == 0 and "already published with this content" in out and "nothing to do" in out, out
    assert dest.objects() == objs

    # a changed artifact under the same tag: refused, exit 4, the tag named, nothing overwritten
    (tmp_path / "proj" / "reports" / "hero" / "latest.html").write_text("<html>report of run 2</html>")
    code, out = run("publish", str(spec), "--to", dest.url, "--tag", "v1")
    assert code == 4, out
    assert "hero v1 is already published" in out and "report.html changed" in out and "new tag" in out
    assert dest.objects() == objs

    # under a new tag only the changed file is sent; the blobs it shares are not
    code, out = run("publish", str(spec), "--to", dest.url, "--tag", "v2")
    assert code == 0 and "1 file(s) uploaded, 5 already stored" in out, out
    after = dest.objects()
    assert {k: v for k, v in after.items() if k in objs} == objs and len(after) == len(objs) + 2

    # --list: both versions with checkpoint, metrics and digest; JSON too
    code, out = run("publish", str(spec), "--list", "--to", dest.url)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("hero ")]
    assert [line.split()[1] for line in lines] == ["v1", "v2"]
    assert "step 10 @ 0.8" in lines[0] and manifest["content_digest"][:19] in lines[0]
    assert "face_similarity=0.680" in lines[0]
    code, out = run("publish", "--list", "--json", "--to", dest.url)
    rows = json.loads(out)
    assert [(r["character"], r["tag"]) for r in rows] == [("hero", "v1"), ("hero", "v2")]
    assert rows[0]["digest"] == manifest["content_digest"] and rows[0]["metrics"]["score"] == best["score"]


def test_reviewer_pick_and_checkpoint_option_choose_what_is_published(tmp_path):
    spec = make_project(tmp_path / "proj")
    url = (tmp_path / "out").as_uri()
    train_ck = next((tmp_path / "proj" / ".runner" / "store").glob("*/lora/step-000005"))
    lora5 = train_ck / "pytorch_lora_weights.safetensors"
    spec.with_name("hero.review.yaml").write_text(
        "format: 1\ncheckpoints:\n  hero:evaluate: {step: 5, lora_scale: 1.0, lora_sha256: "
        + _sha(lora5.read_bytes()) + "}\n")
    code, out = run("publish", str(spec), "--to", url, "--tag", "picked")
    assert code == 0 and "reviewer's pick for hero:evaluate: step 5" in out, out
    m = json.loads((tmp_path / "out" / "hero" / "versions" / "picked" / "manifest.json").read_text())
    assert m["checkpoint"]["picked_by_reviewer"] and m["checkpoint"]["step"] == 5 and m["checkpoint"]["cell"] == "s5_x1"
    assert m["metrics"]["score"] == next(c["score"] for c in _cells() if c["cell"] == "s5_x1")
    assert {f["role"]: f["sha256"] for f in m["files"]}["lora"] == _sha(lora5.read_bytes())
    # --checkpoint last: the final train checkpoint, metrics at the LoRA scale it is served at
    code, out = run("publish", str(spec), "--to", url, "--tag", "last", "--checkpoint", "last")
    assert code == 0, out
    m = json.loads((tmp_path / "out" / "hero" / "versions" / "last" / "manifest.json").read_text())
    assert m["checkpoint"]["step"] == 10 and m["checkpoint"]["cell"] == "s10_x1"
    assert not m["checkpoint"]["picked_by_reviewer"]
    # a LoRA file from elsewhere: published without a step or metrics
    other = tmp_path / "proj" / "mine.safetensors"
    other.write_bytes(b"not from this workspace")
    code, out = run("publish", str(spec), "--to", url, "--tag", "file", "--checkpoint", "mine.safetensors")
    assert code == 0, out
    m = json.loads((tmp_path / "out" / "hero" / "versions" / "file" / "manifest.json").read_text())
    assert m["checkpoint"]["step"] is None and m["metrics"] == {}
    assert "lora_kohya" not in {f["role"] for f in m["files"]}


def test_nothing_to_publish_and_bad_requests_exit_non_zero(tmp_path):
    url = (tmp_path / "out").as_uri()
    bare = make_project(tmp_path / "bare", train=False)
    code, out = run("publish", str(bare), "--to", url, "--tag", "v1")
    assert code == 2 and "nothing to publish for hero" in out and "runner apply" in out, out
    trained = make_project(tmp_path / "trained", evaluate=False)
    code, out = run("publish", str(trained), "--to", url, "--tag", "v1")
    assert code == 2 and "no best checkpoint" in out and "--checkpoint last" in out, out
    code, out = run("publish", str(trained), "--to", url)
    assert code == 2 and "no version tag" in out, out
    code, out = run("publish", str(trained), "--to", url, "--tag", "../v1")
    assert code == 2 and "tag '../v1'" in out, out
    code, out = run("publish", str(trained), "--tag", "v1")
    assert code == 2 and "no destination" in out, out
    code, out = run("publish", str(trained), "--to", "s3://AKIAX:hunter2@bucket/p", "--tag", "v1")
    assert code == 2 and "credentials" in out and "hunter2" not in out and "AKIAX" not in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # s3: the moto server, seconds
def test_spec_defaults_and_a_spec_with_credentials_in_the_url(tmp_path, s3_env, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from the spec, then from the flag
    spec = make_project(tmp_path / "proj", extra=f"publish: {{to: 's3://{BUCKET}/spec-default', tag: v7, "
                                                 f"endpoint_url: '{s3_env}'}}\n")
    code, out = run("publish", str(spec))
    assert code == 0 and "published hero v7" in out, out
    assert s3fs_client(s3_env).exists(f"{BUCKET}/spec-default/hero/versions/v7/manifest.json")
    code, out = run("publish", "--list", "--json", "--to", f"s3://{BUCKET}/spec-default", "--endpoint-url", s3_env)
    assert code == 0 and [r["tag"] for r in json.loads(out)] == ["v7"], out
    spec.write_text(SPEC.format(extra="publish: {to: 's3://key:secret@bucket/p'}\n"))
    from runner.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(spec)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "hero.yaml:12:" in err and "publish.to" in err and "credentials" in err, err


@pytest.mark.slow  # s3: the moto server, seconds
def test_missing_credentials_and_missing_bucket_are_clear(tmp_path, s3_env, monkeypatch):
    spec = make_project(tmp_path / "proj")
    code, out = run("publish", str(spec), "--to", "s3://no-such-bucket/p", "--tag", "v1")
    assert code == 1 and "no-such-bucket" in out and "Traceback" not in out, out
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    code, out = run("publish", str(spec), "--to", f"s3://{BUCKET}/nocreds", "--tag", "v1")
    assert code == 1 and "AWS_ACCESS_KEY_ID" in out and "Traceback" not in out, out


def test_manifest_write_is_create_only_on_both_backends(dest):
    """The last write of a version never replaces one that appeared meanwhile (another machine)."""
    from runner.publish.store import Store

    store = Store(dest.url)
    path = store.manifest_path("hero", "v1")
    store.create_only(path, b'{"first": true}')
    with pytest.raises(FileExistsError):
        store.create_only(path, b'{"second": true}')
    assert json.loads(dest.fs.cat_file(path)) == {"first": True}
    assert [k for k in dest.objects() if "tmp-" in k] == []


def test_a_version_that_appears_during_the_upload_is_not_replaced(tmp_path, monkeypatch):
    """Another machine writes the tag between our check and our manifest write: the create-only
    write fails, and the outcome is the same as if it had been there first."""
    from runner import publish as P
    from runner.publish.store import Store
    from runner.spec import load_spec

    spec = load_spec(make_project(tmp_path / "proj"))
    url = (tmp_path / "out").as_uri()
    first = P.publish(spec, url, "v1")
    path = Path(first.url.removeprefix("file://"))
    real_read = Store.read_json
    calls = []

    def absent_at_first(self, p):  # the check before uploading sees nothing
        calls.append(p)
        return None if len(calls) == 1 else real_read(self, p)

    monkeypatch.setattr(Store, "read_json", absent_at_first)
    again = P.publish(spec, url, "v1")
    assert again.unchanged and len(calls) == 2
    (tmp_path / "proj" / "reports" / "hero" / "latest.html").write_text("changed")
    before = path.read_bytes()
    calls.clear()
    with pytest.raises(P.VersionExists, match="hero v1 is already published"):
        P.publish(spec, url, "v1")
    assert path.read_bytes() == before


def test_git_commit_and_dirty_flag_are_provenance_not_content(tmp_path):
    """The manifest names the spec repository's commit and whether it was dirty; neither is part
    of the content digest, so an unrelated commit does not make the same version 'different'."""
    spec = make_project(tmp_path / "proj")
    proj = tmp_path / "proj"
    (proj / ".gitignore").write_text(".runner/\nreports/\n")
    (proj / "notes.txt").write_text("one\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(proj), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    url = (tmp_path / "out").as_uri()
    assert run("publish", str(spec), "--to", url, "--tag", "v1")[0] == 0
    m1 = json.loads((tmp_path / "out" / "hero" / "versions" / "v1" / "manifest.json").read_text())
    assert m1["git"] == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (proj / "notes.txt").write_text("two\n")  # a tracked file edited: dirty
    code, out = run("publish", str(spec), "--to", url, "--tag", "v1")
    assert code == 0 and "already published with this content" in out, out
    assert run("publish", str(spec), "--to", url, "--tag", "v2")[0] == 0
    m2 = json.loads((tmp_path / "out" / "hero" / "versions" / "v2" / "manifest.json").read_text())
    assert m2["git"] == {"commit": m1["git"]["commit"], "dirty": True}
    assert {k: v for k, v in m2.items() if k not in ("tag", "git", "created", "content_digest")} == \
        {k: v for k, v in m1.items() if k not in ("tag", "git", "created", "content_digest")}


@pytest.mark.parametrize("error", [RuntimeError, PermissionError, FileNotFoundError])
def test_storage_errors_never_echo_credentials(tmp_path, monkeypatch, error):
    from runner.publish.store import Store, StoreError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    store = Store((tmp_path / "out").as_uri())

    def leaky(*a, **k):
        raise error(f"request signed with AKIAEXAMPLEKEY / {SECRET} was refused")

    with pytest.raises(StoreError) as exc:
        store.call("uploading x", leaky)
    assert "AKIAEXAMPLEKEY" not in str(exc.value) and SECRET not in str(exc.value) and "***" in str(exc.value)
