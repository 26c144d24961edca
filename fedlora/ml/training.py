"""Local training and evaluation of a model with adapters.

One training loop, ``run_steps``, serves every job: local training (``train_local``) and
Fed-SB's initialisation gradient (``weight_gradients``), each plain or, given a DP plan,
on the model, optimizer and batches that ``privacy.private`` made private.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.ml.adapters import head_module, lora_modules
from fedlora.ml.data import TextDataset
from fedlora.ml.instructions import InstructionDataset
from fedlora.ml.privacy import DPPlan, History, private
from fedlora.ml.progress import with_progress
from fedlora.ml.quantize import is_quantized, plain_linear

LocalData = TextDataset | InstructionDataset  # each knows its batches and its loss
Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # model inputs, targets


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


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    autocast: bool = True,
    max_grad_norm: float | None = None,
    on_empty: Callable[[], None] | None = None,
) -> TrainStats:
    """The training loop: one optimizer step per batch. ``autocast``: bf16 forward on CUDA;
    ``max_grad_norm``: clip the batch gradient; ``on_empty``: prepares a step on a batch
    with no examples (DP-SGD's empty Poisson batch: noise only)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start, total_loss, seen, tokens, steps = time.perf_counter(), 0.0, 0, 0, 0
    for inputs, targets in batches:
        steps += 1
        optimizer.zero_grad(set_to_none=True)
        if len(targets) == 0:
            if on_empty is not None:
                on_empty()
            optimizer.step()
            continue
        with autocast_for(device) if autocast else contextlib.nullcontext():
            logits = model(**inputs).logits
        value = loss(logits, targets)
        value.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        total_loss += value.item() * len(targets)
        seen += len(targets)
        tokens += int(inputs["attention_mask"].sum().item())
    return TrainStats(total_loss / max(seen, 1), seen, steps, time.perf_counter() - start, tokens)


class GradientSum(torch.optim.Optimizer):
    """An optimizer whose step adds each parameter's gradient to a running sum and changes
    nothing: run by the loop (under DP inside Opacus's DPOptimizer, after clipping and noise),
    it collects the gradients of every step."""

    def __init__(self, params: Iterable[nn.Parameter]):
        super().__init__(params, {})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["sum"] += p.grad

    def total(self, p: nn.Parameter) -> torch.Tensor:
        return self.state[p]["sum"]


def _seeded_batches(
    tokenizer, data: LocalData, steps: int, batch_size: int, max_length: int, seed: int, device: torch.device | str
) -> Iterator[Batch]:
    """Non-private batches: ``batch_order``'s seeded shuffle, tokenized one batch at a time."""
    for idx in batch_order(len(data), steps, min(batch_size, len(data)), seed):
        yield data.batch(tokenizer, idx, max_length, device)


def _run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    data: LocalData,
    *,
    steps: int,
    batch_size: int,
    max_length: int,
    seed: int,
    device: torch.device | str,
    max_grad_norm: float | None,
    dp: DPPlan | None,
    history: History | None,
    desc: str = "local training",
) -> tuple[TrainStats, History]:
    """``run_steps`` on the model as it is, or on its private version under ``dp`` (where
    per-sample clipping to ``dp.clip`` replaces ``max_grad_norm``); ``desc`` names its
    progress bar on a terminal."""
    torch.manual_seed(seed)  # dropout masks and Poisson samples: a seeded run repeats exactly
    history = [tuple(h) for h in history or []]
    if dp is not None:
        with private(
            model,
            optimizer,
            tokenizer,
            data,
            dp=dp,
            history=history,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            device=device,
        ) as run:
            stats = run_steps(
                run.model,
                run.optimizer,
                with_progress(run.batches(steps), steps, desc),
                data.loss,
                device=device,
                autocast=False,
                on_empty=run.mark_empty,  # DP-SGD has always run in fp32
            )
        return stats, run.history()
    model.train()
    try:
        batches = with_progress(
            _seeded_batches(tokenizer, data, steps, batch_size, max_length, seed, device), steps, desc
        )
        return run_steps(model, optimizer, batches, data.loss, device=device, max_grad_norm=max_grad_norm), history
    finally:
        model.eval()


def adamw(model: nn.Module, lr: float, head_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW on the parameters that require grad; with ``head_lr`` the head modules (the
    adapter spec's, e.g. the classifier) in a group of their own at that rate."""
    spec = getattr(model, "fedlora_spec", None)
    heads = spec.head_modules if spec is not None and head_lr is not None else ()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    head = [p for name, p in trained if head_module(name, heads)]
    rest = [p for name, p in trained if not head_module(name, heads)]
    groups = [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)


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
    dp: DPPlan | None = None,
    history: History | None = None,
    head_lr: float | None = None,
) -> tuple[TrainStats, History]:
    """AdamW on the parameters that require grad, for a fixed number of steps; under ``dp``
    DP-SGD (AdamW on the privatized gradient). ``head_lr``: the head modules' own rate.
    Returns the stats and the privacy history with these steps added (unchanged without ``dp``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, lr, head_lr)
    before = [p.detach().clone() for p in params] if dp is not None else []
    stats, history = _run(
        model,
        optimizer,
        tokenizer,
        data,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        device=device,
        max_grad_norm=max_grad_norm,
        dp=dp,
        history=history,
    )
    if dp is not None and stats.examples and all(torch.equal(b, p) for b, p in zip(before, params, strict=True)):
        raise RuntimeError("DP training left every adapter parameter unchanged (Opacus hooks not attached?)")
    return stats, history


def weight_gradients(
    model: nn.Module,
    tokenizer,
    data: LocalData,
    *,
    batches: int,
    batch_size: int,
    max_length: int,
    seed: int,
    device: torch.device | str = "cpu",
    dp: DPPlan | None = None,
    history: History | None = None,
) -> tuple[dict[str, torch.Tensor], History]:
    """Mean gradient of the loss with respect to each adapted module's full base weight
    over ``batches`` batches, and the privacy history.

    Fed-SB's LoRA-SB initialisation takes its truncated SVD; adapters and everything else
    stay frozen. Under ``dp`` each batch's gradient is clipped per sample and noised like
    any DP-SGD step, and accounted. A quantized base layer is swapped for an fp32
    ``nn.Linear`` holding its dequantized weight while this runs: the gradient is exact for
    the weight the layer computes with, and DP's per-sample clipping sees a plain layer.
    """
    quantized = {name: m.base_layer for name, m in lora_modules(model).items() if is_quantized(m.base_layer)}
    try:
        for name, layer in quantized.items():
            model.get_submodule(name).base_layer = plain_linear(layer)
        return _base_weight_gradients(
            model,
            tokenizer,
            data,
            batches=batches,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            device=device,
            dp=dp,
            history=history,
        )
    finally:
        for name, layer in quantized.items():
            model.get_submodule(name).base_layer = layer


def _base_weight_gradients(
    model: nn.Module,
    tokenizer,
    data: LocalData,
    *,
    batches: int,
    batch_size: int,
    max_length: int,
    seed: int,
    device: torch.device | str,
    dp: DPPlan | None,
    history: History | None,
) -> tuple[dict[str, torch.Tensor], History]:
    weights = {name: m.base_layer.weight for name, m in lora_modules(model).items()}
    for p in model.parameters():
        p.requires_grad = False
    for w in weights.values():
        w.requires_grad = True
        w.grad = None
    summed = GradientSum(weights.values())
    try:
        _, history = _run(
            model,
            summed,
            tokenizer,
            data,
            steps=batches,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            device=device,
            max_grad_norm=None,
            dp=dp,
            history=history,
            desc="initialisation gradient",
        )
        # left on the training device: the client's sketch (an SVD per module) runs there too
        return {name: (summed.total(w) / batches).to(torch.float32) for name, w in weights.items()}, history
    finally:
        for w in weights.values():
            w.requires_grad = False
            w.grad = None


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
