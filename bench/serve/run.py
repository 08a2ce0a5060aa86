"""The generation API with and without batching: N concurrent clients, real HTTP on 127.0.0.1.

The same app (runner.serve.app.create_app) and pipeline, once with max_batch=1 and once with
max_batch=B, in one run; each client sends one image request (same size/steps/guidance, its own
seed) and all start together. Prints requests/s, p50/p95 latency and the batch sizes seen.

Default model: builtin:tiny-sd, a tiny random model on the CPU: the figures time the request path
and what batching saves per pipeline call, not a real SD 1.5 / SDXL on a GPU (pass --model).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny-sd")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import httpx
    import torch
    import uvicorn

    from runner.serve.app import create_app
    from runner.serve.character import ServeTarget
    from runner.serve.engine import ImageEngine

    torch.set_num_threads(args.threads)
    target = ServeTarget(character="bench", trigger="bnchr", class_word="man", base_model=args.model,
                         family="auto", lora_file=None, lora_source="", lora_scale=1.0, resolution=args.size,
                         steps=args.steps, tiny_random=args.model.startswith("builtin:"))
    engine = ImageEngine(target, device="auto")
    token = "bench-token-0123456789"
    results = {}
    for max_batch in (1, args.batch):
        app = create_app(engine, token=token, max_queue=args.clients, max_batch=max_batch)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            c.post("/v1/images", json={"prompt": "warm-up", "seed": 0})  # first call pays one-off costs

            def one(seed: int):
                t0 = time.monotonic()
                r = c.post("/v1/images", json={"prompt": "portrait", "seed": seed})
                r.raise_for_status()
                return time.monotonic() - t0, int(r.headers["x-batch-size"])

            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                out = list(pool.map(one, range(1, args.clients + 1)))
            wall = time.monotonic() - t0
        server.should_exit = True
        th.join()
        lat = sorted(x for x, _ in out)
        results[max_batch] = (args.clients / wall, statistics.median(lat), lat[int(0.95 * (len(lat) - 1))],
                              sorted({b for _, b in out}))
    print(f"model {args.model} ({'tiny random model' if target.tiny_random else 'real'}), {args.size}px, "
          f"{args.steps} steps, {args.clients} concurrent clients, device {engine.device}")
    print("| max_batch | requests/s | p50 latency | p95 latency | batch sizes seen |")
    print("| --- | --- | --- | --- | --- |")
    for mb, (rps, p50, p95, sizes) in results.items():
        print(f"| {mb} | {rps:.2f} | {p50:.2f} s | {p95:.2f} s | {sizes} |")
    base = results[1][0]
    print(f"speedup from batching: {results[args.batch][0] / base:.2f}x")


if __name__ == "__main__":
    main()
