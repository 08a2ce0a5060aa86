"""The typed views the trainer, the video pipeline and the stages read (runner.spec.config classes).

Node configs stay the dicts expand() builds (they are the cache keys); each stage reads them
through a typed view. These tests plan real specs and check that every node config of those
stages reads back through its view without losing or changing a value, and that the trainer and
the pipeline keep no defaults of their own.
"""

import ast
import json
import shutil
from pathlib import Path

import pytest

from runner.spec.config import schema_default, to_plain

ROOT = Path(__file__).resolve().parents[1]


def _views():
    from runner.diffusion.trainer import TrainerConfig
    from runner.stages.analyze import AnalyzeNode
    from runner.stages.caption import CaptionNode
    from runner.stages.export import ExportNode
    from runner.stages.extract import ExtractNode
    from runner.stages.ingest import IngestNode

    return {"train": TrainerConfig, "caption": CaptionNode, "export": ExportNode, "ingest": IngestNode,
            "analyze": AnalyzeNode, "extract": ExtractNode}


@pytest.fixture(scope="module")
def full_spec(tmp_path_factory, shared_data: Path) -> Path:
    """A spec that reaches every branch of those stages' node configs: image and video sources,
    references, shot targets (extract), identity crops with matting, regularization, variants."""
    root = tmp_path_factory.mktemp("typed")
    (root / "runner.toml").write_text("")
    for folder, names in {"photos": ["obama_01.jpg", "obama_02.jpg"], "refs": ["obama_03.jpg"],
                          "classimgs": ["obama_04.jpg"]}.items():
        (root / folder).mkdir()
        for n in names:
            shutil.copy(shared_data / "faces" / "obama" / n, root / folder / n)
    shutil.copy(shared_data / "video" / "carphone.mp4", root / "clip.mp4")
    spec = root / "full.yaml"
    spec.write_text("""version: 1
character: {name: full, trigger: flchr, class_word: man, references: [refs]}
dataset:
  sources:
    - {images: photos, label: stills, recursive: false}
    - {video: clip.mp4, stride: 3, video_options: {max_per_bucket: 3, tau: 0.5}}
  ingest: {max_side: 1024, format: jpeg}
  analysis: {backend: dlib, workers: 1, upsample: 0}
  curation: {min_face_px: 40, identity_threshold: 0.5}
  shots: {strategy: augment, targets: {close_up: [0.2, 0.5]}}
  extract: {max_per_category: 5, sample_fps: 1}
  captions: {template: "{trigger} {class}, {shot}", extra_tags: [photo]}
  export:
    formats: [kohya, jsonl, identity_crops]
    repeats: 3
    identity_crops: {max_yaw: 40, adapters: [instantid], background: {model: "rembg:u2net"}}
train:
  base_model: builtin:tiny-sd
  resolution: 64
  steps: 10
  regularization: {enabled: true, images: classimgs}
  lr_scheduler: {name: cosine}
  phases: [{name: a, steps: 4}, {name: b, epochs: 1, mix: {close_up: 1}}]
  variants:
    hi: {lora: {rank: 32}}
    te: {lora: {train_text_encoder: true, text_encoder_lr: 5.0e-5}}
hardware: {device: cpu}
""")
    return spec


def _nodes(spec_files):
    from runner.plan.graph import expand_spec
    from runner.spec import load_spec

    for f in spec_files:
        yield from expand_spec(load_spec(f, require_files=False))


def _same(value, got, where):
    """Every value of the node config is in the view, unchanged and of the same JSON type (the view
    adds the keys the config leaves out: None or the default)."""
    if isinstance(value, dict):
        assert isinstance(got, dict), where
        for k, v in value.items():
            _same(v, got[k], f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(value), where
        for i, (v, g) in enumerate(zip(value, got)):
            _same(v, g, f"{where}[{i}]")
    else:
        assert value == got and type(value) is type(got), f"{where}: {value!r} -> {got!r}"


def test_every_node_config_reads_back_through_its_typed_view(full_spec):
    views = _views()
    seen = set()
    for node in _nodes([full_spec, *sorted((ROOT / "specs").glob("*.yaml"))]):
        view = views.get(node.kind)
        if view is None:
            continue
        typed = view.from_dict(node.config)  # an undeclared key would be a ConfigError
        for key, value in node.config.items():
            _same(value, to_plain(getattr(typed, key)), f"{node.id}.{key}")
        seen.add(node.kind)
    assert seen == set(views), f"no node of {set(views) - seen} was planned"


def _config_reads(path: Path) -> list[int]:
    """Lines that read a config by a string key: cfg/config/opts(.get)("key"), self.cfg[...]."""
    names = {"cfg", "config", "opts"}

    def is_config(n):
        return (isinstance(n, ast.Name) and n.id in names) or (
            isinstance(n, ast.Attribute) and n.attr in names and isinstance(n.value, ast.Name) and n.value.id == "self")

    lines = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load) and is_config(n.value) \
                and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str):
            lines.append(n.lineno)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" \
                and is_config(n.func.value) and n.args and isinstance(n.args[0], ast.Constant):
            lines.append(n.lineno)
    return lines


@pytest.mark.parametrize("module", ["runner/diffusion/trainer.py", "runner/video/pipeline.py",
                                    "runner/stages/train.py"])
def test_no_string_key_config_reads_and_no_defaults_of_their_own(module):
    assert _config_reads(ROOT / module) == []


def test_the_trainer_reads_the_schema_defaults():
    from runner.diffusion.trainer import TrainerConfig
    from runner.stages.train import train_config

    t = TrainerConfig.from_dict(train_config({}, character="c", trigger="t", class_word="w"))
    assert (t.max_grad_norm, t.lr_scheduler.name, t.mixed_precision) == (
        schema_default("train", "max_grad_norm"), schema_default("train", "lr_scheduler", "name"),
        schema_default("train", "mixed_precision"))
    assert (t.character, t.trigger, t.class_word, t.variant, t.device) == ("c", "t", "w", None, "auto")


# The pipeline's option names for the spec's dataset.sources[] keys (the rest are video_options').
SPEC_NAMES = {"people": ("people",), "stride": ("stride",), "anchors_max": ("video_options", "anchors"),
              "challenge_max": ("video_options", "challenge")}
TUNABLES = {"smoothing", "min_track_observations", "stop_window"}


def test_pipeline_options_default_to_the_schema():
    from dataclasses import fields

    from runner.video.pipeline import DEFAULTS, PipelineOptions

    for f in fields(PipelineOptions):
        if f.name in TUNABLES:
            continue
        path = SPEC_NAMES.get(f.name, ("video_options", f.name))
        assert to_plain(f.default) == schema_default("dataset", "sources", "[]", *path), f.name
    assert list(DEFAULTS) == [f.name for f in fields(PipelineOptions)]
    assert DEFAULTS["conditioning_ratio"] == [20, 70, 10] and json.dumps(DEFAULTS)


def test_pipeline_options_refuse_an_unknown_name_and_keep_none_as_default():
    from runner.video.pipeline import PipelineOptions, resolve_options

    with pytest.raises(ValueError, match="unknown option 'strid'"):
        resolve_options({"strid": 2})
    opts = resolve_options({"stride": None, "tau": None, "max_per_bucket": 4})
    assert (opts.stride, opts.tau, opts.max_per_bucket) == (PipelineOptions().stride, None, 4)
    assert resolve_options(opts) is opts
