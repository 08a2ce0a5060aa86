"""Video families in the registry (issue 16 part 1): listing by modality, refusal for image
training, detection of each tiny folder, a short clip from a real photo on every tiny video
family, and a LoRA (on the family's default targets, saved with the pipeline's
save_lora_weights) loaded through the public pipeline API that changes the clip. LTX-Video 0.9
clips through the stage are tests/test_i2v.py's. Tiny random models: the clips are noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.core.errors import StageError, UserError
from runner.diffusion import families
from runner.generate import video_models as VM

NEW = ("builtin:tiny-ltx2", "builtin:tiny-wan22-i2v", "builtin:tiny-wan22-ti2v")
ALL = ("builtin:tiny-ltx",) + NEW
FAMILY_OF = {"builtin:tiny-ltx": "ltx_video", "builtin:tiny-ltx2": "ltx2", "builtin:tiny-wan22-i2v": "wan22_i2v",
             "builtin:tiny-wan22-ti2v": "wan22_ti2v"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def video_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video_family_models")


@pytest.fixture(scope="session")
def photo(shared_data: Path) -> Image.Image:
    return Image.open(shared_data / "faces" / "obama" / "obama_01.jpg").convert("RGB")


@pytest.fixture(scope="session")
def base_clips(video_cache: Path, photo: Image.Image) -> dict:
    """Each new tiny family loaded once and its clip without a LoRA (shared by the clip and LoRA tests)."""
    out = {}
    for ref in NEW:
        vp = VM.load_video_model(ref, cache_dir=video_cache)
        out[ref] = (vp, VM.generate(vp, photo, _settings()))
    return out


def _settings(**kw) -> VM.ClipSettings:
    base = dict(prompt="a man smiles slowly", width=32, height=32, frames=9, fps=24, steps=2, guidance=1.0, seed=5)
    return VM.ClipSettings(**{**base, **kw})


def test_listing_keeps_image_families_and_finds_video_ones() -> None:
    image = families.names()
    assert set(FAMILY_OF.values()).isdisjoint(image) and "flux1" in image
    assert families.names("video") == sorted(FAMILY_OF.values())
    assert set(families.names(None)) == set(image) | set(FAMILY_OF.values())
    assert [f.modality for f in families.all_families()] == ["image"] * len(image)
    assert families.get("wan22_i2v").video.experts == ("transformer", "transformer_2")
    assert families.get("ltx2").video.audio and families.get("ltx_video").video.frame_rule == "8k+1"
    assert families.get("wan22_ti2v").video.frame_rule == "4k+1"
    enum = json.loads((ROOT / "schemas/sections/generate.schema.json").read_text())
    prop = enum["properties"]["video"]["properties"]["family"]
    assert prop["enum"][0] == "auto" and sorted(prop["enum"][1:]) == families.names("video")
    for fam in families.all_families("video"):  # each family's presets are shipped and name the family
        for preset in fam.video.presets:
            text = (ROOT / "runner/presets/video" / f"{preset}.yaml").read_text()
            assert preset in ("baseline", "aggressive-quality") or f"family: {fam.name}" in text


def test_image_training_refuses_video_families() -> None:
    from runner.diffusion import models

    for ref, fam in (("builtin:tiny-ltx2", "auto"), ("Lightricks/LTX-Video", "auto"), ("builtin:tiny-sd", "ltx2")):
        with pytest.raises(UserError, match="video") as exc:
            models.load_pipeline(ref, family=fam)
        assert "train_video" in exc.value.hint
    assert families.detect_hub_id("Lightricks/LTX-Video") is None  # image detection does not see them
    assert families.detect_hub_id("Wan-AI/Wan2.2-I2V-A14B-Diffusers", modality="video").name == "wan22_i2v"
    assert families.detect_hub_id("Wan-AI/Wan2.2-TI2V-5B-Diffusers", modality="video").name == "wan22_ti2v"
    assert families.detect_hub_id("Lightricks/LTX-2", modality="video").name == "ltx2"
    assert families.detect_hub_id("Lightricks/LTX-Video-0.9.7-dev", modality="video").name == "ltx_video"


@pytest.mark.slow  # ~4 s: builds the four tiny folders once (shared by the tests below)
def test_detection_of_each_tiny_folder(video_cache: Path) -> None:
    for ref, name in FAMILY_OF.items():
        folder = VM.tiny_video_path(ref, video_cache)
        assert VM.detect_folder(folder).name == name
        assert VM.choose_family("auto", str(folder), str(folder)).name == name
        with pytest.raises(UserError, match="pipeline"):
            families.detect_folder(folder)  # not an image family
    with pytest.raises(UserError, match="image family"):
        VM.choose_family("flux1", "builtin:tiny-ltx", None)


@pytest.mark.slow  # ~10 s on 2 cores: a 9-frame 32 px 2-step clip per new tiny family (base_clips; LTX-2: 1024 tokens)
def test_clip_on_each_family(video_cache: Path, photo: Image.Image, base_clips: dict, tmp_path: Path) -> None:
    for ref in NEW:
        vp, clip = base_clips[ref]
        assert vp.family.name == FAMILY_OF[ref] and vp.tiny_random and vp.kind == "image-to-video"
        VM.check_shape(vp, 32, 32, 9)
        with pytest.raises(StageError, match=rf"k\*{vp.temporal_ratio}\+1"):
            VM.check_shape(vp, 32, 32, 10)
        assert len(clip.frames) == 9 and clip.frames[0].size == (32, 32)
        assert np.asarray(clip.frames[4]).std() > 0
        if vp.family.video.audio:  # LTX-2: the audio, muxed into the mp4
            assert clip.audio.ndim == 2 and clip.sample_rate == 16000
            from runner.generate.ltx import export_mp4

            mp4 = tmp_path / "ltx2.mp4"
            export_mp4(clip.frames, mp4, 24)
            meta = VM.add_audio(mp4, *vp.last_audio)
            import av

            with av.open(str(mp4)) as c:
                assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
            assert meta["channels"] == 2
        else:
            assert clip.audio is None
    cond = VM.load_video_model("builtin:tiny-ltx2", cache_dir=video_cache, image_conditioning=0.8)
    assert cond.kind == "condition" and type(cond.pipe).__name__ == "LTX2ConditionPipeline"
    assert len(VM.generate(cond, photo, _settings(image_conditioning=0.8)).frames) == 9
    with pytest.raises(UserError, match="image_conditioning"):
        VM.load_video_model("builtin:tiny-wan22-ti2v", cache_dir=video_cache, image_conditioning=0.8)


@pytest.mark.slow  # ~10 s on 2 cores: a LoRA clip on each of the three new tiny families
def test_lora_loads_through_the_pipeline_api_and_changes_the_clip(video_cache: Path, photo: Image.Image,
                                                                  base_clips: dict, tmp_path: Path) -> None:
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    for ref in NEW:
        vp = VM.load_video_model(ref, cache_dir=video_cache)  # a copy to train on (base_clips' stays clean)
        base = base_clips[ref][1].frames
        c = families.components_of(vp.pipe, vp.family)
        families.add_lora(c, rank=4, seed=0)  # the family's default targets must exist on its transformer
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for name, p in c.denoiser.named_parameters():
                if "lora_B" in name:  # a trained LoRA, not a fresh (zero) one
                    p.normal_(0, 0.5)
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(c.denoiser))
        folder = tmp_path / vp.family.name
        type(vp.pipe).save_lora_weights(str(folder), transformer_lora_layers=sd)
        fresh = VM.load_video_model(ref, cache_dir=video_cache)
        VM.load_lora(fresh, folder / "pytorch_lora_weights.safetensors", 1.0)
        lora = VM.generate(fresh, photo, _settings()).frames
        diff = np.abs(np.asarray(base[4], float) - np.asarray(lora[4], float)).mean()
        assert diff > 0.5, (ref, diff)
    with pytest.raises(StageError, match="generate.video.lora"):
        VM.load_lora(fresh, tmp_path / "missing.safetensors", 1.0)


@pytest.mark.slow  # ~8 s on 2 cores: the video stage on builtin:tiny-ltx2 (face checks included), 9 frames 32 px
def test_video_stage_on_ltx2_saves_the_audio_when_on(shared_data: Path, tmp_path: Path) -> None:
    import shutil

    import av

    from runner.stages import video as V
    from test_i2v import run, spec
    from test_storyboard import Graph

    root = tmp_path / "proj"
    (root / "refs").mkdir(parents=True)
    for n in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / n, root / "refs" / n)
    shutil.copy(shared_data / "faces" / "obama" / "obama_03.jpg", root / "still.jpg")
    node, _, out, rep = run(root, tmp_path / "run", spec(model="builtin:tiny-ltx2", width=32, height=32))
    assert node.config["family"] == "auto" and node.config["audio"] is True
    assert rep["family"] == "ltx2" and rep["tiny_random"]["video_model"]
    assert rep["clips"][0]["video"]["sample_rate"] == 16000  # the clip record has the muxed audio's figures
    with av.open(str(out["video"].path / rep["clips"][0]["file"])) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
    assert V.expand(spec(model="builtin:tiny-ltx2", audio=False), Graph(root))[0].config["audio"] is False
    assert node.label.endswith(" on LTX-2")
    with pytest.raises(StageError, match="'wan22_ti2v', but generate.video.model 'builtin:tiny-ltx2' is a LTX-2"):
        V.expand(spec(model="builtin:tiny-ltx2", family="wan22_ti2v"), Graph(root))  # at plan time
    folder = VM.tiny_video_path("builtin:tiny-ltx2", root / "cache")
    with pytest.raises(StageError, match="is a LTX2ImageToVideoPipeline, not a"):  # and when loading
        VM.load_video_model(str(folder), family="wan22_ti2v")
    assert VM.family_of_ref("someone/Wan2.2-TI2V-5B-finetune").name == "wan22_ti2v"
    assert VM.family_of_ref("someone/ltx-2-finetune", "wan22_ti2v").name == "wan22_ti2v"  # a pattern is a guess
    assert VM.family_of_ref("someone/my-video-model") is None
