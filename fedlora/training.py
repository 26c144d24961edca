"""Local training and evaluation of a classifier with adapters: one screen each."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.data import TextDataset
from fedlora.instructions import InstructionDataset

LocalData = TextDataset | InstructionDataset  # each knows its batches and its loss


@dataclass
class TrainStats:
    loss: float
    examples: int
    steps: int
    seconds: float
    tokens: int = 0  # non-padding input tokens processed


def encode(tokenizer, texts: list[str], max_length: int, device: torch.device | str = "cpu") -> dict:
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def autocast_for(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, where adapters and head stay fp32 parameters; nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches drawn epoch by epoch from a seeded shuffle of ``range(n)``."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n).tolist())
    return [np.asarray(order[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def train_local(
    model: nn.Module,
    tokenizer,
    data: LocalData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    max_grad_norm: float = 1.0,
    device: torch.device | str = "cpu",
) -> TrainStats:
    """AdamW on the parameters that require grad, for a fixed number of steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)  # dropout masks: a seeded run repeats exactly
    model.train()
    start, total_loss, seen, tokens = time.perf_counter(), 0.0, 0, 0
    batches = batch_order(len(data), steps, min(batch_size, len(data)), seed)
    for idx in batches:
        inputs, targets = data.batch(tokenizer, idx, max_length, device)
        with autocast_for(device):
            logits = model(**inputs).logits
        loss = data.loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        total_loss += loss.item() * len(idx)
        seen += len(idx)
        tokens += int(inputs["attention_mask"].sum().item())
    model.eval()
    return TrainStats(total_loss / max(seen, 1), seen, len(batches), time.perf_counter() - start, tokens)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    data: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy loss over ``data``."""
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(data), batch_size):
        texts = data.texts[start : start + batch_size]
        labels = torch.tensor(data.labels[start : start + batch_size], device=device)
        logits = model(**encode(tokenizer, texts, max_length, device)).logits
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    n = max(len(data), 1)
    return correct / n, total_loss / n


def full_weight_gradients(
    model: nn.Module,
    tokenizer,
    data: LocalData,
    *,
    batches: int,
    batch_size: int,
    max_length: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss with respect to each adapted module's full base weight.

    Fed-SB's LoRA-SB initialisation takes its truncated SVD; adapters and everything
    else stay frozen.
    """
    from fedlora.adapters import lora_modules

    modules = lora_modules(model)
    for p in model.parameters():
        p.requires_grad = False
    for m in modules.values():
        m.base_layer.weight.requires_grad = True
        m.base_layer.weight.grad = None
    torch.manual_seed(seed)
    model.train()
    try:
        order = batch_order(len(data), batches, min(batch_size, len(data)), seed)
        for idx in order:
            inputs, targets = data.batch(tokenizer, idx, max_length, device)
            with autocast_for(device):
                logits = model(**inputs).logits
            (data.loss(logits, targets) / len(order)).backward()
        # left on the training device: the client's sketch (an SVD per module) runs there too
        return {name: m.base_layer.weight.grad.detach().to(torch.float32).clone() for name, m in modules.items()}
    finally:
        for m in modules.values():
            m.base_layer.weight.requires_grad = False
            m.base_layer.weight.grad = None
        model.eval()
