"""One client's local training throughput: fedlora's client loop against the plain
PyTorch + PEFT loop a user would write by hand, as a ratio.

    python simulations/throughput_benchmark.py [--steps 24] [--batch-size 16] [--max-length 64] [--repeats 3]

Both train the default model (all-MiniLM-L6-v2, LoRA rank 8 on query and value, the
classifier and pooler trained in full) on the same client's data, in the same batches,
with AdamW at the same learning rate and gradient clipping at 1.0, on CPU. fedlora's
side is what a simulated client runs per round: build (cached) model, load the global
state, train, extract the update and encode it for the wire. The PEFT side builds its
model with ``peft.get_peft_model`` and runs forward, backward, clip, step. Each mode
runs in its own process, alternating for ``--repeats`` rounds; medians are reported,
so that load from elsewhere hits both alike. Examples/s count training examples only;
model loading is excluded from both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from child_runs import add_loop_options, run_child


def client_data():
    from fedlora.config import RunConfig
    from fedlora.ml.task import load_splits

    cfg = RunConfig()
    splits = load_splits(cfg)
    return cfg, splits, splits.train.subset(splits.partitions[0])


def run_fedlora(steps: int, batch_size: int, max_length: int) -> float:
    from fedlora.io import wire
    from fedlora.ml.adapters import adapter_state, set_trainable
    from fedlora.ml.task import adapted_model, initial_adapter_state, lora_spec, tokenizer_for
    from fedlora.ml.training import train_local
    from fedlora.strategies import make_strategy

    cfg, splits, data = client_data()
    strategy = make_strategy("fedavg", lora_spec(cfg))
    state = strategy.setup(initial_adapter_state(None, len(splits.label_names), strategy.spec, 0))
    tokenizer = tokenizer_for(None)
    net = adapted_model(None, len(splits.label_names), strategy.spec)
    start = time.perf_counter()
    strategy.prepare_client_model(net, state, 0)
    set_trainable(net, strategy.trained_roles)
    stats, _ = train_local(
        net, tokenizer, data, steps=steps, batch_size=batch_size, lr=cfg.lr, max_length=max_length, seed=0
    )
    blob = wire.encode_update(
        adapter_state(net, strategy.sent_roles), strategy="fedavg", round_num=1, num_examples=len(data)
    )
    seconds = time.perf_counter() - start
    assert len(blob) > 0
    return stats.examples / seconds


def run_peft(steps: int, batch_size: int, max_length: int) -> float:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.ml.models import resolve_model_path
    from fedlora.ml.training import batch_order

    cfg, splits, data = client_data()
    path = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.label_names))
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=["query", "value"],
        modules_to_save=["classifier", "pooler"],
    )
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(0)
    start = time.perf_counter()
    model.train()
    seen = 0
    for idx in batch_order(len(data), steps, batch_size, 0):
        batch = tokenizer(
            [data.texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        labels = torch.tensor([data.labels[i] for i in idx])
        loss = F.cross_entropy(model(**batch).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seen += len(idx)
    return seen / (time.perf_counter() - start)


def child(mode: str, steps: int, batch_size: int, max_length: int) -> None:
    rate = (run_fedlora if mode == "fedlora" else run_peft)(steps, batch_size, max_length)
    print(json.dumps({"mode": mode, "examples_per_s": rate}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loop_options(parser, steps=24)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch_size, args.max_length)
        return
    rates: dict[str, list[float]] = {"fedlora": [], "peft": []}
    for r in range(args.repeats):
        for mode in ("fedlora", "peft") if r % 2 == 0 else ("peft", "fedlora"):
            rates[mode].append(run_child(__file__, "--child", mode, args)["examples_per_s"])
            print(f"repeat {r + 1} {mode:8s} {rates[mode][-1]:.1f} examples/s", flush=True)
    ours, theirs = statistics.median(rates["fedlora"]), statistics.median(rates["peft"])
    print(f"\nmedian examples/s: fedlora client {ours:.1f}, plain PyTorch + PEFT loop {theirs:.1f}")
    print(
        f"ratio fedlora / PEFT loop: {ours / theirs:.2f}  ({args.steps} steps of batch {args.batch_size}, max length {args.max_length})"
    )


if __name__ == "__main__":
    main()
