"""Sample-level differential privacy on a client: Opacus DP-SGD with Poisson sampling.

A client keeps one accountant for its whole life: its history of (noise multiplier,
sample rate, steps) travels in the node's state between rounds, and epsilon is always
recomputed from that history. The noise multiplier is fixed up front from the planned
total number of steps, so the final epsilon stays at or under the target; a round that
would push it over is declined before any data is touched.

DP is a wrapper, not a second training loop: ``private`` makes a model, its optimizer
and a Poisson loader private with Opacus, fedlora's one loop (``training.run_steps``)
trains with them, and on the way out the model is a plain module again.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    from fedlora.ml.training import Batch, LocalData  # training imports this module

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
    from opacus.accountants.utils import get_noise_multiplier  # lazy: startup

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
    from opacus.accountants import RDPAccountant  # lazy: startup

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


@dataclass
class PrivateRun:
    """What the training loop runs on under DP: Opacus's wrapped model and optimizer."""

    model: GradSampleModule  # per-sample gradients in the backward pass
    optimizer: DPOptimizer  # clip per sample, noise, scale, account, then the wrapped optimizer's step
    loader: DataLoader  # Poisson-sampled batches
    accountant: RDPAccountant
    device: torch.device | str

    def batches(self, steps: int) -> Iterator[Batch]:
        """``steps`` Poisson-sampled batches, cycling over the loader's epochs."""
        done = 0
        while done < steps:
            for ids, mask, labels in self.loader:
                yield {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}, labels.to(self.device)
                done += 1
                if done == steps:  # checked before the loader draws another sample
                    return

    def mark_empty(self) -> None:
        _mark_empty_batch(self.optimizer.params)

    def history(self) -> History:
        return [tuple(h) for h in self.accountant.history]


@contextlib.contextmanager
def private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    data: LocalData,
    *,
    dp: DPPlan,
    history: History,
    batch_size: int,
    max_length: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> Iterator[PrivateRun]:
    """``model``, ``optimizer`` and a Poisson loader over ``data`` made private with Opacus,
    accounting on from ``history``. On the way out, whatever happened, ``model`` is a plain
    module again in eval mode: the cached model serves other clients next."""
    from opacus import PrivacyEngine  # lazy: startup

    loader = _loader(tokenizer, data, batch_size, max_length)
    wrapped = None
    try:
        model.train()  # Opacus validates the model in training mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG; we seed for reproducible research runs
            engine = PrivacyEngine(accountant="rdp")
            engine.accountant.history = [tuple(h) for h in history]
            wrapped, dp_optimizer, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.clip,
                poisson_sampling=True,
                grad_sample_mode="hooks",
                noise_generator=torch.Generator(device=device).manual_seed(
                    seed
                ),  # noise is drawn on the parameters' device
            )
        yield PrivateRun(wrapped, dp_optimizer, dp_loader, engine.accountant, device)
    finally:
        if wrapped is not None:
            wrapped.to_standard_module()  # hooks and per-sample gradients gone
        for group in optimizer.param_groups:
            for p in group["params"]:
                if hasattr(p, "summed_grad"):  # DPOptimizer's last clipped sum: a gradient's worth of memory
                    del p.summed_grad
        model.eval()
