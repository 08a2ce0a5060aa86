"""Export layouts, checked against what each trainer's own loader reads.

- kohya: folders per repeat count, and a dataset_config.toml whose bucket keys are the trainer's
  (one BucketSettings for both) over a walk of resolutions, bucket settings and models; the file
  also goes through sd-scripts' own config_util (ConfigSanitizer + BlueprintGenerator) when a copy
  of sd-scripts is found (SD_SCRIPTS_DIR, see tests/README.md).
- plain: every image once below plain/ (walked as ai-toolkit walks a folder_path), concepts.json
  with OneTrainer's ConceptConfig fields (loaded by OneTrainer's own ConceptConfig when
  ONETRAINER_DIR points at a checkout), ai-toolkit.yaml datasets entries.
- publish: runner apply copies the export out of the store; a tool writing its caches into the
  published folders leaves the store unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import export
from runner.stages.train import train_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import two_photo_project  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def make_dataset(folder: Path, repeats=(1, 3, 3)) -> list[dict]:
    folder.mkdir()
    recs = []
    for i, reps in enumerate(repeats):
        rid = f"{i:016x}"
        shot = "close_up" if reps == 1 else "full_body"
        Image.new("RGB", (64, 80), (i * 40, 90, 120)).save(folder / f"{rid}.png")
        (folder / f"{rid}.txt").write_text(f"zq man, {shot}\n")
        recs.append({"id": rid, "image": f"{rid}.png", "caption": f"zq man, {shot}", "shot": shot, "categories": [shot],
                     "repeats": reps, "parent": None, "width": 64, "height": 80, "source": f"p/{i}.jpg"})
    (folder / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def export_config(train: dict | None = None, **over) -> dict:
    """The export node's config as the planner builds it (train defaults filled from the schema)."""
    tc = train_config(train or {}, character="hero", trigger="zq", class_word="man")
    cfg = {"formats": ["kohya", "plain", "jsonl"], "repeats": 4, "trigger": "zq", "class_word": "man",
           "resolution": tc["resolution"], "buckets": tc["buckets"],
           "base_model": tc["base_model"] if train is not None else None, "model_family": tc["model_family"]}
    return {**cfg, **over}


def run_export(tmp_path: Path, cfg: dict, repeats=(1, 3, 3)) -> Path:
    if not (tmp_path / "ds").exists():
        make_dataset(tmp_path / "ds", repeats)
    ctx = LocalStageContext.for_folder(tmp_path / "x", character="hero")
    ctx.cache_dir = Path(os.environ.get("CHARACTER_RUNNER_CACHE", tmp_path / "cache"))
    return export.run(cfg, {"dataset": contract.Artifact("dataset", tmp_path / "ds")}, ctx)["export"].path


def ai_toolkit_images(folder: Path) -> list[Path]:
    """The files ai-toolkit trains on for folder_path=folder: a recursive walk that skips hidden
    folders and files and _controls folders (toolkit/data_loader.py)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if Path(root).name == "_controls":
            continue
        found += [Path(root) / f for f in files if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return found


def test_kohya_folders_per_repeat_count(tmp_path: Path) -> None:
    out = run_export(tmp_path, export_config(formats=["kohya", "jsonl"], resolution=768))
    assert sorted(p.name for p in (out / "kohya" / "img").iterdir()) == ["12_zq man", "4_zq man"]
    assert len(list((out / "kohya" / "img" / "12_zq man").glob("*.png"))) == 2
    conf = tomllib.loads((out / "kohya" / "dataset_config.toml").read_text())
    assert conf["datasets"][0]["resolution"] == 768
    assert {s["num_repeats"] for s in conf["datasets"][0]["subsets"]} == {4, 12}
    assert not (out / "plain").exists()
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all((out / m["file_name"]).exists() for m in meta)
    assert all(not any(k.startswith("_") for k in m) for m in meta)


BUCKET_CASES = [
    (None, {}),  # no train section: schema defaults, SD 1.x multiple
    ({}, {}),
    ({"resolution": 1024, "buckets": {"min_side": 512, "max_side": 1536, "step": 32}}, {}),
    ({"resolution": 768, "buckets": {"min_side": 300, "max_side": 1000, "step": 48}}, {}),
    ({"resolution": 520, "buckets": {"min_side": 256, "max_side": 512, "step": 64}}, {}),  # max below resolution
    ({"resolution": 128, "buckets": {"min_side": 256, "max_side": 2048, "step": 64}}, {}),  # min above resolution
    ({"resolution": 512, "buckets": {"enabled": False}}, {}),
    ({"base_model": "builtin:tiny-sd", "resolution": 64, "buckets": {"min_side": 32, "max_side": 128, "step": 16}}, {}),
    ({"base_model": "builtin:tiny-sdxl", "resolution": 96, "buckets": {"min_side": 40, "max_side": 200, "step": 12}},
     {}),
]


@pytest.mark.parametrize("train, over", BUCKET_CASES)
def test_dataset_config_carries_the_trainers_buckets(train, over, tmp_path: Path) -> None:
    from runner.diffusion.data import bucket_settings

    cfg = export_config(train, **over)
    out = run_export(tmp_path, cfg)
    ds = tomllib.loads((out / "kohya" / "dataset_config.toml").read_text())["datasets"][0]
    tc = train_config(train or {}, character="hero", trigger="zq", class_word="man")
    multiple = 8 if str(cfg["base_model"]).startswith("builtin:") else 64  # tiny models: VAE 4 x UNet 2
    trained = bucket_settings(tc["resolution"], tc["buckets"], multiple=multiple)
    buckets = trained.buckets()
    # what the trainer uses: the same step, and every bucket side within [min, max]
    assert ds["enable_bucket"] == tc["buckets"]["enabled"]
    assert ds["resolution"] == tc["resolution"]
    if ds["enable_bucket"]:
        assert ds["bucket_reso_steps"] == trained.step
        assert all(b[0] % ds["bucket_reso_steps"] == 0 and b[1] % ds["bucket_reso_steps"] == 0 for b in buckets)
        assert ds["min_bucket_reso"] == min(min(b) for b in buckets) or ds["min_bucket_reso"] == trained.min_side
        assert max(max(b) for b in buckets) <= ds["max_bucket_reso"]
        # what sd-scripts asserts (train_util.adjust_min_max_bucket_reso_by_steps, verify_bucket_reso_steps)
        assert ds["min_bucket_reso"] <= ds["resolution"] <= ds["max_bucket_reso"]
        assert ds["min_bucket_reso"] % ds["bucket_reso_steps"] == 0 == ds["max_bucket_reso"] % ds["bucket_reso_steps"]
        if not str(cfg["base_model"]).startswith("builtin:"):
            assert ds["bucket_reso_steps"] % 64 == 0  # sd-scripts: SD 1.x needs multiples of 64


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_dataset_config_equals_the_trainers_own_settings(model: str, tmp_path: Path) -> None:
    """The trainer's buckets come from the loaded model; the export's from its config files."""
    pytest.importorskip("diffusers")
    from runner.diffusion.trainer import LoraTrainer

    section = {"base_model": model, "resolution": 96, "buckets": {"min_side": 40, "max_side": 200, "step": 12},
               "checkpoints": {"validation_fraction": 0.0}}
    out = run_export(tmp_path, export_config(section))
    ds = tomllib.loads((out / "kohya" / "dataset_config.toml").read_text())["datasets"][0]
    tr = LoraTrainer(train_config(section, character="hero", trigger="zq", class_word="man"),
                     dataset_dir=tmp_path / "ds", out_dir=tmp_path / "o", scratch_dir=tmp_path / "s",
                     cache_dir=Path(os.environ["CHARACTER_RUNNER_CACHE"]), device="cpu")
    tr._load_model()
    tr._prepare_data()
    assert {k: ds[k] for k in tr.bucket_settings.kohya()} == tr.bucket_settings.kohya()
    assert ds["resolution"] == tr.bucket_settings.resolution


SD_SCRIPTS_CHECK = r"""
import argparse, json, sys, types
# config_util imports train_util and utils for dataset classes it does not need to validate and
# resolve a config (they pull in torchvision); stand-ins keep its import light.
utils = types.ModuleType("library.utils"); utils.setup_logging = lambda *a, **k: None
train_util = types.ModuleType("library.train_util")
for name in ("DreamBoothSubset", "FineTuningSubset", "ControlNetSubset", "DreamBoothDataset", "FineTuningDataset",
             "ControlNetDataset", "DatasetGroup"):
    setattr(train_util, name, type(name, (), {}))
import library
sys.modules["library.utils"], sys.modules["library.train_util"] = utils, train_util
from library import config_util
user = config_util.load_user_config(sys.argv[1])
sanitizer = config_util.ConfigSanitizer(True, True, False, True)
bp = config_util.BlueprintGenerator(sanitizer).generate(user, argparse.Namespace())
out = []
for d in bp.dataset_group.datasets:
    p = d.params
    out.append({"is_dreambooth": d.is_dreambooth, "resolution": list(p.resolution), "enable_bucket": p.enable_bucket,
                "bucket_reso_steps": p.bucket_reso_steps, "min_bucket_reso": p.min_bucket_reso,
                "max_bucket_reso": p.max_bucket_reso,
                "subsets": [{"image_dir": s.params.image_dir, "num_repeats": s.params.num_repeats,
                             "class_tokens": s.params.class_tokens, "caption_extension": s.params.caption_extension,
                             "keep_tokens": s.params.keep_tokens} for s in d.subsets]})
print(json.dumps(out))
"""


def sd_scripts_dir() -> Path:
    d = os.environ.get("SD_SCRIPTS_DIR")
    if not d or not (Path(d) / "library" / "config_util.py").is_file():
        pytest.skip("no sd-scripts checkout: set SD_SCRIPTS_DIR to a copy of github.com/kohya-ss/sd-scripts "
                    "kept outside this project (tests/README.md)")
    pytest.importorskip("voluptuous")
    pytest.importorskip("toml")
    return Path(d)


@pytest.mark.parametrize("train", [None,
                                   {"resolution": 1024, "buckets": {"min_side": 512, "max_side": 1536, "step": 32},
                                          "base_model": "builtin:tiny-sdxl"}])
def test_sd_scripts_config_util_reads_the_published_dataset_config(train, tmp_path: Path) -> None:
    root = sd_scripts_dir()
    out = run_export(tmp_path, export_config(train))
    pub = export.publish(out, tmp_path / "published")
    r = subprocess.run([sys.executable, "-c", SD_SCRIPTS_CHECK, str(pub / "kohya" / "dataset_config.toml")],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (ds,) = json.loads(r.stdout.strip().splitlines()[-1])
    summary = json.loads((pub / "export.json").read_text())
    assert ds["is_dreambooth"]
    assert {k: ds[k] for k in summary["kohya"]["buckets"] if k != "bucket_no_upscale"} == \
        {k: v for k, v in summary["kohya"]["buckets"].items() if k != "bucket_no_upscale"}
    assert ds["resolution"] == [summary["resolution"]] * 2
    for s in ds["subsets"]:
        folder = Path(s["image_dir"])
        assert folder.is_absolute() and folder.is_dir() and pub in folder.parents  # the published copy
        assert s["num_repeats"] == int(folder.name.split("_", 1)[0]) and s["class_tokens"] == "zq man"
        assert s["caption_extension"] == ".txt" and s["keep_tokens"] == 1
        assert all(p.with_suffix(".txt").is_file() for p in folder.glob("*.png"))
    assert sum(len(list(Path(s["image_dir"]).glob("*.png"))) for s in ds["subsets"]) == 3


@pytest.mark.parametrize("repeats", [(1, 1, 1), (1, 3, 3), (2, 1, 5, 5)])
def test_plain_folder_holds_each_image_once_with_onetrainer_and_ai_toolkit_configs(repeats, tmp_path: Path) -> None:
    import yaml

    out = run_export(tmp_path, export_config(), repeats=repeats)
    # ai-toolkit pointed at plain/ (or at the whole export) trains each image once
    assert len(ai_toolkit_images(out / "plain")) == len(repeats)
    names = [p.name for p in ai_toolkit_images(out / "plain")]
    assert len(set(names)) == len(names)
    groups = sorted(set(repeats))
    # ai-toolkit.yaml: one datasets entry per repeat group, folders partitioning plain/
    entries = yaml.safe_load((out / "ai-toolkit.yaml").read_text())["datasets"]
    assert sorted(e["num_repeats"] for e in entries) == groups
    assert sum(len(ai_toolkit_images(out / e["folder_path"])) for e in entries) == len(repeats)
    assert all(e["caption_ext"] == "txt" for e in entries)
    # OneTrainer: concepts.json next to plain/, one concept per group, balancing = repeats
    concepts = json.loads((out / "concepts.json").read_text())
    assert (out / "concepts.json").parent == (out / "plain").parent
    assert sorted(c["balancing"] for c in concepts) == [float(g) for g in groups]
    for c in concepts:
        assert c["balancing_strategy"] == "REPEATS" and c["type"] == "STANDARD" and c["__version"] == 2
        assert c["text"]["prompt_source"] == "sample"  # the .txt beside each image
        imgs = list((out / c["path"]).glob("*.png"))
        assert imgs and all(p.with_suffix(".txt").is_file() for p in imgs)
        assert not c["include_subdirectories"]
    assert sum(len(list((out / c["path"]).glob("*.png"))) for c in concepts) == len(repeats)


ONETRAINER_CHECK = r"""
import json, sys
from modules.util.config.ConceptConfig import ConceptConfig
from modules.util.enum.BalancingStrategy import BalancingStrategy
from modules.util.enum.ConceptType import ConceptType
out = []
for c in json.load(open(sys.argv[1])):
    cc = ConceptConfig.default_values().from_dict(c)
    out.append({"path": cc.path, "balancing": cc.balancing, "strategy": str(cc.balancing_strategy),
                "type": str(ConceptType(cc.type)), "prompt_source": cc.text.prompt_source, "name": cc.name,
                "enabled": cc.enabled, "unknown": sorted(set(c) - set(cc.types) - {"__version"})})
print(json.dumps(out))
"""


def test_onetrainer_concept_config_reads_the_published_concepts(tmp_path: Path) -> None:
    d = os.environ.get("ONETRAINER_DIR")
    if not d or not (Path(d) / "modules" / "util" / "config" / "ConceptConfig.py").is_file():
        pytest.skip("no OneTrainer checkout: set ONETRAINER_DIR to a copy of github.com/Nerogar/OneTrainer "
                    "kept outside this project (tests/README.md)")
    out = run_export(tmp_path, export_config(), repeats=(1, 3, 3))
    pub = export.publish(out, tmp_path / "published")
    r = subprocess.run([sys.executable, "-c", ONETRAINER_CHECK, str(pub / "concepts.json")],
                       env={**os.environ, "PYTHONPATH": d}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(c["balancing"] for c in loaded) == [1.0, 3.0]
    for c in loaded:
        assert c["unknown"] == [] and c["strategy"] == "REPEATS" and c["type"] == "STANDARD" and c["enabled"]
        assert c["prompt_source"] == "sample" and Path(c["path"]).is_absolute() and pub in Path(c["path"]).parents
    assert sum(len(list(Path(c["path"]).glob("*.png"))) for c in loaded) == 3


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_published_copy_takes_tool_caches_and_the_store_stays_unchanged(tmp_path: Path) -> None:
    store = tmp_path / "store" / ("k" * 64)
    store.mkdir(parents=True)
    out = run_export(tmp_path, export_config(), repeats=(1, 3, 3))
    shutil.move(str(out), store / "export")
    before = _tree_digest(store)
    dest = tmp_path / "ws" / "exports" / "hero"
    pub = export.publish(store / "export", dest)
    # the published configs point into the copy
    entries = json.loads((pub / "concepts.json").read_text())
    assert all(Path(c["path"]).is_relative_to(dest.resolve()) for c in entries)
    toml = tomllib.loads((pub / "kohya" / "dataset_config.toml").read_text())
    assert all(Path(s["image_dir"]).is_relative_to(dest.resolve()) for s in toml["datasets"][0]["subsets"])
    # what ai-toolkit and sd-scripts write next to the images
    for img in ai_toolkit_images(pub / "plain"):
        (img.parent / "_latent_cache").mkdir(exist_ok=True)
        (img.parent / "_latent_cache" / f"{img.stem}_x.safetensors").write_bytes(b"latents")
    (pub / "plain" / ".aitk_size.json").write_text("{}")
    for img in (pub / "kohya" / "img").rglob("*.png"):
        img.with_suffix(".npz").write_bytes(b"npz")
        with open(img, "r+b") as fh:  # a tool rewriting an image in place must not reach the store
            fh.write(b"\0")
    assert _tree_digest(store) == before
    # the next apply finds the same export published and keeps the caches; a new one replaces it
    export.publish(store / "export", dest)
    assert (pub / "plain" / ".aitk_size.json").is_file()
    other = tmp_path / "store" / ("m" * 64)
    shutil.copytree(store, other)
    export.publish(other / "export", dest)
    assert not (dest / "plain" / ".aitk_size.json").exists() and len(ai_toolkit_images(dest / "plain")) == 3


def test_apply_publishes_the_export_outside_the_store(project: Path, shared_data: Path) -> None:
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    spec = two_photo_project(project, shared_data)
    res = apply([load_spec(spec)], ApplyOptions(only=["export"]), QuietReporter())
    assert res.status == "succeeded", [(r.stage_id, r.error) for r in res.failed]
    pub = project / ".runner" / "exports" / "hero"
    store = project / ".runner" / "store"
    assert len(ai_toolkit_images(pub / "plain")) == 2
    concepts = json.loads((pub / "concepts.json").read_text())
    assert not any(store in Path(c["path"]).parents for c in concepts)
    (pub / "plain" / "_latent_cache").mkdir()
    before = _tree_digest(store)
    res = apply([load_spec(spec)], ApplyOptions(only=["export"]), QuietReporter())  # cached: kept as it is
    assert all(r.status == "cached" for r in res.results) and (pub / "plain" / "_latent_cache").is_dir()
    assert _tree_digest(store) == before


def test_report_section_names_the_published_folder(tmp_path: Path) -> None:
    import jinja2

    from runner.resources import resource_dir

    out = run_export(tmp_path, export_config())
    (sec,) = export.report_sections({}, {"export": contract.Artifact("export", out)}, {"character": {"name": "hero"}})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))), autoescape=True)
    html = env.get_template(sec.template).render(**sec.context)
    assert ".runner/exports/hero/plain" in html and ".runner/exports/hero/concepts.json" in html
    assert "bucket_reso_steps" in html
