"""Parts the tiny DiT families are built from, offline and with fixed seeds: tokenizers in the
real models' classes (a T5 unigram over the project's caption words; a Qwen byte-level BPE with
the chat markers and a Qwen-style chat template), a KL VAE with given latent channels and
factors, the flow scheduler. The CLIP tokenizer and the SD VAE/UNet builders live in
:mod:`runner.diffusion.tiny` and are reused from there.

Like the SD tiny models, these have random weights: their images are noise.
"""

from __future__ import annotations

from pathlib import Path

from runner.diffusion.tiny import _CORPUS, TINY_SEED, tiny_clip_tokenizer  # noqa: F401  (re-exported)

# The markers and template of the Qwen chat format (what Qwen-Image, Flux.2 klein and Z-Image
# wrap captions in). ``enable_thinking=False`` closes an empty think block, as Qwen3's does.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]")
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def byte_tokenizer(dest: Path, specials: tuple[str, ...], chat_template: str, **roles: str):
    """A byte-level BPE tokenizer in ``Qwen2Tokenizer``'s class: one token per byte (no merges),
    then ``specials``; ``roles`` name the unk/bos/eos/pad tokens among them. Saved into ``dest``
    and loaded back."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for tok in specials:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], **roles)
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in roles.values()]})
    tok.chat_template = chat_template
    tok.save_pretrained(str(dest))
    return Qwen2Tokenizer.from_pretrained(str(dest))


def qwen_tokenizer(dest: Path):
    """The Qwen chat tokenizer (Qwen-Image, FLUX.2 klein, Z-Image)."""
    return byte_tokenizer(dest, QWEN_SPECIALS, QWEN_CHAT_TEMPLATE, unk_token="<|endoftext|>")


def mistral_tokenizer(dest: Path):
    """A Mistral-format chat tokenizer (FLUX.2 dev). The real model's tokenizer is a
    PixtralProcessor, which needs torchvision; for text the pipeline only calls its
    ``apply_chat_template``, which a tokenizer has too."""
    return byte_tokenizer(dest, MISTRAL_SPECIALS, MISTRAL_CHAT_TEMPLATE, unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", pad_token="<pad>")


def t5_tokenizer(dest: Path, *, model_max_length: int = 512):
    """A ``T5Tokenizer`` (unigram) whose pieces are the caption words (``▁word``) and single
    characters, so every text tokenizes; saved into ``dest`` and loaded back."""
    from transformers import T5Tokenizer

    chars = sorted(set("".join(_CORPUS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-()"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(_CORPUS))] + [(ch, -5.0) for ch in chars]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(str(dest))
    return T5Tokenizer.from_pretrained(str(dest))


def kl_vae(*, latent_channels: int, scaling_factor: float, shift_factor: float | None, seed: int):
    """A two-block KL VAE (2x downscale) with the real model's latent factors."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def flow_scheduler(**config):
    """The flow-matching Euler scheduler with the real model's shift settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def save_pipeline(pipe, dest: Path) -> None:
    pipe.save_pretrained(str(dest), safe_serialization=True)


def seeded(seed_offset: int):
    """Seed torch for the next component (``TINY_SEED + seed_offset``)."""
    import torch

    torch.manual_seed(TINY_SEED + seed_offset)


def remove(*folders: Path) -> None:
    """Delete the scratch folders a builder wrote tokenizers into."""
    import shutil

    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
