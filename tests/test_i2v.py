"""Image-to-video: the video stage end to end with builtin:tiny-ltx on CPU, and the measures
(fidelity scale, expression dynamics, motion) on real photos from ../shared/data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.generate import measures as MS
from runner.core import contract
from runner.stages import video as V
from test_storyboard import Graph, _one_torch_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def proj(tmp_path_factory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("i2vproj")
    (root / "refs").mkdir()
    for n in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / n, root / "refs" / n)
    shutil.copy(shared_data / "faces" / "obama" / "obama_03.jpg", root / "still.jpg")
    return root


def spec(**video) -> dict:
    v = {"model": "builtin:tiny-ltx", "source": "still.jpg", "preset": "baseline", "steps": 2, "guidance": 1.0,
         "image_conditioning": 1.0, "prompt_prefix": "", "prompt_suffix": "subtle motion", "frames": 9, "fps": 8,
         "width": 64, "height": 64, "fidelity": {"frames": 3, "excellent": 20, "fail": 30, "on_fail": "flag",
                                                 "retries": 1},
         "targets": {"max_seconds": 600, "max_cost": 0.0001}}
    v.update(video)
    return {"character": {"name": "demo", "trigger": "dmochr", "class_word": "man", "references": ["refs"],
                          "traits": {"fixed": ["grey hair"]}},
            "evaluate": {"face_model": "dlib", "clip_model": "builtin:tiny-clip"},
            "generate": {"video": v}, "hardware": {"device": "cpu", "currency": "EUR", "price_table": {"cpu": 3.6}}}


def inputs_for(root: Path) -> dict[str, contract.Artifact]:
    return {"source": contract.Artifact("source", root / "still.jpg", files=(root / "still.jpg",)),
            "reference0": contract.Artifact("reference0", root / "refs",
                                            files=tuple(sorted((root / "refs").iterdir())))}


def run(root: Path, tmp: Path, s: dict):
    node = V.expand(s, Graph(root))[0]
    json.dumps(node.config)
    ctx = LocalStageContext.for_folder(tmp, stage_id=node.id, character="demo", project_root=root)
    ctx.cache_dir = root / "cache"
    out = V.run(node.config, inputs_for(root), ctx)
    return node, ctx, out, json.loads((out["video"].path / "report.json").read_text())


def decode(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.slow
def test_tiny_ltx_clip_suite_upscale_first_frame_budget(proj: Path, tmp_path: Path) -> None:
    s = spec(suite="builtin", upscale=True, replace_first_frame=True,
             fidelity={"frames": 3, "excellent": 20, "fail": 30, "on_fail": "regenerate", "retries": 1})
    node, ctx, out, rep = run(proj, tmp_path / "run", s)
    assert node.label.startswith("4 clips (9 frames 64x64, preset baseline, 2 steps)")
    names = [c["name"] for c in rep["clips"]]
    assert names == ["source", "source_neutral_to_subtle", "source_crying", "source_distinctive_features"]
    assert rep["pipeline"] == "image-to-video" and rep["tiny_random"]["video_model"]
    assert rep["upscale_method"].startswith("plain 2x Lanczos resize")
    folder = out["video"].path
    from runner.generate.ltx import fit_to

    src = np.asarray(fit_to(Image.open(proj / "still.jpg"), 128, 128), dtype=np.float32)
    for c in rep["clips"]:
        frames = decode(folder / c["file"])
        assert len(frames) == 9 and frames[0].shape == (128, 128, 3)  # 2x upscaled
        assert np.abs(frames[0].astype(np.float32) - src).mean() < 12  # first frame = the source (codec error)
        assert np.abs(frames[1].astype(np.float32) - src).mean() > 20
        assert (folder / c["poster"]).is_file()
        # noise has no face: fidelity fails, the clip is regenerated once with a new seed, then flagged
        assert c["fidelity"]["distance"] == 100.0 and c["fidelity"]["grade"] == "fail"
        assert [a["seed"] for a in c["attempts"]] == [c["attempts"][0]["seed"], c["attempts"][0]["seed"] + 1000]
        assert c["flagged"] and c["motion"]["px_per_frame"] > 0
        b = c["budget"]
        assert set(b["steps_s"]) == {"generation", "upscale", "first_frame", "analysis", "export"}
        assert b["seconds"] == pytest.approx(sum(b["steps_s"][k] for k in V.COUNTED_STEPS), abs=0.01)
        assert b["cost"] == pytest.approx(3.6 * b["seconds"] / 3600, rel=0.01) and b["currency"] == "EUR"
        assert b["time_pass"] is True and b["cost_pass"] is False  # 0.0001 EUR is below any real run
    suite = {c["case"]: c for c in rep["clips"] if c["case"]}
    assert "tears" in suite["crying"]["prompt"] and suite["crying"]["prompt"].startswith("The man begins to cry")
    assert suite["crying"]["prompt"].endswith("subtle motion")
    assert suite["distinctive_features"]["checks"]["features_kept"]["features"][0]["feature"] == "grey hair"
    assert suite["crying"]["checks"]["not_frozen"]["pass"] is None  # no landmarks in noise: undecided, not passed
    assert rep["summary"]["clips"] == 4 and rep["summary"]["fail"] == 4
    # the report section embeds the clip with its poster
    from runner.stages.report import _jinja_env

    sec = V.report_sections(node.config, out, {"thumbnail_px": 64})[0]
    html = _jinja_env().get_template(sec.template).render(**sec.context)
    assert html.count('src="data:video/mp4;base64,') == 4 and 'poster="data:image/jpeg;base64,' in html
    assert "Tiny random models" in html and "plain 2x Lanczos resize" in html
    # resumable: a second run reuses the finished clips from the scratch folder
    node2, ctx2, out2, rep2 = run(proj, tmp_path / "run", s)
    assert [c["budget"] for c in rep2["clips"]] == [c["budget"] for c in rep["clips"]]


@pytest.mark.slow  # about 5 s
def test_condition_pipeline_latent_upsampler_and_shape_errors(proj: Path, tmp_path: Path) -> None:
    s = spec(image_conditioning=0.85, guidance=3.0, upscale=True, upsampler="builtin:tiny-ltx-upsampler")
    node, ctx, out, rep = run(proj, tmp_path / "a", s)
    assert rep["pipeline"] == "condition" and rep["upscale_method"].startswith("latent upsampler")
    frames = decode(out["video"].path / rep["clips"][0]["file"])
    assert len(frames) == 9 and frames[0].shape == (128, 128, 3)
    with pytest.raises(contract.StageError, match=r"frames must be k\*4\+1 \(got 10; e.g. 9\)"):
        run(proj, tmp_path / "b", spec(frames=10))
    with pytest.raises(contract.StageError, match="multiples of 32"):
        run(proj, tmp_path / "c", spec(width=66))


@pytest.mark.slow  # about 7 s
def test_video_lora_changes_the_clip(proj: Path, tmp_path: Path) -> None:
    """A LoRA for the LTX transformer, saved by diffusers and loaded back by the stage."""
    import torch
    from diffusers import LTXImageToVideoPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runner.generate.ltx import load_video_pipeline

    vp = load_video_pipeline("builtin:tiny-ltx", cache_dir=proj / "cache")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vp.pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(vp.pipe.transformer))
    LTXImageToVideoPipeline.save_lora_weights(str(proj / "video_lora"), transformer_lora_layers=sd)
    _, _, out_a, rep_a = run(proj, tmp_path / "a", spec())
    _, _, out_b, rep_b = run(proj, tmp_path / "b", spec(lora="video_lora/pytorch_lora_weights.safetensors"))
    fa = decode(out_a["video"].path / rep_a["clips"][0]["file"])
    fb = decode(out_b["video"].path / rep_b["clips"][0]["file"])
    assert rep_b["settings"]["lora"] and np.abs(fa[4].astype(float) - fb[4].astype(float)).mean() > 1
    with pytest.raises(contract.StageError, match="generate.video.lora"):
        run(proj, tmp_path / "c", spec(lora="still.jpg"))


def test_expand_sources_and_errors(proj: Path) -> None:
    sb = contract.PlanNode(id="demo:storyboard", kind="storyboard", character="demo",
                       config={"scenes": [{"index": i} for i in (1, 2, 3)]}, outputs=("storyboard",))
    s = spec(source="storyboard", key_frames=[1, 3], preset="aggressive-quality")
    s["hardware"] = {"backend": "modal", "gpu": "A10G", "stage_gpu": {"video": "H100"}}
    n = V.expand(s, Graph(proj, [sb]))[0]
    assert n.id == "demo:video" and n.inputs["storyboard"] == contract.StageOutputRef("demo:storyboard", "storyboard")
    assert n.config["key_frames"] == [1, 3] and n.gpu == "H100"
    from runner.generate.budget import priced_gpu

    assert priced_gpu({}, s["hardware"], "cpu") == "H100"  # Modal: the stage's GPU
    assert priced_gpu({}, {"gpu": "L4"}, "cuda") == "L4" and priced_gpu({}, {"gpu": "L4"}, "cpu") == "cpu"
    assert priced_gpu({"gpu": "A100-80GB"}, {"gpu": "L4"}, "cpu") == "A100-80GB"
    assert "from storyboard frames [1, 3]" in n.label
    with pytest.raises(contract.StageError, match=r"key_frames: \[5\] beyond the storyboard's 3 scenes"):
        V.expand(spec(source="storyboard", key_frames=[5]), Graph(proj, [sb]))
    with pytest.raises(contract.StageError, match="has no generate.storyboard"):
        V.expand(spec(source="storyboard"), Graph(proj))
    with pytest.raises(contract.StageError, match="suite: 'nope'"):
        V.expand(spec(suite="nope"), Graph(proj))
    assert V.expand({"generate": {}}, Graph(proj)) == []
    assert V.clip_prompt({"prompt": None, "prompt_prefix": "Cinematic motion", "prompt_suffix": ""}, "He smiles.") == \
        "Cinematic motion, He smiles."


# --------------------------------------------------------------------------- measures on real photos


def test_fidelity_scale_is_anchored_at_the_backend_threshold() -> None:
    assert MS.fidelity_distance(1.0, 0.92) == 0.0
    assert MS.fidelity_distance(0.92, 0.92) == pytest.approx(30.0)
    assert MS.fidelity_distance(0.947, 0.92) == pytest.approx(19.875)
    assert MS.fidelity_distance(0.35, 0.35) == pytest.approx(30.0)
    assert MS.fidelity_distance(0.0, 0.35) == pytest.approx(46.15, abs=0.01)
    assert MS.fidelity_distance(-0.5, 0.92) == 100.0 and MS.fidelity_distance(None, 0.92) == 100.0
    assert [MS.grade(d, 20, 30) for d in (20, 20.1, 30, 30.1)] == ["excellent", "ok", "ok", "fail"]
    assert MS.evenly_spaced(97, 5) == [0, 24, 48, 72, 96] and MS.evenly_spaced(3, 5) == [0, 1, 2]


def _photos(shared_data: Path, person: str) -> list[Image.Image]:
    folder = shared_data / "faces" / person
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in (".jpg", ".png"):
            im = Image.open(p).convert("RGB")
            im.thumbnail((640, 640))
            out.append(im)
    return out


@pytest.mark.slow  # about 5 s
def test_fidelity_dynamics_on_real_faces(shared_data: Path) -> None:
    from runner.vision.faces import get_face_backend

    fb = get_face_backend("dlib")
    obama = _photos(shared_data, "obama")
    refs = np.stack([r["embedding"] for r in MS.analyse_faces(obama[:2], [0, 1], fb)])
    same = obama[2:5]
    other = _photos(shared_data, "biden")[:3]
    fs = MS.fidelity(MS.analyse_faces(same, range(len(same)), fb), refs, fb.default_identity_threshold, excellent=20,
                     fail=30)
    fo = MS.fidelity(MS.analyse_faces(other, range(len(other)), fb), refs, fb.default_identity_threshold, excellent=20,
                     fail=30)
    assert fs["grade"] != "fail" and fs["distance"] <= 30 and fs["faces_found"] == 3
    assert fo["grade"] == "fail" and fo["distance"] > 30
    # a still repeated is a frozen face; different photos of him move mouth and eyes
    frozen = MS.expression_dynamics(MS.analyse_faces([same[0]] * 4, range(4), fb), 0.01)
    moving = MS.expression_dynamics(MS.analyse_faces(same + obama[:2], range(5), fb), 0.01)
    assert frozen["frozen"] is True and frozen["mouth_std"] == 0.0
    assert moving["frozen"] is False and max(moving["mouth_std"], moving["eye_std"]) > 0.01
    # a face-free frame counts as distance 100
    blank = MS.analyse_faces([Image.new("RGB", (128, 128), "gray")], [0], fb)
    assert MS.fidelity(blank, refs, 0.92, excellent=20, fail=30)["distance"] == 100.0


def test_motion_magnitude_follows_a_known_shift(shared_data: Path) -> None:
    base_img = _photos(shared_data, "obama")[0].resize((256, 192))
    arr = np.asarray(base_img)
    shifted = [Image.fromarray(np.roll(arr, 3 * i, axis=1)) for i in range(5)]
    m = MS.motion_magnitude(shifted, list(range(5)), flow_side=256)
    assert m["px_per_frame"] == pytest.approx(3.0, abs=0.8) and m["pairs"] == 4
    still = MS.motion_magnitude([base_img] * 3, [0, 1, 2])
    assert still["px_per_frame"] < 0.05


def test_video_presets_fill_values_and_spec_overrides_win(project: Path) -> None:
    from runner.spec import load_spec

    f = project / "specs" / "v.yaml"
    f.write_text("version: 1\ncharacter: {name: v, trigger: vchr}\n"
                 "generate:\n  video: {preset: aggressive-quality, source: storyboard, steps: 5, "
                 "prompt_suffix: slow}\n")
    v = load_spec(f).data["generate"]["video"]
    assert (v["steps"], v["guidance"], v["image_conditioning"]) == (5, 3.0, 0.85)
    assert v["prompt_prefix"].startswith("Cinematic motion, natural character movement")
    assert v["prompt_suffix"] == "slow"
    f.write_text("version: 1\ncharacter: {name: v, trigger: vchr}\ngenerate:\n  video: {source: storyboard}\n")
    data = load_spec(f).data
    data["generate"]["video"].update(source="still.jpg")
    sb_free = Graph(project)
    (project / "still.jpg").write_bytes(b"")
    c = V.expand(data, sb_free)[0].config  # the default preset (baseline) fills what the spec leaves null
    assert (c["preset"], c["steps"], c["guidance"], c["image_conditioning"], c["prompt_suffix"]) == \
        ("baseline", 10, 1.0, 1.0, "subtle motion")
