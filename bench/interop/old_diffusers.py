"""The diffusers LoRA file in diffusers 0.32 + transformers 4.47 (the releases before transformers
5 flattened CLIPTextModel), next to the installed stack.

For each tiny model (builtin:tiny-sd, builtin:tiny-sdxl) the script attaches LoRA adapters to the
UNet and the text encoders, writes the file with ``save_diffusers_lora`` (what a checkpoint
writes), loads it with the installed diffusers and, in a subprocess whose PYTHONPATH puts the old
releases first, with diffusers 0.32. Both print the text-encoder and UNet outputs on fixed inputs
and how many LoRA layers were attached; the script asserts they agree.

The old releases are installed once, without their dependencies, into a folder of their own
(nothing in .venv changes):

    .venv/bin/pip install --no-deps --target bench/_work/old-diffusers \\
        diffusers==0.32.2 transformers==4.47.1 huggingface_hub==0.27.1 tokenizers==0.21.0
    .venv/bin/python bench/interop/old_diffusers.py [--target bench/_work/old-diffusers]

Before the ``text_model.`` layout, diffusers 0.32 raised ``IndexError: list index out of range``
in ``get_peft_kwargs`` on every file with text-encoder LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "_work" / "interop"
PACKAGES = ["diffusers==0.32.2", "transformers==4.47.1", "huggingface_hub==0.27.1", "tokenizers==0.21.0"]
IDS = [[0, 5, 9, 3, 1]]

# Run with the old releases first on sys.path. Tokenizers are not needed to load a LoRA (the tiny
# models' tokenizer files are written by transformers 5).
_READER = r"""
import json, sys
import torch
import diffusers, transformers
from diffusers import DiffusionPipeline
model, folder, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pipe = DiffusionPipeline.from_pretrained(model, tokenizer=None, **({"tokenizer_2": None} if "xl" in model else {}))
# The tiny models were written by transformers 5, which saves CLIPTextModel flat (no text_model.
# prefix) and 4.47 leaves such weights at random: load them into text_model as they are.
from pathlib import Path
from safetensors.torch import load_file
for name in ("text_encoder", "text_encoder_2"):
    te = getattr(pipe, name, None)
    sd = load_file(str(Path(model) / name / "model.safetensors")) if te is not None else {}
    if sd and not next(iter(sd)).startswith("text_model.") and hasattr(te, "text_model"):
        missing, _ = te.text_model.load_state_dict(sd, strict=False)
        assert not missing, missing
pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
probed = __import__("probe").probe(pipe, ids)
print(json.dumps({"versions": [diffusers.__version__, transformers.__version__], **probed}))
"""

_PROBE = r'''
import torch

def probe(pipe, ids):
    """LoRA layers attached per model, and outputs on fixed inputs."""
    out = {}
    ids = torch.tensor(ids)
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is None:
            continue
        with torch.no_grad():
            h = te(ids)[0]
        out[name] = {"lora_layers": sum(1 for n, _ in te.named_modules() if n.endswith("lora_A.x")),
                     "sum": float(h.double().sum()), "abs": float(h.double().abs().sum())}
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 5, c.cross_attention_dim, generator=g)
    kw = {}
    if c.addition_embed_type == "text_time":
        proj = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, proj, generator=g), "time_ids": torch.ones(1, 6) * 64}
    with torch.no_grad():
        y = unet(x, 10, encoder_hidden_states=ctx, **kw).sample
    out["unet"] = {"lora_layers": sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A.x")),
                   "sum": float(y.double().sum()), "abs": float(y.double().abs().sum())}
    return out
'''


def write_lora(model: str, folder: Path) -> Path:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion.lora import save_diffusers_lora
    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline(model)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = {"unet": get_peft_model_state_dict(pipe.unet)}
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is None:
            continue
        te.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        state[name] = {k: v + 0.05 * torch.randn_like(v) for k, v in get_peft_model_state_dict(te).items()}
    state["unet"] = {k: v + 0.05 * torch.randn_like(v) for k, v in state["unet"].items()}
    folder.mkdir(parents=True, exist_ok=True)
    return save_diffusers_lora(pipe, folder, state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=Path, default=REPO / "bench" / "_work" / "old-diffusers",
                    help="folder holding diffusers 0.32 and transformers 4.47 (installed there if missing)")
    args = ap.parse_args()
    if not (args.target / "diffusers").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(args.target),
                        *PACKAGES],
                       check=True)
    from runner.diffusion.lora import load_lora
    from runner.diffusion.models import load_pipeline
    from runner.diffusion.tiny import tiny_model_path

    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "probe.py").write_text(_PROBE)
    sys.path.insert(0, str(WORK))
    from probe import probe

    failures = 0
    for model in ("builtin:tiny-sd", "builtin:tiny-sdxl"):
        file = write_lora(model, WORK / model.split(":")[1])
        new = probe(load_lora(load_pipeline(model), file, "x"), IDS)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.target), str(WORK)])}
        r = subprocess.run([sys.executable, "-c", _READER, str(tiny_model_path(model)), str(file.parent),
                            json.dumps(IDS)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{model}: diffusers 0.32 failed to load the file:\n{r.stderr[-1500:]}")
            failures += 1
            continue
        old = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{model}: diffusers {old['versions'][0]} / transformers {old['versions'][1]}")
        for part in new:
            a, b = new[part], old[part]
            same = a["lora_layers"] == b["lora_layers"] and abs(a["abs"] - b["abs"]) <= 1e-4 * max(1.0, a["abs"])
            failures += not same
            print(f"  {part:<15} LoRA layers {b['lora_layers']:>3} (installed {a['lora_layers']:>3})  "
                  f"output |sum| {b['abs']:.6f} (installed {a['abs']:.6f})  {'same' if same else 'DIFFERENT'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
