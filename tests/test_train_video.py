"""The train_video stage: a character LoRA for a video family, trained from stills (the caption
stage's images) and clips (cut from a real video, carphone.mp4), on the tiny random Wan 2.2 5B
(the video family the runner trains so far).

Plan: the node's base model defaults to generate.video.model, frame buckets the family's VAE
cannot take are refused naming the nearest good counts, an image model is refused, variants make
a stage each. Run: a few steps on CPU lower the loss of what was trained on (fixed noise and
timesteps), a run stopped after a checkpoint resumes to the same LoRA as an uninterrupted one,
the latents of a second run are all cache hits, the LoRA file loads with the pipeline's own
``load_lora_weights`` and changes the transformer's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- data


def make_clips(shared_data: Path, dest: Path, *, n: int = 2, frames: int = 9, side: int = 64) -> Path:
    """A video_clips-stage `clips` folder: ``n`` clips of ``frames`` frames of carphone.mp4."""
    import av

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "clips").mkdir(exist_ok=True)
    decoded = []
    with av.open(str(shared_data / "video" / "carphone.mp4")) as src:
        for frame in src.decode(video=0):
            decoded.append(frame.to_image().convert("RGB"))
            if len(decoded) >= n * frames:
                break
    records = []
    for i in range(n):
        name = f"clips/clip{i:02d}.mp4"
        with av.open(str(dest / name), "w") as out:
            stream = out.add_stream("libx264", rate=12)
            stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
            for img in decoded[i * frames:(i + 1) * frames]:
                for packet in stream.encode(av.VideoFrame.from_image(img.resize((side, side)))):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        records.append({"id": f"clip{i:02d}", "clip": name, "caption": "sks person, close up, moving naturally",
                        "frames": frames, "fps": 12, "width": side, "height": side, "shot": "close_up"})
    (dest / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dest


def _config(model: str = "builtin:tiny-wan22-ti2v", **over) -> dict:
    from runner.spec.variants import apply_variant

    section = {"base_model": model, "resolution": 32, "buckets": {"enabled": False}, "frame_buckets": [1, 9],
               "lora": {"rank": 4, "alpha": 4}, "steps": 6, "lr": 2e-2, "mixed_precision": "no",
               "lr_scheduler": {"name": "constant"}, "gradient_checkpointing": False,
               "checkpoints": {"every_steps": 3, "keep_last": 2, "validation_fraction": 0.0}, **over}
    cfg = apply_variant(section, None, name="train_video")
    cfg.update({"character": "demo", "trigger": "sks", "class_word": "person", "variant": None, "device": "cpu"})
    return cfg


def _trainer(cfg: dict, dataset: Path | None, clips: list[Path], root: Path, cache: Path, **kw):
    from runner.diffusion.video_trainer import VideoLoraTrainer

    return VideoLoraTrainer(cfg, dataset_dir=dataset, clips_dirs=clips, out_dir=root / "out",
                            scratch_dir=root / "scratch", cache_dir=cache, device="cpu", **kw)


# --------------------------------------------------------------------------- run


@pytest.mark.slow  # the tiny Wan 2.2 5B built once (~3 s); 6 + 3 + 3 steps on 9-frame 32 px clips and stills
def test_video_lora_trains_resumes_and_loads(shared_data: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    dataset = make_dataset(shared_data, tmp_path / "ds", n=2)
    clips = make_clips(shared_data, tmp_path / "clips")
    cfg, cache = _config(), tmp_path / "cache"

    ref = _trainer(cfg, dataset, [clips], tmp_path / "ref", cache)
    index = ref.run()
    assert index["model_family"] == "wan22_ti2v" and index["tiny_random_model"] and index["modality"] == "video"
    assert index["dataset"]["train_images"] == 2 and index["dataset"]["train_clips"] == 2
    assert index["dataset"]["frames"] == {"1": 2, "9": 2}
    assert [c["step"] for c in index["checkpoints"]] == [3, 6]
    lora = tmp_path / "ref" / "out" / "lora"
    assert all((lora / c["diffusers"]).is_file() for c in index["checkpoints"])
    trained = ref.validation_loss(ref.train_ex)  # fixed timesteps and noise per item
    for m in ref.trained:
        m.disable_adapters()
    untrained = ref.validation_loss(ref.train_ex)
    for m in ref.trained:
        m.enable_adapters()
    assert trained < untrained, (trained, untrained)
    _renders_in_the_report(cfg, tmp_path / "ref" / "out")

    stopped = _trainer(cfg, dataset, [clips], tmp_path / "run", cache, stop_after_step=3).run()
    assert stopped == {"stopped_at": 3}
    again = _trainer(cfg, dataset, [clips], tmp_path / "run", cache).run()
    assert again["resumed_from_step"] == 3 and again["cache"]["misses"] == {"latents": 0, "text": 0}
    a = load_file(str(tmp_path / "run" / "out" / "lora" / again["checkpoints"][-1]["diffusers"]))
    b = load_file(str(lora / index["checkpoints"][-1]["diffusers"]))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    # the public loader reads the file, and the LoRA changes what the transformer predicts
    from runner.diffusion import families

    fam = families.get("wan22_ti2v")
    pipe = families.load_pipeline(fam, families.tiny_path(fam and "builtin:" + fam.tiny, cache))
    x = torch.randn(1, pipe.transformer.config.in_channels, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 8, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        before = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        pipe.load_lora_weights(str(lora / Path(index["checkpoints"][-1]["diffusers"]).parent),
                               weight_name=Path(index["checkpoints"][-1]["diffusers"]).name)
        after = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
    assert not torch.allclose(before, after)


def _renders_in_the_report(cfg: dict, out: Path) -> None:
    """The stage's report section renders the run (the report's strict templates: a key a
    one-expert run lacks, such as diffusers_2, must not fail the report)."""
    from runner.core import contract
    from runner.stages import report, train_video

    outputs = {name: contract.Artifact(name, out / name) for name in ("lora", "logs")}
    (section,) = train_video.report_sections(cfg, outputs, {})
    html = report._jinja_env().get_template(section.template).render(**section.context, stage_id="x", section=section)
    assert "Tiny random model" in html and "<h3>Checkpoints</h3>" in html


def test_a_frame_bucket_the_vae_cannot_take_is_refused_at_run(shared_data: Path, tmp_path: Path):
    from runner.diffusion.trainer import TrainError

    clips = make_clips(shared_data, tmp_path / "clips", n=1)
    with pytest.raises(TrainError, match=r"frame_buckets: 8: 8 is not k x 4 \+ 1 \(nearest: 5, 9\)"):
        _trainer(_config(frame_buckets=[1, 8]), None, [clips], tmp_path / "r", tmp_path / "cache").run()


def test_clips_shorter_than_every_bucket_are_left_out_and_nothing_left_is_refused(shared_data: Path,
                                                                                   tmp_path: Path):
    from runner.diffusion.trainer import TrainError

    clips = make_clips(shared_data, tmp_path / "clips", n=1, frames=5)
    with pytest.raises(TrainError, match="nothing to train on"):
        _trainer(_config(frame_buckets=[9]), None, [clips], tmp_path / "r", tmp_path / "cache").run()


# --------------------------------------------------------------------------- plan


SPEC = """\
version: 1
character: {{name: hero, trigger: hrochr, class_word: man}}
dataset:
  sources: [{{images: photos}}]
{extra}
"""


def _plan(tmp_path: Path, extra: str):
    from runner.plan.graph import expand_spec
    from runner.spec import load_spec

    (tmp_path / "photos").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (64, 64), "gray").save(tmp_path / "photos" / "x.png")
    spec_file = tmp_path / "hero.yaml"
    spec_file.write_text(SPEC.format(extra=extra))
    return {n.id: n for n in expand_spec(load_spec(spec_file))}


def test_plan_takes_the_video_model_and_makes_a_stage_per_variant(tmp_path: Path):
    nodes = _plan(tmp_path, "generate:\n  video: {model: builtin:tiny-wan22-ti2v, source: photos/x.png}\n"
                            "train_video:\n  frame_buckets: [1, 17]\n  variants: {rank8: {lora: {rank: 8}}}\n")
    base, r8 = nodes["hero:train_video[base]"], nodes["hero:train_video[rank8]"]
    assert base.config["base_model"] == r8.config["base_model"] == "builtin:tiny-wan22-ti2v"
    assert r8.config["lora"]["rank"] == 8 and base.config["lora"]["rank"] == 16
    assert "Wan 2.2 TI2V 5B" in base.label and set(base.inputs) == {"dataset"}


@pytest.mark.parametrize("extra, message", [
    ("train_video: {base_model: builtin:tiny-wan22-ti2v, frame_buckets: [1, 12]}",
     r"train_video.frame_buckets: 12 is not k x 4 \+ 1 \(nearest: 9, 13\) for Wan 2.2 TI2V 5B"),
    ("train_video: {base_model: builtin:tiny-ltx, frame_buckets: [1, 12]}",
     r"train_video.frame_buckets: 12 is not k x 8 \+ 1 \(nearest: 9, 17\) for LTX-Video 0.9"),
    ("train_video: {base_model: builtin:tiny-wan22-i2v, experts: high}",
     r"train_video.experts: \"high\" is not allowed"),
    ("train_video: {base_model: builtin:tiny-sd}", r"builtin:tiny-sd is .*an image model"),
    ("train_video: {base_model: builtin:tiny-wan22-ti2v, model_family: ltx2}",
     r"model_family is ltx2 but .* is a Wan 2.2 TI2V 5B model"),
    ("train_video: {}", r"train_video.base_model is not set and the spec has no generate.video"),
    ("train_video: {base_model: builtin:tiny-wan22-ti2v, images: {use: false}, clips: {enabled: false}}",
     "train_video has nothing to train on"),
])
def test_plan_refuses_what_cannot_train(tmp_path: Path, extra: str, message: str):
    from runner.core.errors import UserError

    with pytest.raises(UserError, match=message):
        _plan(tmp_path, extra)


def test_aldar_kose_plans_a_video_lora_for_the_video_model(tmp_path: Path, shared_data: Path):
    """specs/aldar_kose.yaml names generate.video.family and a train_video section: the plan has
    both stages, the LoRA made for the video stage's Wan 2.2 5B, on a GPU."""
    import shutil

    from runner.plan.graph import expand_spec
    from runner.spec import load_spec

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "specs").mkdir()
    (tmp_path / "runner.toml").write_text("")
    shutil.copy(repo / "specs" / "aldar_kose.yaml", tmp_path / "specs" / "aldar_kose.yaml")
    for folder in ("reference", "illustrations"):
        (tmp_path / "data" / "aldar_kose" / folder).mkdir(parents=True)
        shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", tmp_path / "data" / "aldar_kose" / folder)
    nodes = {n.id: n for n in expand_spec(load_spec(tmp_path / "specs" / "aldar_kose.yaml"))}
    tv, video = nodes["aldar_kose:train_video"], nodes["aldar_kose:video"]
    assert tv.config["base_model"] == video.config["model"] == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert "Wan 2.2 TI2V 5B" in tv.label and "Wan 2.2 TI2V 5B" in video.label
    assert tv.gpu and video.gpu and set(tv.inputs) == {"dataset"}
    assert any("peak GPU memory" in n and "33x512x512" in n for n in tv.notes), tv.notes


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_json", "missing"])
def test_broken_clips_are_refused_naming_the_file(shared_data: Path, tmp_path: Path, damage: str):
    """A clip that is not a video, one cut short, a manifest line that is not JSON and a listed
    clip that is gone: each a TrainError naming the file, before any step."""
    from runner.diffusion.trainer import TrainError

    clips = make_clips(shared_data, tmp_path / "clips", n=1)
    clip = clips / "clips" / "clip00.mp4"
    if damage == "garbage":
        clip.write_bytes(b"not a video at all" * 100)
    elif damage == "truncated":
        clip.write_bytes(clip.read_bytes()[:600])
    elif damage == "bad_json":
        (clips / "clips.jsonl").write_text((clips / "clips.jsonl").read_text() + "{oops\n")
    else:
        clip.unlink()
    expect = {"garbage": "clip00.mp4: cannot read the clip",
              "truncated": r"clip00.mp4: (cannot read the clip|\d+ frames)",
              "bad_json": r"clips.jsonl:2: not valid JSON", "missing": "clip 'clips/clip00.mp4' is missing"}[damage]
    with pytest.raises(TrainError, match=expect):
        _trainer(_config(), None, [clips], tmp_path / "r", tmp_path / "cache").run()
    assert not (tmp_path / "r" / "out").exists()
