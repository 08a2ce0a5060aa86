"""The storyboard stage end to end on CPU: tiny SD + a real LoRA file, references from ../shared/data.

Frames from tiny random models are noise (no face), so thresholds force retries; a second test
swaps the generator for real photos to check that validation keeps the passing attempt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import storyboard as SB


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_lora(root: Path, cache: Path) -> Path:
    """The train stage's ``lora`` output with one random, non-zero checkpoint (step 10) for tiny SD."""
    from test_eval_stage import _make_lora_artifact

    return _make_lora_artifact(root, cache, steps=(10,)).path


@pytest.fixture(scope="module")
def proj(tmp_path_factory, shared_data: Path):
    root = tmp_path_factory.mktemp("sbproj")
    refs = root / "refs"
    refs.mkdir()
    for name in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / name, refs / name)
    make_lora(root / "lora", root / "cache")
    return root


def spec(**storyboard) -> dict:
    sb = {"planner": "manual", "scenes": [{"text": "He waves at the camera.", "shot": "close_up"},
                                          {"text": "He walks through the park.", "shot": "full_body"},
                                          {"text": "He sits on a bench.", "shot": "medium"}],
          "seed": 5, "steps": 2, "guidance": 2.0, "width": 64, "height": 64, "batch_size": 4,
          "validation": {"face_similarity": 0.7, "clip_i": None, "retries": 1}}
    sb.update(storyboard)
    return {
        "character": {"name": "demo", "trigger": "dmochr", "class_word": "man", "references": ["refs"],
                      "traits": {"fixed": ["short grey hair"]}},
        "train": {"base_model": "builtin:tiny-sd", "resolution": 64},
        "evaluate": {"face_model": "dlib", "clip_model": "builtin:tiny-clip"},
        "generate": {"checkpoint": "best", "lora_scale": None, "storyboard": sb},
        "hardware": {"device": "cpu"},
    }


class Graph:
    def __init__(self, root: Path, nodes=()):
        self.character = "demo"
        self.project_root = root
        self.spec_file = root / "specs" / "demo.yaml"
        self.nodes = list(nodes)

    def nodes_of(self, kind: str):
        return [n for n in self.nodes if n.kind == kind]

    def node(self, stage_id: str):
        return next((n for n in self.nodes if n.id == stage_id), None)


def _node(kind: str, variant: str | None = None) -> contract.PlanNode:
    return contract.PlanNode(id=contract.node_id("demo", kind, variant), kind=kind, character="demo", config={})


def inputs_for(proj: Path, node: contract.PlanNode) -> dict[str, contract.Artifact]:
    out = {"lora": contract.Artifact("lora", proj / "lora")}
    refs = proj / "refs"
    out["reference0"] = contract.Artifact("reference0", refs, files=tuple(sorted(refs.iterdir())))
    return out


def test_expand_picks_the_lora_source(proj: Path) -> None:
    s = spec()
    # evaluate present: best comes from the first evaluate node (the base variant with variants)
    g = Graph(proj, [_node("train", "base"), _node("train", "rank64"), _node("evaluate", "base"),
                     _node("evaluate", "rank64")])
    n = SB.expand(s, g)[0]
    assert n.id == "demo:storyboard"
    assert n.inputs["evaluation"] == contract.StageOutputRef("demo:evaluate[base]", "evaluation")
    assert [sc["index"] for sc in n.config["scenes"]] == [1, 2, 3]
    assert n.config["scenes"][0]["prompt"].startswith("dmochr man, close-up portrait, He waves at the camera")
    assert "short grey hair" in n.config["scenes"][1]["prompt"]
    json.dumps(n.config)
    # no evaluate stage: the train node's last checkpoint
    n = SB.expand(s, Graph(proj, [_node("train")]))[0]
    assert n.inputs["lora"] == contract.StageOutputRef("demo:train", "lora") and n.config["source"] == "train"
    # checkpoint: last skips evaluate; a path becomes a file input
    s2 = spec()
    s2["generate"]["checkpoint"] = "last"
    assert "lora" in SB.expand(s2, g)[0].inputs
    s2["generate"]["checkpoint"] = "lora/checkpoint-10/pytorch_lora_weights.safetensors"
    n = SB.expand(s2, Graph(proj, []))[0]
    assert isinstance(n.inputs["lora_file"], contract.FileSetRef) and n.config["source"] == "file"
    # no LoRA anywhere: a clear error
    with pytest.raises(contract.StageError, match="needs the character's LoRA"):
        SB.expand(spec(), Graph(proj, []))
    # nothing without a storyboard section
    assert SB.expand({"generate": {}}, g) == []


@pytest.mark.slow  # about 3 s
def test_tiny_sd_frames_retry_below_threshold(proj: Path, tmp_path: Path) -> None:
    node = SB.expand(spec(), Graph(proj, [_node("train")]))[0]
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = proj / "cache"
    out = SB.run(node.config, inputs_for(proj, node), ctx)
    folder = out["storyboard"].path
    rep = json.loads((folder / "report.json").read_text())
    assert [f["file"] for f in rep["frames"]] == ["frames/01.png", "frames/02.png", "frames/03.png"]
    # noise has no face: every frame fails 0.7, is retried once with a new seed, and is flagged
    for i, f in enumerate(rep["frames"]):
        assert [a["seed"] for a in f["attempts"]] == [5 + i, 5 + 3 + i]
        assert all(a["face_found"] is False and a["face_similarity"] == 0.0 and not a["pass"] for a in f["attempts"])
        assert not f["passed"]
        assert (folder / f["file"]).is_file() and all((folder / a["file"]).is_file() for a in f["attempts"])
    assert rep["summary"] == {"scenes": 3, "passed": 0, "attempts": 6, "retried": 3, "without_character": 0}
    assert rep["tiny_random"]["any"] and rep["lora"]["scale"] == 1.0
    assert any("below the validation thresholds" in w for w in ctx.warnings)
    assert any("below the dlib backend's identity threshold 0.92" in w for w in ctx.warnings)
    with Image.open(folder / "frames/01.png") as im:
        assert im.size == (64, 64)
    # the report section renders (autoescaped template, data URIs only)
    from runner.stages.report import _jinja_env

    secs = SB.report_sections(node.config, out, {"thumbnail_px": 64})
    html = _jinja_env().get_template(secs[0].template).render(**secs[0].context)
    assert "Tiny random models" in html and html.count("data:image/jpeg;base64,") >= 9
    assert "He walks through the park." in html and "0/3 frames pass" in html


@pytest.mark.slow  # about 17 s
def test_validation_keeps_the_passing_attempt(proj: Path, tmp_path: Path, shared_data: Path, monkeypatch) -> None:
    """Seeds map to real photos: the first attempt of scene 2 is someone else, its retry is the
    character; scene 1 passes at once. CLIP-I is checked too (tiny CLIP, threshold -1)."""
    import runner.diffusion.generate as G

    biden = shared_data / "faces" / "biden"
    photos = {"obama": shared_data / "faces" / "obama" / "obama_03.jpg",
              "biden": biden / sorted(p.name for p in biden.iterdir())[0]}
    by_seed = {5: "obama", 6: "biden", 8: "obama"}  # scene 1 seed 5; scene 2 seeds 6 then 6+2

    calls = []

    def fake_generate(pipe, prompts, *, seeds, width, height, **kw):
        calls.append(list(seeds))
        return [Image.open(photos[by_seed.get(s, "biden")]).convert("RGB") for s in seeds]

    monkeypatch.setattr(G, "generate_images", fake_generate)
    s = spec(scenes=[{"text": "He smiles.", "shot": "close_up"}, {"text": "He listens.", "shot": "close_up"}],
             validation={"face_similarity": 0.93, "clip_i": -1.0, "retries": 2})
    node = SB.expand(s, Graph(proj, [_node("train")]))[0]
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = proj / "cache"
    rep = json.loads((SB.run(node.config, inputs_for(proj, node), ctx)["storyboard"].path / "report.json").read_text())
    assert calls == [[5, 6], [8]]  # one batch per round; only the failing scene is regenerated
    f1, f2 = rep["frames"]
    assert len(f1["attempts"]) == 1 and f1["passed"] and f1["scores"]["face_similarity"] >= 0.93
    assert [a["pass"] for a in f2["attempts"]] == [False, True] and f2["kept_attempt"] == 1 and f2["passed"]
    assert f2["attempts"][0]["face_similarity"] < 0.93 <= f2["attempts"][1]["face_similarity"]
    assert all("clip_i" in a for a in f1["attempts"] + f2["attempts"])
    assert rep["summary"]["passed"] == 2 and rep["tiny_random"]["clip"]


def test_reference_guided_ip_adapter_and_controlnet(proj: Path, tmp_path: Path, monkeypatch) -> None:
    """Frame 1 plain, frames 2-3 through diffusers' IP-Adapter loader and a ControlNet pipeline
    (tiny components built from config); the later frames get the reference and its edge map."""
    import runner.diffusion.generate as G

    seen = []
    real = G.generate_images

    def spy(pipe, prompts, **kw):
        seen.append((type(pipe).__name__, sorted((kw.get("pipe_kwargs") or {}).keys()), list(kw["seeds"])))
        return real(pipe, prompts, **kw)

    monkeypatch.setattr(G, "generate_images", spy)
    s = spec(validation={"face_similarity": None, "clip_i": None, "retries": 2},
             reference_guided={"enabled": True, "ip_adapter": "builtin:tiny-ip-adapter", "ip_adapter_scale": 0.5,
                               "controlnet": "builtin:tiny-controlnet", "control": "canny", "controlnet_scale": 0.7})
    node = SB.expand(s, Graph(proj, [_node("train")]))[0]
    assert "reference-guided" in node.label
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = proj / "cache"
    out = SB.run(node.config, inputs_for(proj, node), ctx)
    folder = out["storyboard"].path
    rep = json.loads((folder / "report.json").read_text())
    assert seen[0] == ("StableDiffusionPipeline", [], [5])
    assert seen[1] == ("StableDiffusionControlNetPipeline",
                       ["controlnet_conditioning_scale", "image", "ip_adapter_image"], [6, 7])
    rg = rep["reference_guided"]
    assert rg["enabled"] and rg["scale"] == 0.5 and rg["weight_name"] == "ip-adapter_sd15.safetensors"
    assert rg["controlnet"] == "builtin:tiny-controlnet" and (folder / rg["control_map_file"]).is_file()
    assert [len(f["attempts"]) for f in rep["frames"]] == [1, 1, 1]  # nothing checked: no retries
    assert rep["summary"]["passed"] == 3


@pytest.mark.slow  # the tiny ControlNets: several seconds
def test_control_maps(shared_data: Path) -> None:
    import numpy as np

    from runner.generate.guided import canny_map, control_map
    from runner.vision.faces import get_face_backend

    photo = Image.open(shared_data / "faces" / "obama" / "obama_01.jpg").convert("RGB")
    edges = np.asarray(canny_map(photo))
    assert edges.shape == (photo.height, photo.width, 3) and set(np.unique(edges)) <= {0, 255} and edges.mean() > 1
    fb = get_face_backend("dlib")
    pose = np.asarray(control_map(photo, "face_landmarks", fb))
    assert pose.max() == 255 and 0 < (pose > 0).mean() < 0.2  # thin landmark lines on black
    with pytest.raises(contract.StageError, match="face_landmarks needs a face"):
        control_map(Image.new("RGB", (64, 64), "gray"), "face_landmarks", fb)


def test_llm_planner_in_the_stage_is_asked_once(proj: Path, tmp_path: Path, monkeypatch) -> None:
    """Planner llm: scenes come from the loopback endpoint at run time; the answer is kept in the
    scratch folder, so a re-run (a resumed apply) does not ask again."""
    import runner.diffusion.generate as G
    from test_generate_planner import _Server

    monkeypatch.setattr(G, "generate_images", lambda pipe, prompts, *, seeds, width, height, **kw:
                        [Image.new("RGB", (width, height), (i * 40, 90, 160)) for i, _ in enumerate(seeds)])
    monkeypatch.setenv("SB_TEST_KEY", "k")
    server = _Server()
    try:
        server.answers.append((200, json.dumps({"scenes": [
            {"text": "He looks up.", "description": "a man looks up, front view", "hero": True, "shot": "close_up"},
            {"text": "He crosses the bridge.", "description": "a man crosses a bridge", "hero": True,
             "shot": "wide"}]})))
        server.answers.append((200, json.dumps({"prompts": ["man looking up", "man crossing a stone bridge"]})))
        s = spec(planner="llm", story="He looks up and crosses the bridge.", min_scenes=2, max_scenes=3,
                 llm={"base_url": server.url, "model": "m", "api_key_env": "SB_TEST_KEY", "timeout_s": 5},
                 validation={"face_similarity": None, "clip_i": None, "retries": 2})
        node = SB.expand(s, Graph(proj, [_node("train")]))[0]
        assert node.config["scenes"] == [] and "from the LLM" in node.label
        for _attempt in range(2):
            ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
            ctx.cache_dir = proj / "cache"
            out = SB.run(node.config, inputs_for(proj, node), ctx)
            rep = json.loads((out["storyboard"].path / "report.json").read_text())
            assert [f["text"] for f in rep["frames"]] == ["He looks up.", "He crosses the bridge."]
            wide = "dmochr man, wide establishing shot, man crossing a stone bridge"
            assert rep["frames"][1]["prompt"].startswith(wide)
            assert rep["llm"]["model"] == "m" and len(server.requests) == 2  # scenes + prompt refinement
    finally:
        server.close()


def test_best_attempt_and_validator_errors() -> None:
    from runner.generate.frames import FrameValidator, Thresholds, best_attempt, seed_for

    assert best_attempt([{"margin": -0.2, "pass": False}, {"margin": 0.05, "pass": True},
                         {"margin": 0.3, "pass": True}]) == 2
    assert best_attempt([{"margin": -0.2, "pass": False}, {"margin": -0.1, "pass": False}]) == 1
    assert best_attempt([{"margin": None, "pass": True}]) == 0
    assert [seed_for(100, i, a, 3) for a in (0, 1) for i in range(3)] == [100, 101, 102, 103, 104, 105]
    with pytest.raises(contract.StageError, match="needs reference images"):
        FrameValidator(face_backend=None, clip=None, reference_images=[], thresholds=Thresholds(0.7, None))
    from runner.vision.faces import get_face_backend

    with pytest.raises(contract.StageError, match="no face found in any of the 1 reference"):
        FrameValidator(face_backend=get_face_backend("dlib"), clip=None,
                       reference_images=[Image.new("RGB", (96, 96), "white")], thresholds=Thresholds(0.7, None))


@pytest.mark.slow  # a tiny SDXL storyboard: several seconds
def test_sdxl_lora_by_path(proj: Path, tmp_path: Path) -> None:
    """generate.checkpoint as a LoRA file on builtin:tiny-sdxl (generate.base_model): the SDXL
    pipeline is detected and the frames come out at the asked size."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sdxl", cache_dir=proj / "cache")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(
        str(proj / "xl_lora"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    s = spec(scenes=[{"text": "He nods.", "shot": "close_up"}], width=64, height=64,
             validation={"face_similarity": None, "clip_i": None, "retries": 0})
    s["generate"].update(checkpoint="xl_lora/pytorch_lora_weights.safetensors", base_model="builtin:tiny-sdxl",
                         lora_scale=0.8)
    node = SB.expand(s, Graph(proj))[0]
    art = proj / "xl_lora" / "pytorch_lora_weights.safetensors"
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = proj / "cache"
    inputs = {**inputs_for(proj, node), "lora_file": contract.Artifact("lora_file", art, files=(art,))}
    del inputs["lora"]
    rep = json.loads((SB.run(node.config, inputs, ctx)["storyboard"].path / "report.json").read_text())
    assert rep["model_family"] == "sdxl" and rep["lora"]["scale"] == 0.8
    assert rep["lora_file"] == "xl_lora/pytorch_lora_weights.safetensors"
    assert rep["frames"][0]["passed"] and rep["generation"]["width"] == 64


def _small(path: Path) -> Image.Image:
    im = Image.open(path).convert("RGB")
    im.thumbnail((256, 256))
    return im


def _photos(shared_data: Path) -> dict[str, Path]:
    biden = shared_data / "faces" / "biden"
    return {"obama": shared_data / "faces" / "obama" / "obama_03.jpg",
            "obama2": shared_data / "faces" / "obama" / "obama_02.jpg",
            "biden": biden / sorted(p.name for p in biden.iterdir())[0]}


@pytest.fixture()
def no_pipeline(monkeypatch):
    """For tests whose frames come from a fake generate_images: no diffusion pipeline is loaded."""
    import runner.diffusion.models as M

    monkeypatch.setattr(SB, "load_character_pipeline", lambda *a, **k: object())
    monkeypatch.setattr(M, "family_of", lambda pipe: "sd15")


def _run(proj: Path, tmp_path: Path, s: dict, inputs=None) -> dict:
    node = SB.expand(s, Graph(proj, [_node("train")]))[0]
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = proj / "cache"
    out = SB.run(node.config, inputs if inputs is not None else inputs_for(proj, node), ctx)
    return json.loads((out["storyboard"].path / "report.json").read_text())


def test_a_scene_without_the_character_skips_the_identity_gate(proj: Path, tmp_path: Path, shared_data: Path,
                                                               monkeypatch, no_pipeline) -> None:
    """The planner says scene 2 (a horse) is not of the character: its prompt has no trigger, its
    frame is not checked against the references (no retry, passes, says why); scene 1 is."""
    import runner.diffusion.generate as G

    photos = _photos(shared_data)
    prompts: list[str] = []

    def fake_generate(pipe, batch_prompts, *, seeds, width, height, **kw):
        prompts.extend(batch_prompts)
        return [_small(photos["biden"]) for _ in seeds]  # never the character

    monkeypatch.setattr(G, "generate_images", fake_generate)
    s = spec(scenes=[{"text": "He smiles.", "shot": "close_up"}, {"text": "The old horse sleeps in the barn."}],
             validation={"face_similarity": 0.93, "clip_i": None, "retries": 1})
    rep = _run(proj, tmp_path, s)
    f1, f2 = rep["frames"]
    assert f1["hero"] and len(f1["attempts"]) == 2 and not f1["passed"]  # checked, retried, flagged
    assert not f2["hero"] and "another character" not in f2["hero_reason"] and "not a person" in f2["hero_reason"]
    assert len(f2["attempts"]) == 1 and f2["passed"] and "face_similarity" not in f2["attempts"][0]
    assert f2["attempts"][0]["identity_check"] == "skipped: the character is not in this scene"
    assert "dmochr" not in f2["prompt"] and "short grey hair" not in f2["prompt"]
    assert rep["summary"]["without_character"] == 1 and rep["summary"]["passed"] == 1


@pytest.mark.parametrize("against, refs", [("auto", True), ("frame1", True), ("references", True), ("auto", False)])
@pytest.mark.slow  # about 3 s each
def test_reference_mode_validates_against_frame1_references_or_both(proj: Path, tmp_path: Path, shared_data: Path,
                                                                    monkeypatch, no_pipeline, against: str,
                                                                    refs: bool) -> None:
    """Frames 2+ in reference mode: against frame 1 (the storyboard system's rule), the references,
    or both; each attempt records which. Frame 1 is Obama; scene 3's first try is someone else
    (fails whatever it is checked against), its retry is Obama again. A scene without the
    character is made plain (no IP-Adapter image) and not checked."""
    import runner.diffusion.generate as G
    from runner.generate import guided as GD

    photos = _photos(shared_data)
    by_seed = {5: "obama", 6: "biden", 7: "biden", 10: "obama2"}  # seed + attempt * 3 + position
    kwargs_seen: dict[int, list] = {}

    def fake_generate(pipe, batch_prompts, *, seeds, width, height, pipe_kwargs=None, **kw):
        for sd in seeds:
            kwargs_seen[sd] = sorted(pipe_kwargs or {})
        return [_small(photos[by_seed.get(sd, "biden")]) for sd in seeds]

    monkeypatch.setattr(G, "generate_images", fake_generate)
    monkeypatch.setattr(GD, "load_ip_adapter", lambda pipe, *a, **k: {"ip_adapter": a[0], "scale": k.get("scale")})
    s = spec(scenes=[{"text": "He smiles.", "shot": "close_up"},
                     {"text": "A horse sleeps in the barn.", "shot": "wide"},
                     {"text": "He laughs.", "shot": "close_up"}],
             validation={"face_similarity": 0.93, "clip_i": None, "retries": 1},
             reference_guided={"enabled": True, "ip_adapter": "builtin:tiny-ip-adapter", "validate_against": against})
    if not refs:
        s["character"]["references"] = []
    node = SB.expand(s, Graph(proj, [_node("train")]))[0]
    inputs = inputs_for(proj, node)
    if not refs:
        del inputs["reference0"]
    rep = _run(proj, tmp_path, s, inputs)
    expected = {"both": ["references", "frame1"], "auto": ["references", "frame1"] if refs else ["frame1"],
                "frame1": ["frame1"], "references": ["references"]}[against]
    rg = rep["reference_guided"]
    assert rg["reference_frame"] == 1 and rg["validate_against"] == expected and rg["unguided_frames"] == [2]
    assert kwargs_seen[6] == [] and kwargs_seen[7] == ["ip_adapter_image"]  # scene 2 plain, scene 3 guided
    f1, f2, f3 = rep["frames"]
    assert f1["attempts"][0]["against"] == (["references"] if refs else [])
    assert f2["attempts"][0]["identity_check"].startswith("skipped") and len(f2["attempts"]) == 1
    assert [a["pass"] for a in f3["attempts"]] == [False, True] and f3["kept_attempt"] == 1
    for a in f3["attempts"]:
        assert a["against"] == expected and set(a["checks"]) == set(expected)
        assert ("frame1_face_similarity" in a) == ("frame1" in expected)
        assert ("face_similarity" in a) == ("references" in expected)
    if "frame1" in expected:  # the same person as frame 1 scores high against it; someone else does not
        assert f3["attempts"][1]["frame1_face_similarity"] > 0.93 > f3["attempts"][0]["frame1_face_similarity"]


@pytest.mark.slow  # several seconds
def test_report_section_shows_presence_and_what_was_checked(proj: Path, tmp_path: Path, shared_data: Path,
                                                           monkeypatch, no_pipeline) -> None:
    import runner.diffusion.generate as G
    from runner.generate import guided as GD
    from runner.stages.report import _jinja_env

    photos = _photos(shared_data)
    monkeypatch.setattr(G, "generate_images", lambda pipe, p, *, seeds, **kw: [_small(photos["obama"]) for _ in seeds])
    monkeypatch.setattr(GD, "load_ip_adapter",
                        lambda pipe, *a, **k: {"ip_adapter": a[0], "weight_name": "w", "scale": 0.6})
    s = spec(scenes=[{"text": "He smiles.", "shot": "close_up"}, {"text": "Snow falls on the barn.", "shot": "wide"},
                     {"text": "He laughs.", "shot": "close_up"}],
             validation={"face_similarity": 0.9, "clip_i": None, "retries": 0},
             reference_guided={"enabled": True, "ip_adapter": "builtin:tiny-ip-adapter"})
    node = SB.expand(s, Graph(proj, [_node("train")]))[0]
    assert "the character not in 1: 2" in node.label, node.label
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = proj / "cache"
    out = SB.run(node.config, inputs_for(proj, node), ctx)
    secs = SB.report_sections(node.config, out, {"thumbnail_px": 64})
    html = _jinja_env().get_template(secs[0].template).render(**secs[0].context)
    assert "without the character" in html and "Character not in the scene: its subject is" in html
    assert "validated against references and frame 1" in html and "face vs frame 1" in html
    assert "identity check skipped: the character is not in this scene" in html
