"""Checks the activation figures of runner.diffusion.memory against what a real run allocates, on
the CPU (no GPU here): a small FLUX.1-shaped transformer (the real head size 128, 2 double + 2
single blocks, hidden 512) with a bf16 LoRA on the family's targets, through the family's own
``predict``, at two resolutions, with and without gradient checkpointing.

Measured: torch's profiler with ``profile_memory=True`` (every tensor allocation and free of the
CPU allocator, real CPU kernels: torch's flash attention for the CPU, no stand-in): the bytes still
allocated after the forward (what autograd keeps), and the peak of live tensor bytes over forward
and backward. This is tensor memory, not the process's RSS, and not GPU memory: CUDA kernels and
the caching allocator differ (rounding, workspaces), which the estimate's overhead term covers.

    .venv/bin/python bench/memory/cpu_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
              num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))
TEXT = {"prompt_embeds": (64, 512), "pooled": (128,)}
MIB = 2**20


def profiled(fn):
    """(bytes allocated and not freed by ``fn``'s top-level ops, peak live bytes) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    net = sum(e.cpu_memory_usage for e in events if e.cpu_memory_usage and e.cpu_parent is None)
    live = peak = 0
    for e in sorted((e for e in events if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return net, peak


def run_step(fam, c, noisy, t, batch, *, backward: bool):
    """The forward (its output kept, so what autograd keeps stays allocated), or forward and backward."""
    outputs = []

    def step():
        out = fam.predict(c, noisy, t, batch)
        if backward:
            out.float().pow(2).mean().backward()
        else:
            outputs.append(out)

    step.outputs = outputs
    return step


def main() -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from runner.diffusion import families, memory
    from runner.diffusion.families.base import Batch, Components

    torch.set_num_threads(2)
    fam = families.get("flux1")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    for res in (256, 512):
        model.disable_gradient_checkpointing()
        counted = memory._saved_bytes(fam, model, TEXT, res, (16, 8), 16)  # attaches the bf16 LoRA once
        side = res // 8
        noisy = torch.zeros((1, 16, side, side), dtype=torch.bfloat16)
        batch = Batch(latents=noisy, text=fam.collate([{k: torch.zeros(s, dtype=torch.bfloat16)
                                                         for k, s in TEXT.items()}]))
        c = Components(family=fam, pipe=memory._stand_in_pipe(fam), denoiser=model, scheduler=None,
                       objective=fam.objective)
        t = torch.full((1,), 0.5, dtype=torch.bfloat16)
        kept, _ = profiled(run_step(fam, c, noisy, t, batch, backward=False))
        model.zero_grad(set_to_none=True)
        _, peak = profiled(run_step(fam, c, noisy, t, batch, backward=True))
        model.enable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        _, ck_peak = profiled(run_step(fam, c, noisy, t, batch, backward=True))
        a, ck, block = counted["activations"], counted["checkpointed"], counted["block"]
        est, ck_est = a + memory.BACKWARD_BLOCKS * block, ck + memory.BACKWARD_CHECKPOINTED * block
        print(f"{res} px ({memory.image_tokens(fam, res)} image + {TEXT['prompt_embeds'][0]} text tokens): "
              f"kept after the forward {kept / MIB:.1f} MiB measured, {a / MIB:.1f} counted; forward+backward "
              f"peak {peak / MIB:.1f} MiB measured = counted + {(peak - a) / block:.2f} blocks, {est / MIB:.1f} "
              f"estimated; with checkpointing {ck_peak / MIB:.1f} measured = kept {ck / MIB:.1f} + "
              f"{(ck_peak - ck) / block:.2f} blocks of {block / MIB:.1f}, {ck_est / MIB:.1f} estimated")


if __name__ == "__main__":
    main()
