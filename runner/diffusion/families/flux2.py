"""FLUX.2: dev (a 32B MMDiT, Mistral Small 3.1 as text encoder, guidance-distilled) and klein
(4B / 9B, Qwen3 as text encoder, no guidance embedding; base and step-distilled checkpoints).
Both: 32-channel latents of their own VAE (x8), 2x2 patches folded into channels (128), then
normalized by the VAE's batch-norm running statistics, flattened to tokens with 4D
(t, row, col, layer) ids. Captions: the hidden states of three text-encoder layers stacked per
token (dev layers 10/20/30, klein 9/18/27), padded to 512 tokens. Rectified flow, logit-normal
sigmas shifted as the scheduler shifts. LoRA on the attention projections of the double-stream
blocks and the fused qkv+MLP input of the single-stream blocks."""

from __future__ import annotations

from runner.diffusion import memory
from runner.diffusion.families.base import (
    Family,
    GenerationArgs,
    LatentFormat,
    Objective,
    ReferenceArgs,
    SampleDefaults,
    TextEncoding,
    split_batch,
)
from runner.diffusion.families.comfykit import Layout, hidden, table, three

MAX_TOKENS = 512
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "to_qkv_mlp_proj")
_COMPONENTS = {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
               "scheduler": "FlowMatchEulerDiscreteScheduler"}
_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096, time_shift_type="exponential")


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        pe, _ = pipe.encode_prompt(list(captions), device=pipe.transformer.device, max_sequence_length=MAX_TOKENS)
    return split_batch({"prompt_embeds": pe})


def to_model_latents(pipe, raw):
    """Patchify 2x2 into channels, then (x - bn mean) / bn std (the VAE's running statistics)."""
    import torch

    x = type(pipe)._patchify_latents(raw)
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(x.device, x.dtype)
    return (x - mean) / std


def predict(c, noisy, sigmas, batch):
    import torch

    cls = type(c.pipe)
    b = noisy.shape[0]
    ids = cls._prepare_latent_ids(noisy).to(c.device)
    packed = cls._pack_latents(noisy.to(c.dtype))
    emb = batch.text["prompt_embeds"].to(c.device, c.dtype)
    guidance = None
    if c.denoiser.config.guidance_embeds:
        guidance = torch.full((b,), float(c.objective.guidance or 1.0), device=c.device, dtype=torch.float32)
    out = c.denoiser(hidden_states=packed, timestep=sigmas.to(c.dtype), guidance=guidance, encoder_hidden_states=emb,
                     txt_ids=cls._prepare_text_ids(emb).to(c.device), img_ids=ids, return_dict=False)[0]
    return cls._unpack_latents_with_ids(out[:, : packed.shape[1]], ids)


def _tiny_parts(text_hidden: int, *, guidance_embeds: bool):
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from runner.diffusion.families import tinykit

    tinykit.seeded(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * text_hidden, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    )
    tinykit.seeded(1)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # non-trivial running statistics, so the normalization is exercised
        vae.bn.running_mean.normal_(0.0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return transformer, vae, tinykit.flow_scheduler(**_SCHEDULER)


def build_tiny_klein(dest) -> None:
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from runner.diffusion.families import tinykit

    tok = tinykit.qwen_tokenizer(dest / "_tok")
    transformer, vae, scheduler = _tiny_parts(16, guidance_embeds=False)
    tinykit.seeded(2)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = Qwen3ForCausalLM(Qwen3Config(  # 28 layers: the pipeline reads hidden states 9, 18 and 27
        hidden_size=16, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=pad, eos_token_id=pad,
        pad_token_id=pad,
    ))
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=False)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_tok")


def build_tiny_dev(dest) -> None:
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from runner.diffusion.families import tinykit

    tok = tinykit.mistral_tokenizer(dest / "_tok")
    transformer, vae, scheduler = _tiny_parts(16, guidance_embeds=True)
    tinykit.seeded(2)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(  # 30 layers: the pipeline reads 10, 20 and 30
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 16,
                     "max_position_embeddings": 1024, "num_attention_heads": 2, "num_hidden_layers": 30,
                     "num_key_value_heads": 2, "head_dim": 8, "sliding_window": None, **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 16, "image_size": 32, "patch_size": 16, "num_channels": 3},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), image_seq_length=4, vision_feature_layer=-1, **ids,
    ))
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                         transformer=transformer)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_tok")


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed on the
# meta device by bench/memory/real_sizes.py from the published configs; activations per image
# token and per image at bf16, batch 1, 512 text tokens.
# FLUX.2 dev: transformer 32B, Mistral Small 3.1 24B.
DEV_SIZES = memory.sizes({"transformer": 32223.3e6, "text_encoder": 24011.4e6, "vae": 84.0e6},
                         denoiser="transformer", linear_share=1.0, lora_per_rank=3735552,
                         activations=(14683648.0, 7519178752.0), checkpointed=(688136.0, 352333824.0),
                         block=(283344.0, 145121280.0),
                         source="computed on the meta device (bench/memory/real_sizes.py)")
# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed on the
# meta device by bench/memory/real_sizes.py from the published configs; activations per image
# token and per image at bf16, batch 1, 512 text tokens.
# FLUX.2 klein 4B: transformer 3.9B, Qwen3-4B; klein 9B is larger.
KLEIN_SIZES = memory.sizes({"transformer": 3875.5e6, "text_encoder": 4022.5e6, "vae": 84.0e6},
                           denoiser="transformer", linear_share=1.0, lora_per_rank=860160,
                           activations=(3296784.0, 1688281088.0), checkpointed=(153608.0, 78649344.0),
                           block=(141744.0, 72597504.0),
                           source="computed on the meta device (bench/memory/real_sizes.py)")


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI (runner.diffusion.comfy): Black Forest Labs' checkpoint names (dev and
# klein share them); the single blocks' ``to_qkv_mlp_proj`` is already fused, as ``linear1``.

_FLUX2 = {
    r"transformer_blocks\.(\d+)": ("double_blocks.{}", {
        "attn.to_q": ("img_attn.qkv", 0, three), "attn.to_k": ("img_attn.qkv", 1, three),
        "attn.to_v": ("img_attn.qkv", 2, three),
        "attn.add_q_proj": ("txt_attn.qkv", 0, three), "attn.add_k_proj": ("txt_attn.qkv", 1, three),
        "attn.add_v_proj": ("txt_attn.qkv", 2, three),
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    }),
    r"single_transformer_blocks\.(\d+)": ("single_blocks.{}", {
        "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
    }),
}


def _klein_arch(cfg) -> str:
    width = hidden(cfg) if "num_attention_heads" in cfg else 0
    return {3072: "Flux.2-klein-4b", 4096: "Flux.2-klein-9b"}.get(width, "Flux.2-klein")


_FLUX2_REPO = "https://github.com/black-forest-labs/flux2"
DEV_COMFY = Layout(table("Flux2Transformer2DModel", _FLUX2), {}, lambda cfg: "Flux.2-dev", "flux2_dev", _FLUX2_REPO,
                   None)
KLEIN_COMFY = Layout(table("Flux2Transformer2DModel", _FLUX2), {}, _klein_arch, "flux2_klein", _FLUX2_REPO, None)


_COMMON = dict(
    denoiser="transformer",
    latents=LatentFormat(channels=32, downscale=8, patch=2,
                         normalization="2x2 patches into channels, then (x - vae.bn mean) / vae.bn std"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal", guidance=1.0),
    lora_targets=LORA_TARGETS,
    size_multiple=16,
    tiny_version=1,
    encode_captions=encode_captions,
    to_model_latents=to_model_latents,
    predict=predict,
    extra_conditioning="4D (t, row, col, layer) ids for image and text tokens",
)

KLEIN = Family(
    name="flux2_klein",
    sizes=KLEIN_SIZES,
    title="FLUX.2 klein",
    pipeline="Flux2KleinPipeline",
    components={**_COMPONENTS, "text_encoder": "Qwen3ForCausalLM", "tokenizer": "Qwen2TokenizerFast"},
    text=TextEncoding(encoders=("text_encoder",), outputs="Qwen3 hidden states of layers 9, 18, 27 stacked per token",
                      pooled=False, max_tokens=MAX_TOKENS),
    class_names=("Flux2KleinPipeline",),
    hub_patterns=(r"flux\.?2-klein",),
    sample=SampleDefaults(steps=28, guidance=4.0),
    tiny="tiny-flux2-klein",
    build_tiny=build_tiny_klein,
    variants={"base": "undistilled, ~50 steps with CFG", "distilled": "4 steps (model_index is_distilled)"},
    generation=GenerationArgs(negative="none", references=ReferenceArgs("Flux2KleinPipeline", 4)),  # CFG vs ""
    comfy=KLEIN_COMFY,
    **_COMMON,
)

DEV = Family(
    name="flux2",
    sizes=DEV_SIZES,
    title="FLUX.2 dev",
    pipeline="Flux2Pipeline",
    components={**_COMPONENTS, "text_encoder": "Mistral3ForConditionalGeneration", "tokenizer": "PixtralProcessor"},
    text=TextEncoding(encoders=("text_encoder",),
                      outputs="Mistral Small 3.1 hidden states of layers 10, 20, 30 stacked per token (system prompt)",
                      pooled=False, max_tokens=MAX_TOKENS),
    class_names=("Flux2Pipeline",),
    hub_patterns=(r"flux\.?2-dev",),
    sample=SampleDefaults(steps=50, guidance=4.0),
    tiny="tiny-flux2",
    single_file_types=("flux-2-dev",),  # klein files share its key layout and are read as dev
    build_tiny=build_tiny_dev,
    variants={"dev": "guidance-distilled: the guidance embedding takes objective.guidance while training"},
    generation=GenerationArgs(cfg=False, negative="none", references=ReferenceArgs("Flux2Pipeline", 10)),
    comfy=DEV_COMFY,
    **_COMMON,
)

FAMILIES = (DEV, KLEIN)
