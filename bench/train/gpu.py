"""Train benchmark, part (b): full-size SD 1.5 and SDXL UNets (random weights) on a GPU.

For each of {sd15, sdxl} x {512, 1024} px x batch {1, 4}: the training step the trainer runs
(frozen bf16 UNet with a fp32 LoRA through peft, bf16 autocast, SDPA attention, AdamW on the
LoRA parameters, optional gradient checkpointing), timed after warm-up. Reports steps/s, images/s,
peak GPU memory, and model FLOP utilization: FLOPs of one step counted by
torch.utils.flop_counter (forward + backward as executed), divided by the step time and by the
GPU's dense bf16 peak.

Needs a CUDA GPU; the weights are random (built from the published UNet configs), so nothing is
downloaded.

    .venv/bin/python bench/train/gpu.py [--rank 32] [--steps 10] [--gradient-checkpointing]
        [--peak-tflops 989] [--only sdxl] [--compile] [--resolutions 512 1024] [--batches 1 4]
    .venv/bin/python bench/train/gpu.py --smoke-cpu --resolutions 64 --batches 1 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import time

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def peak_tflops(name: str) -> float | None:
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


def bench_one(family: str, res: int, bs: int, *, rank: int, steps: int, warmup: int, ckpt: bool, compile_: bool,
              dev: str = "cuda"):
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    cuda = dev == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    cfg = SDXL_UNET if family == "sdxl" else SD15_UNET
    unet = UNet2DConditionModel(**cfg).to(dev, torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    cast_training_params(unet, dtype=torch.float32)
    if ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    lat = res // 8
    x = torch.randn(bs, 4, lat, lat, device=dev, dtype=torch.bfloat16)
    emb = torch.randn(bs, 77, cfg["cross_attention_dim"], device=dev, dtype=torch.bfloat16)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(bs, 1280, device=dev, dtype=torch.bfloat16),
                 "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * bs, device=dev, dtype=torch.bfloat16)}
    fwd = torch.compile(unet) if compile_ else unet

    def step():
        t = torch.randint(0, 1000, (bs,), device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            pred = fwd(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), x.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    # The model and optimizer are freed when this returns (step's closure holds them until then,
    # so a `del` here would free nothing); the caller empties the CUDA cache after each run.
    return {"family": family, "resolution": res, "batch": bs, "steps_per_s": round(1 / dt, 3),
            "images_per_s": round(bs / dt, 2), "step_ms": round(dt * 1000, 1),
            "peak_mem_gib": None if peak_mem is None else round(peak_mem, 2),
            "tflop_per_step": round(flops / 1e12, 3), "achieved_tflops": round(flops / dt / 1e12, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (auto for known GPUs)")
    ap.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="run the same code on the CPU (e.g. --resolutions 64 --batches 1 --steps 1) to check "
                         "the script before a GPU session; its timings mean nothing")
    args = ap.parse_args()

    import torch

    dev = "cpu" if args.smoke_cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/train/gpu.py needs a CUDA GPU (this machine has none; --smoke-cpu checks the "
                         "script on the CPU); see bench/README.md")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU smoke run (timings mean nothing)"
    peak = (args.peak_tflops or peak_tflops(name)) if dev == "cuda" else None
    rows = []
    for family in ("sd15", "sdxl"):
        if args.only and family != args.only:
            continue
        for res in args.resolutions:
            for bs in args.batches:
                try:
                    r = bench_one(family, res, bs, rank=args.rank, steps=args.steps, warmup=args.warmup,
                                  ckpt=args.gradient_checkpointing, compile_=args.compile, dev=dev)
                except torch.cuda.OutOfMemoryError:
                    r = {"family": family, "resolution": res, "batch": bs, "error": "out of memory"}
                finally:
                    if dev == "cuda":
                        torch.cuda.empty_cache()  # what the finished run held goes back before the next
                if peak and "achieved_tflops" in r:
                    r["mfu"] = round(r["achieved_tflops"] / peak, 3)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(json.dumps({"gpu": name, "peak_bf16_tflops": peak, "rank": args.rank,
                      "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
                      "torch": torch.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
