"""DP against non-DP local training on the default model: step time and peak memory, as ratios.

    python simulations/dp_overhead_benchmark.py [--steps 20] [--batch-size 16] [--max-length 64] [--repeats 3]

Each mode runs in its own process on the same client data, batch size and steps:
non-DP is fedlora's plain local loop, DP is Opacus DP-SGD (hooks, Poisson sampling).
The modes alternate for `--repeats` rounds and the median is reported, so that load
from elsewhere on a shared machine hits both alike. Memory is sampled every 5 ms as
resident-set size: "training peak" is the peak over the process's size before the
model was built (weights, optimizer state, activations and per-sample gradients: what
a client needs on top of the interpreter and libraries, as a GPU's allocator would
count it); "growth" is the peak over the size just before the timed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from child_runs import add_loop_options, run_child


def measure(mode: str, steps: int, batch_size: int, max_length: int) -> dict:
    import psutil
    import torch

    from fedlora.config import RunConfig
    from fedlora.ml.adapters import set_trainable
    from fedlora.ml.privacy import plan
    from fedlora.ml.task import adapted_model, load_splits, lora_spec, tokenizer_for
    from fedlora.ml.training import train_local

    proc = psutil.Process()
    cfg = RunConfig()
    splits = load_splits(cfg)
    data = splits.train.subset(splits.partitions[0])
    before_model = proc.memory_info().rss
    net = adapted_model(None, len(splits.label_names), lora_spec(cfg))
    tok = tokenizer_for(None)
    set_trainable(net, ["lora_A", "lora_B", "head"])
    kw = {"steps": 2, "batch_size": batch_size, "lr": 1e-3, "max_length": max_length, "seed": 0}
    dp = plan(8.0, 1e-5, 1.0, len(data), batch_size, planned_steps=10 * steps)

    def run(**k):
        return train_local(net, tok, data, dp=None if mode == "plain" else dp, **k)[0]

    run(**kw)  # warm-up: allocator, kernels, tokenizer
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
    return {
        "mode": mode,
        "seconds_per_step": seconds / steps,
        "examples": stats.examples,
        "growth_mb": (peak[0] - base) / 2**20,
        "peak_mb": (peak[0] - before_model) / 2**20,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loop_options(parser, steps=20)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.batch_size, args.max_length)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "dp": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run_child(__file__, "--mode", mode, args))
    median = {
        mode: {k: statistics.median(r[k] for r in rs) for k in ("seconds_per_step", "peak_mb", "growth_mb")}
        for mode, rs in runs.items()
    }
    print(f"{'mode':<6} {'s/step':>8} {'training peak MB':>17} {'growth MB':>10}   (median of {args.repeats})")
    for mode, m in median.items():
        print(f"{mode:<6} {m['seconds_per_step']:>8.3f} {m['peak_mb']:>17.1f} {m['growth_mb']:>10.1f}")
    plain, dp = median["plain"], median["dp"]
    print(f"DP / non-DP step time: {dp['seconds_per_step'] / plain['seconds_per_step']:.2f}x (target <= 1.3x)")
    print(f"DP / non-DP training peak memory: {dp['peak_mb'] / plain['peak_mb']:.2f}x (target <= 1.2x)")
    print(f"DP / non-DP memory growth during the steps: {dp['growth_mb'] / max(plain['growth_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
