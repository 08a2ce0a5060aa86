"""Tiny random diffusion models (``builtin:tiny-sd``, ``builtin:tiny-sdxl``) built offline.

Nothing can be downloaded on the machines this project is tested on, so the tiny models are
built from config with fixed seeds, saved once in diffusers format into the model cache, and from
then on loaded with the very same ``from_pretrained`` code path that a real model folder takes.
Their weights are random: images they make are noise, and any figure measured with them must be
labelled "tiny random model" wherever a user sees it.

The CLIP tokenizer is built offline too: a byte-level BPE in CLIP's file format (vocab.json +
merges.txt, ``</w>`` end-of-word marker), its merges learned from a small fixed word list, so
it tokenizes any text (unknown words fall back to bytes) deterministically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from runner.buildcache import build_once

# Bump when the configs below change: the cache folder name carries it, so an old build is
# never loaded for a new definition.
TINY_VERSION = 2
TINY_MODELS = ("tiny-sd", "tiny-sdxl")
TINY_SEED = 0

# Words the tiny tokenizer learns merges from: caption vocabulary of this project.
_CORPUS = (
    "a photo of the man woman person people portrait close up closeup extreme full body "
    "medium shot wide standing sitting walking in on at with and park city street studio "
    "light soft background smiling looking camera face hair eyes wearing shirt jacket dress "
    "black white red blue green outdoor indoor night day character trigger class token "
    "high quality detailed best two three group crowd stage left right side profile view"
).split()
_NUM_MERGES = 240


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE merge learning over a word list (ties broken lexicographically: deterministic)."""
    b2u = _bytes_to_unicode()
    seqs: list[list[str]] = []
    for w in words:
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        seqs.append(syms)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for a, b in zip(s, s[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, s in enumerate(seqs):
            out: list[str] = []
            j = 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == best[0] and s[j + 1] == best[1]:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
    return merges


def tiny_clip_tokenizer(dest: Path, *, model_max_length: int = 77):
    """Write a small CLIP tokenizer (vocab.json, merges.txt, configs) into ``dest`` and load it.

    The vocabulary is CLIP-shaped: every byte symbol, every byte symbol + ``</w>``, the learned
    merges, then ``<|startoftext|>`` and ``<|endoftext|>``. Returns a ``CLIPTokenizer`` loaded
    back from ``dest`` with ``from_pretrained``.
    """
    from transformers import CLIPTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(_CORPUS, _NUM_MERGES)
    seen = set(vocab_list)
    for a, b in merges:
        tok = a + b
        if tok not in seen:
            vocab_list.append(tok)
            seen.add(tok)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer.from_pretrained(str(dest), model_max_length=model_max_length)
    tok.save_pretrained(str(dest))
    return CLIPTokenizer.from_pretrained(str(dest))


# ---------------------------------------------------------------------------------------------
# model configs

def _text_config(vocab_size: int, *, projection_dim: int = 32, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        layer_norm_eps=1e-5,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32),  # 3 blocks: 4x downscale, so 64 px -> 16x16 latents
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )


def _build_tiny_sd(dest: Path) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer(dest / "_tok")
    vocab = len(tokenizer)
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(TINY_SEED + 1)
    vae = _vae()
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(_text_config(vocab))
    scheduler = DDIMScheduler(**_scheduler_config())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    shutil.rmtree(dest / "_tok", ignore_errors=True)


def _build_tiny_sdxl(dest: Path) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer(dest / "_tok")
    vocab = len(tokenizer)
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,  # as in the real SDXL UNet, so the kohya sgm key mapping is exercised
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + text_encoder_2 projection
        cross_attention_dim=64,  # hidden sizes of both text encoders, concatenated
        norm_num_groups=16,
    )
    torch.manual_seed(TINY_SEED + 1)
    vae = _vae()
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(_text_config(vocab, hidden_act="gelu"))
    torch.manual_seed(TINY_SEED + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, hidden_act="gelu"))
    sched_cfg = _scheduler_config()
    for k in ("clip_sample", "set_alpha_to_one"):
        sched_cfg.pop(k)
    scheduler = EulerDiscreteScheduler(**sched_cfg)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    shutil.rmtree(dest / "_tok", ignore_errors=True)


_BUILDERS = {"tiny-sd": _build_tiny_sd, "tiny-sdxl": _build_tiny_sdxl}




def models_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Folder holding built and converted models: ``<cache>/models``."""
    if cache_dir is None:
        from runner.paths import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / "models"


def tiny_model_path(name: str, cache_dir: Path | str | None = None) -> Path:
    """Build (once, under a lock) and return the diffusers folder of a tiny model.

    ``name`` is ``tiny-sd`` or ``tiny-sdxl`` (the ``builtin:`` prefix is accepted). The build goes
    into a temporary sibling folder that is renamed into place, so a killed build never leaves
    a half-written model behind and concurrent builders wait for one another.
    """
    name = name.removeprefix("builtin:")
    if name not in _BUILDERS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join('builtin:' + n for n in TINY_MODELS)}")
    final = models_cache_dir(cache_dir) / f"builtin-{name}-v{TINY_VERSION}"
    return build_once(
        final,
        _BUILDERS[name],
        marker="DONE",
        notes={"TINY_RANDOM_MODEL.txt": f"builtin:{name} v{TINY_VERSION}: a tiny model with random weights, "
                                        f"built from config with seed {TINY_SEED} by character-runner. "
                                        "Its images are noise.\n"},
    )


def is_tiny(base_model: str) -> bool:
    return str(base_model).startswith("builtin:")
