"""Sample-level differential privacy on a client: Opacus DP-SGD with Poisson sampling.

A client keeps one accountant for its whole life: its history of (noise multiplier,
sample rate, steps) travels in the node's state between rounds, and epsilon is always
recomputed from that history. The noise multiplier is fixed up front from the planned
total number of steps, so the final epsilon stays at or under the target; a round that
would push it over is declined before any data is touched.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlora.training import LocalData, TrainStats

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


@dataclass(frozen=True)
class DPPlan:
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float
    sample_rate: float


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The rate at which Opacus's Poisson loader samples each example: 1 / (batches per epoch)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def plan(epsilon: float, delta: float, clip: float, num_examples: int, batch_size: int, planned_steps: int) -> DPPlan:
    """The noise multiplier that keeps ``planned_steps`` steps at this sample rate within epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate = poisson_sample_rate(num_examples, batch_size)
    noise = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=planned_steps, accountant="rdp"
    )
    return DPPlan(epsilon, delta, clip, float(noise), sample_rate)


def planned_steps(rounds: int, local_steps: int, init_batches: int = 0) -> int:
    """Every step a client may take over the run, if it were sampled every round."""
    return rounds * local_steps + init_batches


def epsilon_of(history: History, delta: float) -> float:
    """Epsilon spent by a history of DP-SGD steps, recomputed with Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


def with_steps(history: History, dp: DPPlan, steps: int) -> History:
    """The history after ``steps`` more steps (consecutive identical entries merged, as Opacus does)."""
    history = [tuple(h) for h in history]
    if history and history[-1][0] == dp.noise_multiplier and history[-1][1] == dp.sample_rate:
        last = history.pop()
        return history + [(last[0], last[1], last[2] + steps)]
    return history + [(dp.noise_multiplier, dp.sample_rate, steps)]


def would_exceed(history: History, dp: DPPlan, steps: int) -> bool:
    return epsilon_of(with_steps(history, dp, steps), dp.delta) > dp.epsilon * (1 + 1e-9)


def _loader(tokenizer, data: LocalData, batch_size: int, max_length: int) -> DataLoader:
    """Fixed-length rows (Poisson batches vary in size); Opacus's Poisson sampler draws from
    torch's global generator, which the callers seed."""
    inputs, targets = data.batch(tokenizer, range(len(data)), max_length, pad_to_max=True)
    return DataLoader(TensorDataset(inputs["input_ids"], inputs["attention_mask"], targets), batch_size=batch_size)


def _mark_empty_batch(params: list[nn.Parameter]) -> None:
    """An empty Poisson batch is still a step (noise only); Opacus needs per-sample
    gradients for it, so give each parameter zero samples."""
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))


def _batches(loader: DataLoader, steps: int, device: torch.device | str = "cpu"):
    """``steps`` Poisson-sampled batches, cycling over the loader's epochs."""
    done = 0
    while done < steps:
        for batch in loader:
            yield [t.to(device) for t in batch]
            done += 1
            if done == steps:
                return


def _make_private(model: nn.Module, optimizer, loader: DataLoader, dp: DPPlan, history: History, seed: int, device):
    from opacus import PrivacyEngine

    model.train()  # Opacus validates the model in training mode
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG; we seed for reproducible research runs
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip,
            poisson_sampling=True,
            grad_sample_mode="hooks",
            noise_generator=torch.Generator(device=device).manual_seed(seed),  # noise is drawn on the parameters' device
        )
    return engine, private_model, private_optimizer, private_loader


def private_train(
    model: nn.Module,
    tokenizer,
    data: LocalData,
    *,
    dp: DPPlan,
    history: History,
    steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[TrainStats, History]:
    """DP-SGD (AdamW on the privatized gradient) for ``steps`` steps; returns the new history."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    engine, private_model, private_optimizer, loader = _make_private(
        model, optimizer, _loader(tokenizer, data, batch_size, max_length), dp, history, seed, device
    )
    start, total_loss, seen, tokens = time.perf_counter(), 0.0, 0, 0
    before = [p.detach().clone() for p in params]
    private_model.train()
    try:
        for step, (ids, mask, labels) in enumerate(_batches(loader, steps, device)):
            private_optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:
                _mark_empty_batch(params)
                private_optimizer.step()
                continue
            loss = data.loss(private_model(input_ids=ids, attention_mask=mask).logits, labels)
            loss.backward()
            private_optimizer.step()
            if step == 0 and all(torch.equal(b, p) for b, p in zip(before, params)):
                raise RuntimeError("DP step left every adapter parameter unchanged (Opacus hooks not attached?)")
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            tokens += int(mask.sum().item())
    finally:
        private_model._close()  # remove Opacus hooks: the cached model serves other clients next
        model.eval()
    new_history = [tuple(h) for h in engine.accountant.history]
    return TrainStats(total_loss / max(seen, 1), seen, steps, time.perf_counter() - start, tokens), new_history


def private_gradients(
    model: nn.Module,
    tokenizer,
    data: LocalData,
    *,
    dp: DPPlan,
    history: History,
    batches: int,
    batch_size: int,
    max_length: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], History]:
    """Mean privatized gradient of each adapted module's full base weight (Fed-SB's
    initialisation), clipped per sample and noised like any DP-SGD step, and accounted."""
    from fedlora.adapters import lora_modules

    modules = lora_modules(model)
    for p in model.parameters():
        p.requires_grad = False
    weights = {name: m.base_layer.weight for name, m in modules.items()}
    for w in weights.values():
        w.requires_grad = True
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(list(weights.values()), lr=0.0)
    engine, private_model, private_optimizer, loader = _make_private(
        model, optimizer, _loader(tokenizer, data, batch_size, max_length), dp, history, seed, device
    )
    sums = {name: torch.zeros_like(w) for name, w in weights.items()}
    private_model.train()
    try:
        for ids, mask, labels in _batches(loader, batches, device):
            private_optimizer.zero_grad(set_to_none=True)
            if len(labels):
                data.loss(private_model(input_ids=ids, attention_mask=mask).logits, labels).backward()
            else:
                _mark_empty_batch(list(weights.values()))
            private_optimizer.pre_step()  # clip, noise, scale: p.grad is now the private gradient
            for name, w in weights.items():
                if w.grad is not None:
                    sums[name] += w.grad
    finally:
        private_model._close()
        for w in weights.values():
            w.requires_grad = False
            w.grad = None
        model.eval()
    grads = {name: (s / batches).detach().to(torch.float32) for name, s in sums.items()}  # on the device, for the sketch
    return grads, [tuple(h) for h in engine.accountant.history]
