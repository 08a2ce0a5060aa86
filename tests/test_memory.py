"""The GPU memory estimate of a train stage (runner.diffusion.memory) and the plan's check.

The figures are of the real models (Family.sizes); these tests check the estimate's shape (what
raises it, what lowers it), the published anchor it is held to (FLUX.1-dev LoRA at 1024 px fits a
24 GB card with an 8-bit base and checkpointing, as ai-toolkit documents), the plan's note and
refusal, and the activation counting itself on a tiny model (meta device = real tensors).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from runner.diffusion import families, memory
from runner.diffusion.memory import GIB, Settings, Target, estimate

SIZED = [f for f in families.all_families() if f.sizes is not None]
FLUX = families.get("flux1")
DEFAULTS = Settings.defaults()  # the schema's train defaults: 512 px, batch 1, rank 16, bf16, AdamW
FLUX_24GB = replace(DEFAULTS, resolution=1024, gradient_checkpointing=True, optimizer="adamw8bit",
                    quantize_base="int8", text_encoders="offload", offload_idle=True)


def loop(fam, **changes) -> float:
    return estimate(fam, replace(DEFAULTS, **changes)).loop


def peak(fam, **changes) -> float:
    return estimate(fam, replace(DEFAULTS, **changes)).peak


@pytest.mark.parametrize("fam", SIZED, ids=lambda f: f.name)
def test_estimate_grows_with_resolution_batch_and_rank(fam):
    for key, values in (("resolution", (512, 768, 1024)), ("batch_size", (1, 2, 4)), ("rank", (8, 32, 128))):
        loops = [loop(fam, **{key: v}) for v in values]
        peaks = [peak(fam, **{key: v}) for v in values]
        assert loops == sorted(set(loops)), key  # strictly growing
        assert peaks == sorted(peaks), key  # the caching peak does not depend on batch or rank


@pytest.mark.parametrize("fam", SIZED, ids=lambda f: f.name)
def test_each_switch_lowers_the_loop(fam):
    base = replace(DEFAULTS, resolution=1024)
    loop = estimate(fam, base).loop
    for change in ({"gradient_checkpointing": True}, {"quantize_base": "int8"}, {"quantize_base": "fp8"},
                   {"optimizer": "adamw8bit"}, {"text_encoders": "free"}, {"offload_idle": True}):
        assert estimate(fam, replace(base, **change)).loop < loop, change
    assert estimate(fam, replace(base, mixed_precision="no")).loop > loop


def test_sizes_are_the_published_ones():
    """Parameter counts computed on the meta device against the model cards' figures."""
    published = {"flux1": ("transformer", 11.9e9), "sdxl": ("unet", 2.57e9), "sd15": ("unet", 0.86e9),
                 "qwen_image": ("transformer", 20.4e9), "z_image": ("transformer", 6.15e9),
                 "flux2": ("transformer", 32.2e9), "flux2_klein": ("transformer", 3.9e9), "sd3": ("transformer", 8.1e9)}
    for fam in SIZED:
        comp, n = published[fam.name]
        assert fam.sizes.params[comp] == pytest.approx(n, rel=0.03), fam.name
    assert FLUX.sizes.params["text_encoder_2"] == pytest.approx(4.76e9, rel=0.01)  # T5-XXL encoder
    assert FLUX.sizes.params["text_encoder"] == pytest.approx(123e6, rel=0.01)  # CLIP-L


def test_flux_at_1024_fits_24gb_only_with_the_8bit_base():
    """ai-toolkit's config/examples/train_lora_flux_24gb.yaml: up to 1024 px, batch 1, bf16,
    rank 16, checkpointing, 8-bit base (quantize: true), 8-bit AdamW, latents cached; here also the
    text encoders and the VAE off the GPU during the loop."""
    a10g = 22.5 * GIB
    assert estimate(FLUX, FLUX_24GB).peak < a10g
    assert estimate(FLUX, replace(FLUX_24GB, quantize_base="none")).peak > a10g  # the bf16 transformer: 22 GiB
    e = estimate(FLUX, FLUX_24GB)
    assert 10 * GIB < e.weights < 12 * GIB  # 11.9B at 1 byte


def test_switches_that_fit_are_computed_in_order():
    s = replace(DEFAULTS, resolution=1024)
    changed, fitted = memory.settings_that_fit(FLUX, s, 22.5 * GIB)
    assert changed[0] == "train.gradient_checkpointing: true"
    assert "train.memory.quantize_base: int8" in changed
    assert fitted.peak <= 22.5 * GIB
    # one switch fewer does not fit: the list is the shortest prefix that does
    fewer = s
    for label, change in memory.SWITCHES:
        if label == changed[-1]:
            break
        fewer = replace(fewer, **change)
    assert estimate(FLUX, fewer).peak > 22.5 * GIB
    assert memory.settings_that_fit(FLUX, s, 4 * GIB) is None


def test_text_encoders_that_train_stay_resident():
    s = replace(DEFAULTS, train_text_encoder=True, text_encoders="free")
    fam = families.get("sd15")
    assert "text_encoder" in estimate(fam, s).resident
    changed, _ = memory.settings_that_fit(fam, replace(s, resolution=1024, batch_size=8), 8 * GIB) or ([], None)
    assert "train.memory.text_encoders: free" not in changed


# --------------------------------------------------------------------------- the plan


def trainer_config(**train):
    from runner.diffusion.trainer import TrainerConfig

    return TrainerConfig.from_dict({"character": "hero", "trigger": "hrochr", **train})


def test_plan_note_names_the_gpu_and_the_parts():
    cfg = trainer_config(base_model="black-forest-labs/FLUX.1-dev", resolution=1024, gradient_checkpointing=True,
                         optimizer="adamw8bit",
                         memory={"quantize_base": "int8", "text_encoders": "offload", "offload_idle": True})
    note = memory.plan_note("hero:train", cfg, Target("A10G", 22.5, "refuse"))
    assert note.startswith("peak GPU memory ~") and " on A10G (22.5 GiB) (weights " in note
    assert "LoRA+optimizer" in note and "activations" in note and "FLUX.1 figures" in note


def test_plan_refuses_a_stage_that_cannot_fit_with_settings_that_would():
    cfg = trainer_config(base_model="black-forest-labs/FLUX.1-dev", resolution=1024)
    with pytest.raises(memory.GpuMemoryError) as err:
        memory.plan_note("hero:train", cfg, Target("A10G", 22.5, "refuse"))
    assert err.value.exit_code == 2
    assert "does not fit the A10G" in err.value.message
    assert "train.gradient_checkpointing: true" in err.value.hint
    assert "train.memory.quantize_base: int8" in err.value.hint
    assert "hardware.stage_gpu: {train: " in err.value.hint
    warned = memory.plan_note("hero:train", cfg, Target("A10G", 22.5, "warn"))
    assert "DOES NOT FIT" in warned
    assert memory.plan_note("hero:train", cfg, Target("A10G", 22.5, "off")) is None


def test_cpu_runs_and_tiny_models_are_never_refused():
    big = trainer_config(base_model="black-forest-labs/FLUX.1-dev", resolution=2048, batch_size=8)
    note = memory.plan_note("hero:train", big, Target("a GPU", None, "warn", cpu=True))
    assert "peak GPU memory" in note and "not checked" in note
    tiny = trainer_config(base_model="builtin:tiny-flux1", resolution=2048, batch_size=8)
    assert memory.plan_note("hero:train", tiny, Target("T4", 15.0, "refuse")) is None


def test_the_gpu_of_a_stage_and_its_memory():
    remote = {"backend": "modal", "device": "auto", "gpu_memory_gib": {"A10G": 24.0}, "memory_check": "refuse"}
    assert memory.target_of(remote, "A10G") == Target("A10G", 24.0, "refuse")
    assert memory.target_of({**remote, "gpu_memory_gib": {}}, "H100").capacity_gib == 79.6
    assert memory.target_of(remote, "XYZ").capacity_gib is None
    local_cpu = memory.target_of({"backend": "local", "device": "cpu"}, "A10G")
    assert local_cpu.cpu and local_cpu.capacity_gib is None
    unknown = trainer_config(base_model="black-forest-labs/FLUX.1-dev", resolution=1024)
    assert "set hardware.gpu_memory_gib" in memory.plan_note("hero:train", unknown, Target("XYZ", None, "refuse"))
    single = trainer_config(base_model="/models/flux1-dev.safetensors")
    assert "single-file checkpoint" in memory.plan_note("hero:train", single, Target("A10G", 22.5, "refuse"))


def test_default_memory_settings_leave_the_node_config_unchanged():
    cfg = {"base_model": "builtin:tiny-sd", "memory": memory.default_memory()}
    assert "memory" not in memory.keyed(cfg)
    assert "memory" not in memory.keyed({"base_model": "builtin:tiny-sd", "memory": {"quantize_base": "none"}})
    assert memory.keyed({"base_model": "builtin:tiny-sd"}) == {"base_model": "builtin:tiny-sd"}
    changed = {"base_model": "builtin:tiny-sd", "memory": {**memory.default_memory(), "quantize_base": "int8"}}
    assert memory.keyed(changed) == changed


SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man}
dataset:
  sources: [{images: ../photos}]
train: {base_model: black-forest-labs/FLUX.1-dev, resolution: 1024, gradient_checkpointing: true, MEMORY}
hardware: {backend: modal, stage_gpu: {train: A10G}}
"""


def plan_train(tmp_path: Path, memory_settings: str):
    from runner.plan.graph import expand_spec
    from runner.spec import load_spec

    (tmp_path / "runner.toml").write_text("")
    (tmp_path / "photos").mkdir(exist_ok=True)
    (tmp_path / "specs").mkdir(exist_ok=True)
    path = tmp_path / "specs" / "hero.yaml"
    path.write_text(SPEC.replace("MEMORY", memory_settings))
    return [n for n in expand_spec(load_spec(path)) if n.kind == "train"]


def test_the_train_stage_plans_with_its_estimate_and_refuses_past_its_gpu(tmp_path):
    (node,) = plan_train(tmp_path, "memory: {quantize_base: int8, text_encoders: offload, offload_idle: true}")
    assert any(n.startswith("peak GPU memory ~") and "on A10G" in n for n in node.notes)
    assert node.config["memory"]["quantize_base"] == "int8"
    with pytest.raises(memory.GpuMemoryError, match="does not fit the A10G"):
        plan_train(tmp_path, "memory: {}")


# --------------------------------------------------------------------------- counting activations


@pytest.mark.slow  # ~9 s: diffusers and peft imported, the tiny transformer run on meta and on the CPU at 2 sizes
def test_activation_counting_on_meta_matches_real_tensors():
    """The meta device sees the same saved tensors as a CPU run of the tiny FLUX.1 transformer:
    what the real models' figures are computed with counts what a real run keeps."""
    import torch
    from diffusers import FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))
    text = {"prompt_embeds": (16, 32), "pooled": (32,)}
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**config)
    torch.manual_seed(0)
    real = FluxTransformer2DModel(**config)
    fam = FLUX
    a = memory.measure_activations(fam, meta, text, (64, 128), latents=(4, 8))
    b = memory.measure_activations(fam, real, text, (64, 128), latents=(4, 8))
    for key in a:  # the CPU kernels save a few small tensors differently (within 3% at these tiny widths)
        assert a[key] == pytest.approx(b[key], rel=0.03), key
    assert a["checkpointed"][0] < a["activations"][0] and a["block"][0] > 0


# --------------------------------------------------------------------------- the trainer


def _train_config(memory_settings: dict) -> dict:
    from runner.stages import train as T

    return T.train_config({
        "base_model": "builtin:tiny-flux1", "resolution": 32, "buckets": {"enabled": False},
        "lora": {"rank": 4, "alpha": 4}, "steps": 2, "lr": 1e-2, "batch_size": 1, "mixed_precision": "no",
        "lr_scheduler": {"name": "constant"}, "memory": memory_settings,
        "checkpoints": {"every_steps": 2, "keep_last": 1, "sample_steps": 1, "sample_seeds": [1],
                        "sample_prompts": ["{trigger} {class}"], "validation_fraction": 0.0},
    }, character="demo", trigger="sks", class_word="person")


def _run(cfg: dict, shared_data: Path, root: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_helpers import make_dataset

    from runner.diffusion.trainer import LoraTrainer

    dataset = make_dataset(shared_data, root / "ds", n=1)
    trainer = LoraTrainer(cfg, dataset_dir=dataset, out_dir=root / "out", scratch_dir=root / "scratch",
                          cache_dir=root / "cache", device="cpu")
    return trainer, trainer.run()


@pytest.mark.slow  # the tiny FLUX.1 built once (~2 s, shared), then 2 steps and one checkpoint
def test_freed_text_encoders_train_without_samples(shared_data: Path, tmp_path: Path):
    trainer, index = _run(_train_config({"text_encoders": "free"}), shared_data, tmp_path)
    assert trainer.pipe.text_encoder is None and trainer.pipe.text_encoder_2 is None
    assert index["checkpoints"] and not index["checkpoints"][-1]["samples"]


def test_quantized_base_without_torchao_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(memory.UserError, match="torchao is not installed") as err:
        memory.quantize_denoiser(object(), "int8", "cpu")
    assert "character-runner[quantize]" in err.value.hint


@pytest.mark.slow  # as above, with the transformer's linears quantized by torchao on the CPU
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_base_trains_a_lora(kind: str, shared_data: Path, tmp_path: Path):
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    from safetensors.torch import load_file

    trainer, index = _run(_train_config({"quantize_base": kind}), shared_data, tmp_path)
    base = trainer.denoiser.transformer_blocks[0].attn.to_q.base_layer.weight
    assert "torchao" in type(base).__module__
    lora = load_file(str(tmp_path / "out" / "lora" / index["checkpoints"][-1]["diffusers"]))
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    assert any(f"in {kind}" in line for line in trainer.placement.done)


class _Module:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def to(self, device):
        self.log.append((self.name, str(device)))
        return self


class _Pipe:
    """A stand-in pipeline that records where its components are sent and the offload hooks."""

    def __init__(self, fam) -> None:
        self.log: list = []
        for name in (fam.denoiser, "vae", *fam.text.encoders):
            setattr(self, name, _Module(self.log, name))

    def enable_model_cpu_offload(self, device=None):
        self.log.append(("offload hooks", str(device)))

    def remove_all_hooks(self):
        self.log.append(("hooks removed", ""))


def test_placement_on_cuda_moves_what_train_memory_says(monkeypatch):
    """The CUDA side of Placement without a GPU: which component goes where, and when the
    model CPU offload hooks are on (torch.cuda.empty_cache stubbed)."""
    import torch

    from runner.spec.sections import MemoryConfig

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cfg = MemoryConfig.from_dict({"text_encoders": "offload", "offload_idle": True})
    place = memory.Placement(cfg, "cuda")
    assert place.load_device == "cpu"
    pipe = _Pipe(FLUX)
    place.place(pipe, FLUX)
    assert pipe.log == []  # offload_idle: the caches fill under the hooks, nothing moved yet
    with place.caching(pipe):
        assert pipe.log == [("offload hooks", "cuda")]
    assert place.after_caches(pipe, FLUX) == ["text_encoder", "text_encoder_2"]
    moved = dict(pipe.log[2:])
    assert moved == {"transformer": "cuda", "vae": "cpu", "text_encoder": "cpu", "text_encoder_2": "cpu"}
    pipe.log.clear()
    with place.sampling(pipe, FLUX):
        assert pipe.log == [("offload hooks", "cuda")]
    assert pipe.log[1] == ("hooks removed", "") and dict(pipe.log[2:])["transformer"] == "cuda"

    keep = memory.Placement(MemoryConfig.from_dict({}), "cuda")
    assert keep.load_device == "cuda"
    pipe = _Pipe(FLUX)
    keep.place(pipe, FLUX)
    keep.after_caches(pipe, FLUX)
    assert all(device == "cuda" for _, device in pipe.log)
    assert isinstance(keep.sampling(pipe, FLUX), type(__import__("contextlib").nullcontext()))


def test_placement_frees_text_encoders_on_any_device():
    from runner.spec.sections import MemoryConfig

    place = memory.Placement(MemoryConfig.from_dict({"text_encoders": "free"}), "cpu")
    pipe = _Pipe(FLUX)
    assert place.after_caches(pipe, FLUX) == [] and place.freed
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.log == []
