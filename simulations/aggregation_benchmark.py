"""Server-side aggregation alone: 1,000 Fed-SB updates and 100 FLoRA updates of the default model.

    python simulations/aggregation_benchmark.py [--fedsb 1000] [--flora 100] [--rank 8]

Shapes are the default model's (all-MiniLM-L6-v2, LoRA on query and value in 6 layers,
a 5-class head); the updates are random tensors of those shapes. Prints total and
per-update time for each strategy, including the exactness check it reports as
aggregation_error.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import make_strategy
from fedlora.strategies.base import ClientUpdate

HIDDEN, LAYERS, LABELS, POOLER = 384, 6, 5, True


def module_names() -> list[str]:
    return [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(LAYERS) for m in ("query", "value")]


def initial_state(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for m in module_names():
        state[f"{m}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=g) / HIDDEN**0.5
        state[f"{m}.lora_B.weight"] = torch.zeros(HIDDEN, rank)
    state["classifier.weight"] = torch.randn(LABELS, HIDDEN, generator=g) * 0.02
    state["classifier.bias"] = torch.zeros(LABELS)
    if POOLER:
        state["bert.pooler.dense.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.02
        state["bert.pooler.dense.bias"] = torch.zeros(HIDDEN)
    return state


def random_update(cid: int, expected: dict, rank: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(cid + 1)
    tensors = {
        n: torch.randn([rank if d is None else d for d in shape], generator=g) * 0.01 for n, shape in expected.items()
    }
    return ClientUpdate(cid, tensors, 50 + cid % 17)


def time_strategy(name: str, n: int, rank: int) -> tuple[float, float]:
    spec = LoRASpec(
        rank=rank, alpha=2.0 * rank, target_modules=("query", "value"), head_modules=("classifier", "pooler")
    )
    strategy = make_strategy(name, spec)
    state = strategy.setup(initial_state(rank))
    if name == "fedsb":  # stand-in for the federated initialisation: orthonormal A and B
        for m in module_names():
            state[f"{m}.lora_A.weight"] = torch.linalg.qr(torch.randn(HIDDEN, rank))[0].T.contiguous()
            state[f"{m}.lora_B.weight"] = torch.linalg.qr(torch.randn(HIDDEN, rank))[0].contiguous()
    expected = strategy.expected_update_shapes(state)
    updates = [random_update(i, expected, rank) for i in range(n)]
    start = time.perf_counter()
    result = strategy.aggregate(state, updates, 1)
    seconds = time.perf_counter() - start
    return seconds, result.error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fedsb", type=int, default=1000)
    parser.add_argument("--flora", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'strategy':<8} {'updates':>8} {'total s':>9} {'ms/update':>10} {'agg error':>10}")
    for name, n in (("fedsb", args.fedsb), ("flora", args.flora)):
        seconds, error = time_strategy(name, n, args.rank)
        print(f"{name:<8} {n:>8} {seconds:>9.3f} {1000 * seconds / n:>10.3f} {error:>10.1e}")


if __name__ == "__main__":
    main()
