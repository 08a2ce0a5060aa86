"""LTX-2 (Lightricks): an audio-video DiT (19B: a video stream and an audio stream with
cross-attention between them) on 128-channel video latents (32x spatial, 8x temporal: 8k+1
frames at multiples of 32 px) and audio latents of a mel-spectrogram VAE, decoded to a waveform by
a vocoder. Captions: Gemma 3's hidden states of every layer, stacked, through the text
connectors (1024 tokens, with a mask). Image-to-video: ``LTX2ImageToVideoPipeline`` (``image=``,
strength 1) and ``LTX2ConditionPipeline`` (``conditions=[LTX2VideoCondition(frames, index,
strength)]``, a partial strength). Every clip is generated with its audio; the video stage saves
the audio into the mp4 when ``generate.video.audio`` is on and drops it otherwise.

``builtin:tiny-ltx2``: a 1-layer transformer (video 2x8, audio 2x4 heads), a 1-block VAE on
4-channel latents (2x spatial and 2x temporal compression: 9 frames are 5 latent frames), a
tiny audio VAE and vocoder (16 kHz), a 1-layer Gemma 3 (16 wide, with a 1-layer SigLIP tower)
and a byte-level tokenizer with Gemma's special tokens. Random weights: its clips are noise and its audio is hiss.

Training (``train_video``) trains the video stream only, as Lightricks' own trainer does without
``with_audio`` (its audio modality is None):

- captions are cached as what ``LTX2ImageToVideoPipeline.__call__`` hands the transformer: Gemma's
  stacked hidden states (``encode_prompt``) through the frozen text connectors, i.e. the video
  connector's embeddings and its mask (Gemma's raw stack, 49 layers x 3840 for 1024 tokens, would
  be ~770 MB a caption; the connectors' output is 1024 x 3840);
- latents, packing, the clean key frame (per-token timesteps, 0 on latent frame 0) and the
  velocity target are LTX-Video's (:mod:`.ltx_video`): the same ``_normalize_latents`` /
  ``_pack_latents`` and conditioning mask; video RoPE coordinates from
  ``rope.prepare_video_coords`` at the training frame rate ``TRAIN_FPS`` (24, the pipeline's
  default ``frame_rate``);
- diffusers' transformer always runs its audio stream and has no zero-length audio (its audio
  RoPE cannot reshape 0 tokens), so the audio stream gets one zero latent token with a one-token
  zero caption, and ``isolate_modalities=True`` switches off the audio-to-video and
  video-to-audio attention (the model's own switch, which the pipeline's modality guidance
  uses): the video prediction is then exactly the audio-free one, whatever the audio inputs
  (tests/test_video_lora_ltx.py checks it), and the audio output is dropped. The loss is the
  video loss; the LoRA sits on the video stream's attention only (``LORA_TARGETS``)."""

from __future__ import annotations

from pathlib import Path

from runner.diffusion.families.base import Family, GenerationArgs, LatentFormat, Objective, SampleDefaults, TextEncoding
from runner.diffusion.families.comfykit import Layout, table
from runner.diffusion.families.ltx_video import TRAIN_FPS, encode_video, pack, patches, to_model_latents
from runner.diffusion.families.ltx_video import token_timesteps, unpack
from runner.diffusion.families.videokit import PipelineKind, VideoArgs

TINY_VERSION = 2  # v2: the VAE's encoder compresses time 2x, as its config (and decoder) say
TINY_SEED = 11
# the video stream's attention projections (the audio stream's and the cross-modal ones have
# their own names: audio_attn*, audio_to_video_attn, video_to_audio_attn), as LTX-2's trainer does
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0")


def build_tiny(dest: Path) -> None:
    import torch
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2ImageToVideoPipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from runner.diffusion.families import tinykit, videokit

    tokenizer = videokit.gemma_tokenizer(dest / "_tok")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = videokit.gemma3_text_encoder(tokenizer, hidden=16)
        width, layers = text_encoder.config.text_config.hidden_size, text_encoder.config.text_config.num_hidden_layers
        torch.manual_seed(TINY_SEED + 1)
        transformer = LTX2VideoTransformer3DModel(
            in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
            audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1, qk_norm="rms_norm_across_heads",
            caption_channels=width, rope_double_precision=False, rope_type="split")
        torch.manual_seed(TINY_SEED + 2)
        connectors = LTX2TextConnectors(
            caption_channels=width, text_proj_in_factor=layers + 1, video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
            rope_double_precision=False, causal_temporal_positioning=False, rope_type="split")
        torch.manual_seed(TINY_SEED + 3)
        vae = AutoencoderKLLTX2Video(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
            layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
            decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
            downsample_type=("spatiotemporal",), upsample_residual=(False,), upsample_factor=(1,),
            timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
        torch.manual_seed(TINY_SEED + 4)
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
            resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
            mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8)
        torch.manual_seed(TINY_SEED + 5)
        vocoder = LTX2Vocoder(in_channels=2 * 8, hidden_channels=16, out_channels=2, upsample_kernel_sizes=[4, 4],
                              upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                              leaky_relu_negative_slope=0.1, output_sampling_rate=16000)
    pipe = LTX2ImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, connectors=connectors,
                                    transformer=transformer, vocoder=vocoder)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_tok")


# ---------------------------------------------------------------------------------------------
# training: the video stream (see the module docstring)


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    """Per caption, what ``__call__`` gives the transformer's video stream: ``encode_prompt``
    (Gemma's stacked hidden states, left-padded to 1024 tokens, and their mask) through the
    frozen ``connectors`` -> the video embeddings ("prompt_embeds") and their mask ("mask")."""
    import torch

    from runner.diffusion.families.base import split_batch

    conn = pipe.connectors
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False,
                                                device=pipe.text_encoder.device)
        side = getattr(pipe.tokenizer, "padding_side", "left")  # as __call__ reads it ("left" for Gemma)
        video, _audio, video_mask = conn(embeds.to(conn.device, conn.dtype), mask.to(conn.device), padding_side=side)
    return split_batch({"prompt_embeds": video, "mask": video_mask})


def _silent_audio(tr, batch: int, device, dtype):
    """One zero audio latent token, its RoPE coordinates and a one-token zero caption of the width
    the audio stream reads (the caption projection's input, or the audio width without one)."""
    import torch

    cfg = tr.config
    width = (tr.audio_caption_projection.linear_1.in_features if cfg.use_prompt_embeddings
             else cfg.audio_num_attention_heads * cfg.audio_attention_head_dim)
    latents = torch.zeros(batch, 1, cfg.audio_in_channels, device=device, dtype=dtype)
    context = torch.zeros(batch, 1, width, device=device, dtype=dtype)
    return latents, tr.audio_rope.prepare_audio_coords(batch, 1, device), context


def predict(c, noisy, sigmas, batch, *, audio=None):
    """The LTX-2 transformer's video prediction on a noisy clip (B, C, F, h, w), called as the
    image-to-video pipeline's loop calls it, the audio stream isolated (see the module docstring);
    ``audio`` (tests): (latents, coords, context) instead of the one silent token."""
    import torch

    device, dtype = c.device, c.dtype  # read once: each read walks the model's modules
    b, _, f, h, w = noisy.shape
    tr = c.denoiser
    p, pt = patches(tr)
    t = sigmas.to(device, torch.float32) * 1000.0
    a_latents, a_coords, a_context = audio or _silent_audio(tr, b, device, dtype)
    ones = torch.ones(b, a_context.shape[1], device=device, dtype=torch.long)
    video, _ = tr(hidden_states=pack(noisy.to(device, dtype), p, pt), audio_hidden_states=a_latents,
                  encoder_hidden_states=batch.text["prompt_embeds"].to(device, dtype),
                  audio_encoder_hidden_states=a_context,
                  timestep=token_timesteps(sigmas, noisy.shape, p, pt, device), audio_timestep=t, sigma=t,
                  encoder_attention_mask=batch.text["mask"].to(device, torch.long), audio_encoder_attention_mask=ones,
                  num_frames=f // pt, height=h // p, width=w // p, fps=TRAIN_FPS, audio_num_frames=a_latents.shape[1],
                  video_coords=tr.rope.prepare_video_coords(b, f // pt, h // p, w // p, device, fps=TRAIN_FPS),
                  audio_coords=a_coords, isolate_modalities=True, use_cross_timestep=True, return_dict=False)
    return unpack(video, f // pt, h // p, w // p, p, pt)


# The LoRA file for ComfyUI (runner.diffusion.comfy): the original LTX-2 checkpoint (and ComfyUI's
# LTXAV model, comfy/ldm/lightricks/av_model.py) names every block's attention and feed-forward
# projections as diffusers does (video: attn1, attn2, ff; audio: audio_attn1, audio_attn2,
# audio_ff; cross-modal: audio_to_video_attn, video_to_audio_attn); the stem is renamed
# (patchify_proj, adaln_single, ...), not trained.
_ATTN = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
BLOCK = {f"{a}.{proj}": f"{a}.{proj}" for a in _ATTN for proj in ("to_q", "to_k", "to_v", "to_out.0")}
BLOCK.update({f"{ff}.{proj}": f"{ff}.{proj}" for ff in ("ff", "audio_ff") for proj in ("net.0.proj", "net.2")})
COMFY = Layout(table("LTX2VideoTransformer3DModel", {r"transformer_blocks\.(\d+)": ("transformer_blocks.{}", BLOCK)}),
               {}, lambda cfg: "LTX-2", "ltx2", "https://github.com/Lightricks/LTX-2", None)


VIDEO = VideoArgs(
    kinds={"image-to-video": PipelineKind("LTX2ImageToVideoPipeline"),
           "condition": PipelineKind("LTX2ConditionPipeline", image_way="conditions",
                                     condition_class="LTX2VideoCondition", partial_strength=True)},
    default_kind="image-to-video", temporal=8, spatial=32, size_multiple=32, fps_keyword="frame_rate",
    decode_noise=True, audio=True, audio_rate_attr="vocoder.output_sampling_rate",
    presets=("ltx2-baseline", "ltx2-quality"), defaults={"frames": 121, "fps": 24, "width": 768, "height": 512},
    lora_loader="LTX2LoraLoaderMixin", key_frame="clean_first",
)

FAMILY = Family(
    name="ltx2",
    title="LTX-2",
    modality="video",
    video=VIDEO,
    pipeline="LTX2ImageToVideoPipeline",
    components={"transformer": "LTX2VideoTransformer3DModel", "vae": "AutoencoderKLLTX2Video",
                "audio_vae": "AutoencoderKLLTX2Audio", "vocoder": "LTX2Vocoder",
                "text_encoder": "Gemma3ForConditionalGeneration", "tokenizer": "GemmaTokenizerFast",
                "connectors": "LTX2TextConnectors", "scheduler": "FlowMatchEulerDiscreteScheduler"},
    denoiser="transformer",
    text=TextEncoding(encoders=("text_encoder", "connectors"),
                      outputs="Gemma 3 hidden states of every layer, stacked, through the text connectors "
                              "(cached after the connectors: the video stream's embeddings and mask)",
                      pooled=False, max_tokens=1024, masked=True),
    latents=LatentFormat(channels=128, downscale=32, patch=1,
                         normalization="(raw - vae.latents_mean) / vae.latents_std x scaling_factor; 8x temporal "
                                       "compression (8k+1 frames); audio: mel VAE latents, normalized"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal"),
    lora_targets=LORA_TARGETS,
    class_names=("LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2Pipeline"),
    hub_patterns=(r"lightricks/ltx-2", r"ltx-?2"),
    sample=SampleDefaults(steps=40, guidance=4.0),
    size_multiple=32,
    tiny="tiny-ltx2",
    tiny_version=TINY_VERSION,
    build_tiny=build_tiny,
    encode_captions=encode_captions,
    to_model_latents=to_model_latents,
    predict=predict,
    encode_images=encode_video,
    comfy=COMFY,
    generation=GenerationArgs(guidance="guidance_scale", cfg=True, negative="given"),
    extra_conditioning="the key frame (first latent frame, or a condition with a strength); the frame rate; "
                       "the audio stream (generated jointly)",
    variants={"LTX-2": "19B audio-video, 8k+1 frames"},
)
