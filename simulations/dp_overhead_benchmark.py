"""DP against non-DP local training on the default model: step time and peak memory, as ratios.

    python simulations/dp_overhead_benchmark.py [--steps 20] [--batch-size 16] [--max-length 64]

Each mode runs in its own process on the same client data, batch size and steps:
non-DP is fedlora's plain local loop, DP is Opacus DP-SGD (hooks, Poisson sampling).
Peak memory is the largest resident-set growth over the process's size just before
training, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def measure(mode: str, steps: int, batch_size: int, max_length: int) -> dict:
    import psutil
    import torch

    from fedlora.adapters import set_trainable
    from fedlora.config import RunConfig
    from fedlora.privacy import plan, private_train
    from fedlora.task import adapted_model, load_splits, lora_spec, tokenizer_for
    from fedlora.training import train_local

    cfg = RunConfig()
    splits = load_splits(cfg)
    data = splits.train.subset(splits.partitions[0])
    net = adapted_model(None, len(splits.label_names), lora_spec(cfg))
    tok = tokenizer_for(None)
    set_trainable(net, ["lora_A", "lora_B", "head"])
    kw = {"steps": 2, "batch_size": batch_size, "lr": 1e-3, "max_length": max_length, "seed": 0}
    dp = plan(8.0, 1e-5, 1.0, len(data), batch_size, planned_steps=10 * steps)
    run = (lambda **k: train_local(net, tok, data, **k)) if mode == "plain" else (lambda **k: private_train(net, tok, data, dp=dp, history=[], **k)[0])
    run(**kw)  # warm-up: allocator, kernels, tokenizer
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    stats = run(**{**kw, "steps": steps})
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {"mode": mode, "seconds_per_step": seconds / steps, "examples": stats.examples, "peak_mb": (peak[0] - base) / 2**20, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.batch_size, args.max_length)))
        return
    results = {}
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    plain, dp = results["plain"], results["dp"]
    print(f"{'mode':<6} {'s/step':>8} {'peak MB':>9}")
    for r in (plain, dp):
        print(f"{r['mode']:<6} {r['seconds_per_step']:>8.3f} {r['peak_mb']:>9.1f}")
    print(f"DP / non-DP step time: {dp['seconds_per_step'] / plain['seconds_per_step']:.2f}x (target <= 1.3x)")
    print(f"DP / non-DP peak memory growth: {dp['peak_mb'] / max(plain['peak_mb'], 1e-9):.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
