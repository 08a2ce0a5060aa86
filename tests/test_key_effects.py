"""Every schema key declares which stage kinds' cache keys it changes, and the planner obeys.

The declaration is the ``"x-affects"`` annotation on each property of schemas/ (a list of stage
kinds, or ``"none"``; see docs/architecture.md, "Cache keys"). This test walks the schema: for
each declared key it takes a full spec that uses every key, changes that one value, expands and
digests both specs, and compares each stage's *own* key components (its keyed config and its
file inputs; upstream stages count by id, not by key, so only direct effects show). The kinds
whose components changed must be exactly the declared ones, plus the report (it prints the
spec), except for keys declared "none": those change no key at all, the report's included.

A new schema key without ``x-affects`` fails here, and so does a declaration the code does not
honour (a price that re-renders clips, a model file whose bytes are not in the key).
"""

from __future__ import annotations

import json
import copy
import shutil
from pathlib import Path
from typing import Any

import pytest

from runner.engine.workspace import Workspace
from runner.plan.graph import expand_spec
from runner.plan.planner import key_components
from runner.spec import load_spec
from runner.spec import schema as S
from runner.spec.resolve import Spec
from runner.stages import registry as stage_registry

FULL_SPEC = """\
$schema: ../schemas/character.schema.json
version: 1
character:
  name: hero
  display_name: Hero
  trigger: hrochr
  class_word: man
  description: a hero of tests
  style: photorealistic
  traits: {fixed: [tall], variable: [hat]}
  references: [../refs]
  canonical_reference: ../refs/r1.jpg
dataset:
  sources:
    - {images: ../photos, label: photos}
    - video: ../clips/clip.mp4
      label: clip
      people: 1
      stride: 5
      video_options: {tau: 0.4}
  curation: {identity_threshold: 0.5}
  shots:
    strategy: augment
    targets: {close_up: [0.2, 0.5], medium: [0.2, 0.5]}
  captions: {model: org/captioner, extra_tags: [photo]}
  export:
    formats: [kohya, plain, jsonl, identity_crops]
    identity_crops: {adapters: [pulid, instantid], background: {model: org/matting, session: u2net}}
train:
  base_model: builtin:tiny-sd
  steps: 20
  lora: {alpha: 8, text_encoder_lr: 0.00005}
  objective: {timestep_sampling: logit_normal, logit_mean: 0.0, logit_std: 1.0, mode_scale: 1.29, shift: 3.0,
              weighting: none, guidance: 1.0}
  memory: {quantize_base: int8, text_encoders: offload, offload_idle: true}
  regularization: {enabled: true, images: ../reg, prompt: a photo of a man}
  phases:
    - {name: first, steps: 10, lr: 0.0002, mix: balanced}
    - {name: second, epochs: 2, mix: {close_up: 0.5, medium: 0.5}}
  variants:
    wide: {lora: {rank: 32}}
  checkpoints: {every_epochs: 2}
train_video:
  base_model: builtin:tiny-wan22-ti2v
  frame_buckets: [1, 17]
  images: {max: 4}
  objective: {timestep_sampling: logit_normal, logit_mean: 0.0, logit_std: 1.0, mode_scale: 1.29, shift: 3.0,
              weighting: none, guidance: 1.0}
  memory: {quantize_base: int8, text_encoders: offload, offload_idle: true}
  phases:
    - {name: first, steps: 10, lr: 0.0002, mix: balanced}
    - {name: second, epochs: 2, mix: {close_up: 0.5, medium: 0.5}}
  variants:
    wide: {lora: {rank: 32}}
  checkpoints: {every_epochs: 2}
evaluate:
  suite:
    categories:
      portrait: {prompts: ["{trigger} {class}, portrait", "{trigger} {class}, headshot"], negative: blurry}
      outdoor: {prompts: ["{trigger} {class}, in a park"]}
  categories: [portrait, outdoor]
  prompts_per_category: 1
  seeds: [1, 2]
  lora_scales: [0.8, 1.0]
  resolution: 64
  targets: {portrait: {face_similarity: ">=0.5"}}
  objective: {maximize: face_similarity, constraints: {clip_t: ">=0.2"}}
  video:
    checkpoints: all
    lora_scales: [0, 0.8, 1.0]
    key_frames: [../refs/r1.jpg]
    seeds: [1]
    targets: {fidelity: ok, min_blinks: 1, not_frozen: true, max_drift: 30}
generate:
  lora_scale: 0.9
  storyboard:
    planner: rules
    story: A hero walks into town. He meets a friend. They share a meal. He rides away at dawn.
    min_scenes: 2
    max_scenes: 3
    scenes:
      - {text: The hero arrives., shot: wide, prompt: "{trigger} arrives", control_image: ../refs/r1.jpg}
      - {text: The hero smiles., shot: close_up}
    style_prompt: watercolor
    width: 64
    height: 64
    validation: {clip_i: 0.5}
    reference_guided:
      enabled: true
      ip_adapter: h94/IP-Adapter
      ip_adapter_weight_name: ip-adapter_sd15.bin
      ip_adapter_subfolder: models
      ip_adapter_image_encoder_folder: models/image_encoder
      controlnet: lllyasviel/sd-controlnet-canny
  video:
    key_frames: [1, 2]
    prompt: the hero waves
    steps: 4
    guidance: 2.0
    image_conditioning: 0.9
    frames: 17
    width: 64
    height: 64
    lora: org/video-lora
    upscale: true
    upsampler: org/upsampler
    prompt_prefix: cinematic
    prompt_suffix: smooth motion
    fidelity: {frames: 3}
    targets: {max_seconds: 60, max_cost: 2.0, gpu: H100}
    suite: builtin
hardware:
  stage_gpu: {train: A100-80GB}
  stage_cpu: {video_identity: {cores: 4.0, memory_gib: 16.0}}
  price_table: {A10G: 1.1}
  gpu_memory_gib: {A10G: 22.0}
  memory_check: warn
  modal: {app_name: hero-app, secrets: [hf]}
report: {title: Hero}
publish: {to: "s3://releases/characters", tag: v1, endpoint_url: "http://127.0.0.1:9000"}
tracking:
  mlflow: {enabled: true, tracking_uri: "http://127.0.0.1:5000", experiment: heroes, artifacts: true}
  wandb: {enabled: true, project: hero, entity: team, mode: offline, artifacts: true}
  tags: {team: vision}
"""

VIDEO_SUITE = """\
cases:
  - {name: wave, prompt: "{trigger} waves"}
  - {name: turn, prompt: "{trigger} turns around"}
"""

# Keys that only matter in some configuration: (key prefix, {other key: value}) applied to both
# specs before the change, so the key's effect can be seen.
CONTEXTS: list[tuple[str, dict[str, Any]]] = [
    ("generate.storyboard.scenes", {"generate.storyboard.planner": "manual"}),
    ("generate.storyboard.llm", {"generate.storyboard.planner": "llm"}),
    ("generate.storyboard.min_scenes", {"generate.storyboard.planner": "llm"}),
    ("generate.storyboard.max_scenes", {"generate.storyboard.planner": "llm"}),
    ("generate.storyboard.style_prompt", {"generate.storyboard.planner": "llm"}),
    ("character.description", {"generate.storyboard.planner": "llm"}),
    ("character.display_name", {"generate.storyboard.planner": "llm"}),
    ("character.traits.variable", {"generate.storyboard.planner": "llm"}),
    ("character.aliases", {"generate.storyboard.planner": "llm"}),
    ("character.pronouns", {"generate.storyboard.planner": "llm"}),
    ("generate.storyboard.short_story", {"generate.storyboard.min_scenes": 5, "generate.storyboard.max_scenes": 6}),
    ("evaluate.suite", {"evaluate.categories": [], "evaluate.targets": {}}),
    ("train.steps", {"train.phases": []}),
    # 2 processes split each step's micro-batches: gradient_accumulation a multiple of 2
    ("hardware.local_processes", {"train.gradient_accumulation": 2}),
    ("train_video.steps", {"train_video.phases": []}),
    ("train_video.model_family", {"train_video.base_model": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}),
    *((f"generate.storyboard.reference_guided.{k}", {"generate.storyboard.reference_guided.control": "pose"})
      for k in ("pose_model", "pose_detector_file", "pose_estimator_file", "pose_parts")),
]

# New values for keys whose change cannot be derived from the schema alone.
CHANGES: dict[str, Any] = {
    "$schema": "../other.schema.json",
    # auto resolves to none / off for the full spec's tiny model: a setting the resolution keeps
    "generate.video.offload": "model",
    "generate.video.vae_tiling": True,
    "character.name": "villain",
    "evaluate.conditions": ["lora", "references"],
    "evaluate.video.checkpoints": "last",
    "evaluate.video.key_frames": ["../refs/r2.jpg"],
    "evaluate.video.prompts": ["the hero smiles"],
    "evaluate.video.frames": 9,
    "evaluate.video.width": 96,
    "evaluate.video.height": 96,
    "evaluate.video.steps": 2,
    "character.references": ["../refs", "../reg"],
    "character.canonical_reference": "../refs/r2.jpg",
    "dataset.sources": "drop-first",
    "dataset.sources.[].video_options.upsample": 2,
    "dataset.sources.[].video_options.tau": 0.3,
    "dataset.sources.[].images": "../reg",
    "dataset.sources.[].video": "../clips/other.mp4",
    "dataset.sources.[].video_options.conditioning_ratio": [30, 60, 10],
    "dataset.sources.[].video_options.general_model": "facebook/dinov2-base",
    "dataset.shots.targets": {"close_up": [0.1, 0.5], "medium": [0.2, 0.5]},
    "dataset.captions.template": "{trigger} {class}, {shot}",
    "dataset.ingest.extensions": [".jpg", ".png"],
    "train.base_model": "builtin:tiny-sdxl",
    "generate.storyboard.validation.face_similarity": 0.8,
    "train.preset": "tiny-demo",
    "train.resolution": 256,
    "train.phases.[].lr": 0.0003,
    "train.regularization.images": "../refs",
    "train.phases": "drop-last",
    "train.phases.[].name": "renamed",
    "train.phases.[].mix": "natural",
    "train.variants": {"wide": {"lora": {"rank": 64}}},
    "train_video.base_model": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "train_video.model_family": "wan22_ti2v",
    "train_video.resolution": 256,
    "train_video.frame_buckets": [1, 9],
    "train_video.lora.alpha": 8,
    "train_video.lora.text_encoder_lr": 0.0001,
    "train_video.lora.target_modules": ["attn1.to_q", "attn1.to_v"],
    "train_video.phases.[].lr": 0.0003,
    "train_video.phases": "drop-last",
    "train_video.phases.[].name": "renamed",
    "train_video.phases.[].mix": "natural",
    "train_video.variants": {"wide": {"lora": {"rank": 64}}},
    "train_video.checkpoints.validation_timesteps": [100, 500],
    "train_video.clips.max_gap": 10,
    "train.lora.target_modules": ["to_q", "to_v"],
    "train.checkpoints.sample_prompts": ["{trigger} {class}, smiling"],
    "train.checkpoints.validation_timesteps": [100, 500],
    "evaluate.preset": "fast-preview",
    "evaluate.suite": "builtin",
    "evaluate.suite.categories": "drop-last",
    "evaluate.suite.categories.<name>.prompts": ["{trigger} {class}, headshot"],
    "evaluate.categories": ["portrait"],
    "evaluate.targets": {"portrait": {"face_similarity": ">=0.6"}},
    "evaluate.objective.maximize": "clip_t",
    "evaluate.objective.constraints": {"clip_t": ">=0.3"},
    "evaluate.insightface_pack": "antelopev2",
    "evaluate.insightface_root": "~/.other-insightface",
    "dataset.analysis.insightface_root": "~/.other-insightface",
    "dataset.analysis.insightface_pack": "antelopev2",
    "generate.checkpoint": "last",
    "generate.base_model": "builtin:tiny-sdxl",
    "generate.storyboard.scenes": "append-copy",
    "generate.storyboard.scenes.[].control_image": "../refs/r2.jpg",
    "generate.storyboard.scenes.[].prompt": "{trigger} arrives at night",
    "generate.storyboard.reference_guided.ip_adapter": "h94/IP-Adapter-2",
    "generate.storyboard.reference_guided.controlnet": "lllyasviel/sd-controlnet-openpose",
    "generate.storyboard.validation.clip_model": "openai/clip-vit-base-patch16",
    "generate.video.preset": "aggressive-quality",
    "generate.video.source": "../refs/r1.jpg",
    "generate.video.key_frames": [1],
    "generate.video.width": 96,
    "generate.video.height": 96,
    "generate.video.suite": None,
    "generate.storyboard.validation.face_model": "dlib",
    "character.aliases": ["the champion"],
    "generate.storyboard.scenes.[].hero": True,
    "generate.video.fidelity.face_model": "dlib",
    "generate.video.targets.gpu": "L40S",
    "hardware.gpu": "T4",
    "hardware.stage_gpu": {"train": "H100"},
    "hardware.stage_backend": {"analyze": "modal", "evaluate": "local"},
    "hardware.stage_cpu": {"analyze": {"cores": 8.0}},
    "hardware.price_table": {"A10G": 2.2},
    "hardware.gpu_memory_gib": {"A10G": 40.0},
    "hardware.budget.max_cost": 25.0,
    "hardware.budget.max_hours": 4.0,
    "hardware.modal.secrets": ["hf", "wandb"],
    "report.output_dir": "other-reports",
    "dataset.export.identity_crops.background.session": "isnet-general-use",
    "dataset.export.identity_crops.background.color": "#000000",
    "tracking.mlflow": True,
    "tracking.mlflow.tracking_uri": "sqlite:///mlflow.db",
    "tracking.wandb": False,
    "tracking.tags": {"team": "graphics"},
}


# --------------------------------------------------------------------------- the full project


@pytest.fixture(scope="module")
def full_project(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("keys") / "proj"
    for folder, names in (("photos", ["obama_01.jpg", "obama_02.jpg"]), ("refs", ["obama_03.jpg"]),
                          ("reg", ["obama_240p.jpg"])):
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(shared_data / "faces" / "obama" / name, root / folder / name)
    shutil.copy(root / "refs" / "obama_03.jpg", root / "refs" / "r1.jpg")
    biden = shared_data / "faces" / "biden"
    shutil.copy(biden / sorted(p.name for p in biden.iterdir())[0], root / "refs" / "r2.jpg")
    (root / "clips").mkdir()
    shutil.copy(shared_data / "video" / "carphone.mp4", root / "clips" / "clip.mp4")
    shutil.copy(shared_data / "video" / "bigbuckbunny_no_faces.mp4", root / "clips" / "other.mp4")
    (root / "video_suite.yaml").write_text(VIDEO_SUITE)
    (root / "specs").mkdir()
    (root / "specs" / "hero.yaml").write_text(FULL_SPEC)
    (root / "runner.toml").write_text("")
    return root


@pytest.fixture(scope="module")
def full_spec(full_project) -> Spec:
    return load_spec(full_project / "specs" / "hero.yaml")


@pytest.fixture(scope="module")
def digester(full_project):
    ws = Workspace(full_project)
    yield ws
    ws.close()


# --------------------------------------------------------------------------- helpers


def declared_keys() -> list[tuple[tuple, dict[str, Any]]]:
    """(schema path, property schema) of every property that must declare its effect: all but
    objects with properties of their own (those declare key by key)."""
    out = []
    for path, sub in S.iter_schema_fields(S.root_schema(), S.root_uri()):
        if sub.get("properties") and "x-affects" not in sub:
            continue
        out.append((path, sub))
    return out


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def direct_components(spec: Spec, digester) -> dict[str, tuple[str, Any]]:
    """stage id -> (kind, its own key components: keyed config and inputs, upstreams by id)."""
    out = {}
    for node in expand_spec(spec):
        comps, _ = key_components(node, 0, {}, digester)
        out[node.id] = (node.kind, comps)
    return out


def changed_kinds(before: dict, after: dict) -> set[str]:
    kinds = set()
    for sid in set(before) | set(after):
        a, b = before.get(sid), after.get(sid)
        if a is None or b is None or a[1] != b[1]:
            kinds.add((a or b)[0])
    return kinds


def locations(data: Any, path: tuple) -> list[tuple]:
    """Concrete key paths in ``data`` for a schema path ('[]' = any item, '<name>' = any key)."""
    found = [()]
    for part in path:
        nxt = []
        for loc in found:
            node = get_in(data, loc)
            if part == "[]":
                nxt += [loc + (i,) for i in range(len(node))] if isinstance(node, list) else []
            elif part == "<name>":
                nxt += [loc + (k,) for k in node] if isinstance(node, dict) else []
            elif isinstance(node, dict) and part in node:
                nxt.append(loc + (part,))
        found = nxt
    return found


def get_in(data: Any, loc: tuple) -> Any:
    for k in loc:
        data = data[k]
    return data


def set_in(data: Any, loc: tuple, value: Any) -> None:
    for k in loc[:-1]:
        data = data[k]
    data[loc[-1]] = value


def changed_value(key: str, value: Any, sub: dict[str, Any]) -> Any:
    """A different valid value for ``key`` (the CHANGES table first, then by schema type)."""
    if key in CHANGES:
        new = CHANGES[key]
        if new == "drop-last":
            return value[:-1] if isinstance(value, list) else dict(list(value.items())[:-1])
        if new == "drop-first":
            return value[1:]
        if new == "append-copy":
            return value + value[-1:]
        return new
    if "enum" in sub:
        return next(o for o in sub["enum"] if o != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        hi = sub.get("maximum")
        return value + 1 if hi is None or value + 1 <= hi else value - 1
    if isinstance(value, float):
        hi = sub.get("maximum")
        return value / 2 if value else min(0.1, hi if hi is not None else 0.1)
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list) and value:
        return value[:-1] if len(value) > 1 else value + value
    raise AssertionError(f"{key}: add a new value for {value!r} to CHANGES in {__file__}")


def with_context(spec: Spec, key: str) -> Spec:
    data = copy.deepcopy(spec.data)
    for prefix, settings in CONTEXTS:
        if key == prefix or key.startswith(prefix + "."):
            for k, v in settings.items():
                set_in(data, tuple(k.split(".")), v)
    return Spec(file=spec.file, project_root=spec.project_root, data=data, raw=spec.raw, loaded=spec.loaded)


def schema_problems(data: dict, spec: Spec) -> list[str]:
    return [p.render() for p in S.validate(data, spec.loaded)]


def changed_spec(spec: Spec, path: tuple, sub: dict[str, Any]) -> Spec:
    """``spec`` with the value of ``path`` changed everywhere it occurs. A preset name is changed
    where the user writes it and the spec is resolved again (the preset's values are merged then)."""
    key = dotted(path)
    if sub.get("x-path") == "preset":
        import yaml

        raw = copy.deepcopy(spec.raw)
        section = raw
        for k in path[:-1]:
            section = section.setdefault(k, {})
        section[path[-1]] = CHANGES[key]
        other = spec.file.with_name("_changed.yaml")
        other.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_spec(other)
    locs = locations(spec.data, path)
    assert locs, f"{key}: the full spec in {__file__} does not use this key; add it to FULL_SPEC"
    mutated = copy.deepcopy(spec.data)
    for loc in locs:
        value = get_in(spec.data, loc)
        set_in(mutated, loc, changed_value(key, value, sub))
        assert get_in(mutated, loc) != value, f"{key}: the new value equals the old one"
    bad = schema_problems(mutated, spec)
    assert not bad, f"{key}: the changed spec is invalid: {bad[:2]}"
    return Spec(file=spec.file, project_root=spec.project_root, data=mutated, raw=spec.raw, loaded=spec.loaded)


def actual_effect(spec: Spec, path: tuple, sub: dict[str, Any], digester) -> set[str]:
    """Stage kinds whose own key components change when the value at ``path`` changes."""
    if "const" in sub:
        return set()  # one valid value: nothing to change
    spec = with_context(spec, dotted(path))
    after = changed_spec(spec, path, sub)
    return changed_kinds(_base_components(spec, digester), direct_components(after, digester))


_BASES: dict[str, dict] = {}


def _base_components(spec: Spec, digester) -> dict:
    """direct_components of an unchanged spec, computed once per context."""
    import json

    key = json.dumps(spec.data, sort_keys=True, default=str)
    if key not in _BASES:
        _BASES[key] = direct_components(spec, digester)
    return _BASES[key]


def builtin_kinds() -> set[str]:
    """The stage kinds runner ships (other tests register fake kinds in the same process)."""
    return {kind for kind, sk in stage_registry().kinds().items() if sk.run.__module__.startswith("runner.stages.")}


def declared_effect(key: str, sub: dict[str, Any]) -> set[str]:
    decl = sub["x-affects"]
    if decl == "none":
        return set()
    if decl == "all":
        return builtin_kinds()
    return set(decl) | {"report"}  # the report prints the spec


# --------------------------------------------------------------------------- tests


def test_every_key_declares_its_effect():
    kinds = set(stage_registry().kinds())
    missing, bad = [], []
    for path, sub in declared_keys():
        decl = sub.get("x-affects")
        if decl is None:
            missing.append(dotted(path))
        elif not (decl in ("none", "all") or (isinstance(decl, list) and decl and set(decl) <= kinds)):
            bad.append(f"{dotted(path)}: {decl!r}")
    assert not missing, ("schema keys without an \"x-affects\" declaration (a list of stage kinds, or "
                         "\"none\"; see docs/architecture.md, Cache keys): " + ", ".join(missing))
    assert not bad, (f'x-affects must be "none", "all" or a list of stage kinds {sorted(kinds)}: '
                     + "; ".join(bad))


def test_full_spec_expands_to_every_stage_kind(full_spec):
    kinds = {n.kind for n in expand_spec(full_spec)}
    assert kinds == builtin_kinds(), f"the full spec misses stage kinds {builtin_kinds() - kinds}"


@pytest.mark.parametrize("path", [p for p, s in declared_keys() if "x-affects" in s], ids=dotted)
def test_key_changes_exactly_the_declared_stages(path, full_spec, digester):
    sub = dict(declared_keys())[path]
    key = dotted(path)
    actual = actual_effect(full_spec, path, sub, digester)
    declared = declared_effect(key, sub)
    assert actual == declared, (
        f"changing {key} changes the cache keys of {sorted(actual) or 'no stage'}, but the schema declares "
        f"\"x-affects\": {sub['x-affects']!r}. Either the stage configs take the wrong keys (fix the "
        "stage's expand) or the declaration is wrong (fix the schema)."
    )


def test_cached_clips_are_costed_at_the_current_prices():
    """Prices are not in the video key, so the report re-prices a cached clip from its seconds."""
    from runner.stages import video

    budget = {"steps_s": {"generation": 1800.0, "analysis": 5.0}, "counted_steps": ["generation"]}
    rep = {"price": {"device": "cuda", "gpu": "A10G", "per_hour": 1.0}, "clips": [{"name": "c", "budget": budget}],
           "summary": {"clips": 1}, "targets": {}}
    for per_hour, max_cost, passes in ((2.0, 1.5, True), (4.0, 1.5, False)):
        config = {"price": {"targets_gpu": "H100", "backend": "modal", "gpu": "A10G", "stage_gpu": {},
                            "table": {"H100": per_hour}, "currency": "EUR"},
                  "targets": {"max_seconds": None, "max_cost": max_cost}}
        out = video._repriced(rep, config)
        clip = out["clips"][0]["budget"]
        assert (clip["cost"], clip["currency"], clip["gpu"]) == (per_hour / 2, "EUR", "H100")
        assert clip["cost_pass"] is passes and out["summary"]["cost_pass"] == int(passes)
        assert out["price"]["per_hour"] == per_hour


# --------------------------------------------------------------------------- local model files


def model_keys() -> list[tuple]:
    return [p for p, s in declared_keys() if s.get("x-path") == "model"]


def _with_local_model(spec: Spec, path: tuple, rel: str) -> Spec:
    spec = with_context(spec, dotted(path))
    data = copy.deepcopy(spec.data)
    for loc in locations(data, path):
        set_in(data, loc, rel)
    return Spec(file=spec.file, project_root=spec.project_root, data=data, raw=spec.raw, loaded=spec.loaded)


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("path", model_keys(), ids=dotted)
def test_local_model_content_is_in_the_key(path, as_folder, full_spec, full_project, digester):
    """A model key pointing at a local file or diffusers-style folder: replacing its bytes changes
    the keys of exactly the stages the key declares (the same value as a hub id would not)."""
    sub = dict(declared_keys())[path]
    name = dotted(path).replace(".", "_").replace("[]", "i").replace("<name>", "n")
    target = full_project / "models" / name
    shutil.rmtree(target, ignore_errors=True)
    weights = (target / "unet" / "model.safetensors") if as_folder else target.with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"weights v1")
    rel = (target if as_folder else weights).relative_to(full_project).as_posix()
    spec = _with_local_model(full_spec, path, rel)
    before = direct_components(spec, digester)
    weights.write_bytes(b"weights v2, replaced")
    after = direct_components(spec, digester)
    assert changed_kinds(before, after) == declared_effect(dotted(path), sub) - {"report"}, (
        f"{dotted(path)} = {rel}: replacing the model's bytes must change the keys of the declared stages")


def test_replaced_model_file_reruns_train_and_says_which_file(full_spec, full_project, monkeypatch):
    """The issue's case: train.base_model: ../models/m.safetensors, bytes replaced -> train re-runs,
    and the reason names the file; a hub id stays keyed by its name."""
    from runner.plan.graph import build_graph
    from runner.plan.planner import make_plan

    models = full_project / "models"
    models.mkdir(exist_ok=True)
    (models / "m.safetensors").write_bytes(b"old weights")
    spec = _with_local_model(full_spec, ("train", "base_model"), "models/m.safetensors")
    ws = Workspace(full_project)
    try:
        _planned_as_done(spec, ws, monkeypatch)
        (models / "m.safetensors").write_bytes(b"new weights, same name")
        again = {ps.id: ps for ps in make_plan(build_graph([spec]), ws, ws).stages}
    finally:
        ws.close()
    train = again["hero:train[base]"]
    assert train.action == "rerun"
    assert any("train.base_model" in r and "m.safetensors" in r and "modified" in r
               for r in train.reasons), train.reasons
    assert again["hero:caption"].action == "cached"
    assert again["hero:evaluate[base]"].action == "rerun"  # downstream of the new LoRA


def _planned_as_done(spec: Spec, ws: Workspace, monkeypatch) -> None:
    """Record every stage of ``spec`` as run, with its outputs in the store."""
    from runner.plan.graph import build_graph
    from runner.plan.planner import make_plan

    plan = make_plan(build_graph([spec]), ws, ws)
    for ps in plan.stages:
        ws.set_current(ps.id, ps.key, ps.components, "run1", ps.fileset_digests)
    monkeypatch.setattr(ws, "store_has", lambda key, keys={p.key for p in plan.stages}: key in keys)


@pytest.mark.parametrize("path", [p for p, s in declared_keys() if s.get("x-affects") == "none"
                                  and "const" not in s], ids=dotted)
def test_a_key_without_effect_reruns_nothing(path, full_spec, full_project, monkeypatch):
    """Editing a price, the backend, a GPU type or a worker count: the plan says every stage is
    up to date, the report included (`plan --detailed-exitcode` exits 0)."""
    from runner.plan.graph import build_graph
    from runner.plan.planner import make_plan

    sub = dict(declared_keys())[path]
    spec = with_context(full_spec, dotted(path))
    ws = Workspace(full_project)
    try:
        _planned_as_done(spec, ws, monkeypatch)
        plan = make_plan(build_graph([changed_spec(spec, path, sub)]), ws, ws)
    finally:
        ws.close()
    reruns = [f"{ps.id} ({'; '.join(ps.reasons)})" for ps in plan.stages if ps.action != "cached"]
    assert not reruns, f"changing {dotted(path)} re-runs {reruns}"


def test_a_variants_local_base_model_is_digested_for_that_variant_only(full_spec, full_project, digester):
    models = full_project / "models"
    models.mkdir(exist_ok=True)
    (models / "variant.safetensors").write_bytes(b"v1")
    data = copy.deepcopy(full_spec.data)
    data["train"]["variants"]["local"] = {"base_model": "models/variant.safetensors"}
    spec = Spec(file=full_spec.file, project_root=full_spec.project_root, data=data, raw=full_spec.raw,
                loaded=full_spec.loaded)
    before = direct_components(spec, digester)
    (models / "variant.safetensors").write_bytes(b"v2, other weights")
    after = direct_components(spec, digester)
    changed = {sid for sid in before if before[sid][1] != after[sid][1]} - {"hero:report"}
    assert changed == {"hero:train[local]"}


@pytest.mark.parametrize("old,new", [(0.0, 0), (5, 5.0), ([1, 2.0], [1, 2]), (True, 1), (-0.0, 0.0)])
def test_a_change_of_spelling_the_key_sees_is_named_as_a_reason(old, new):
    """Values Python calls equal but the cache key spells apart (0.0 and 0, True and 1) re-run a
    stage; the plan names the key instead of a bare 'key changed'."""
    from runner.plan.planner import canonical_json, explain_change

    assert canonical_json(old) != canonical_json(new)
    reasons = explain_change({"kind": "train", "version": 1, "config": {"x": {"y": old}}},
                             {"kind": "train", "version": 1, "config": {"x": {"y": new}}})
    assert reasons == [f"config x.y changed: {json.dumps(old)} -> {json.dumps(new)}"], reasons
