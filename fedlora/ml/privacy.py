"""Sample-level differential privacy on a client: Opacus DP-SGD with Poisson sampling.

A client keeps one accountant for its whole life: its history of (noise multiplier,
sample rate, steps) travels in the node's state between rounds, and epsilon is always
recomputed from that history. The noise multiplier is fixed up front from the planned
total number of steps, so the final epsilon stays at or under the target; a round that
would push it over is declined before any data is touched.

The accountant is Opacus's PRV accountant (Gopi et al. 2021: the privacy loss composed
numerically, reported as its upper bound), which is tight; RDP (Opacus's default) is a
valid but looser bound, and stays as ``--dp-accountant rdp`` and as the tests' cross-check.

DP is a wrapper, not a second training loop: ``private`` makes a model, its optimizer
and a Poisson loader private with Opacus, fedlora's one loop (``training.run_steps``)
trains with them, and on the way out the model is a plain module again.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    from fedlora.ml.training import Batch, LocalData  # training imports this module

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)
Steps = tuple[tuple[float, float, int], ...]  # a history as a cache key

# PRV: Opacus's defaults. The reported epsilon is the upper end of PRV's error bound: at
# most PRV_EPS_ERROR above the estimate, at delta less PRV_DELTA_ERROR of delta.
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR = 1e-3  # a share of delta
# PRV's grid grows with epsilon; past this many points (epsilon in the tens or hundreds,
# where the tightness no longer matters) RDP's bound is reported instead
PRV_MAX_GRID = 1 << 21
# planning: the noise is searched between these, to within a share of the target epsilon
NOISE_FLOOR, NOISE_CEILING = 0.1, 1e4
PLAN_TOLERANCE = 5e-3


@dataclass(frozen=True)
class DPPlan:
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float
    sample_rate: float
    accountant: str = "prv"  # prv or rdp: what plans the noise and reports epsilon


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The rate at which Opacus's Poisson loader samples each example: 1 / (batches per epoch)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def plan(
    epsilon: float,
    delta: float,
    clip: float,
    num_examples: int,
    batch_size: int,
    planned_steps: int,
    accountant: str = "prv",
) -> DPPlan:
    """The noise multiplier that keeps ``planned_steps`` steps at this sample rate within epsilon."""
    sample_rate = poisson_sample_rate(num_examples, batch_size)
    noise = noise_multiplier(epsilon, delta, sample_rate, planned_steps, accountant)
    return DPPlan(epsilon, delta, clip, noise, sample_rate, accountant)


@functools.lru_cache(maxsize=256)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The least noise (to within PLAN_TOLERANCE of epsilon) whose epsilon after ``steps``
    steps is at most ``epsilon``, by the accountant that will report it. Cached: every
    client plans every round."""
    if accountant == "rdp":  # Opacus's own search, as fedlora planned before PRV: the same figures
        from opacus.accountants.utils import get_noise_multiplier  # lazy: startup

        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
            )
        )

    def spent(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps)], delta, accountant)

    over, within = _bracket(spent, epsilon)
    return within[0] if over is None else _search(spent, epsilon, over, within)


Point = tuple[float, float]  # (noise multiplier, epsilon it spends)


def _bracket(spent: Callable[[float], float], epsilon: float) -> tuple[Point | None, Point]:
    """A noise level over budget and one within, a factor of two apart, from 1 up or down;
    no level over budget when even NOISE_FLOOR is within."""
    within = (1.0, spent(1.0))
    if within[1] > epsilon:
        while within[1] > epsilon:
            over, noise = within, 2 * within[0]
            if noise > NOISE_CEILING:
                raise ValueError(f"no noise multiplier up to {NOISE_CEILING:g} keeps within epsilon {epsilon}")
            within = (noise, spent(noise))
        return over, within
    while within[0] / 2 >= NOISE_FLOOR:
        lower = (within[0] / 2, spent(within[0] / 2))
        if lower[1] > epsilon:
            return lower, within
        within = lower
    return None, within


def _search(spent: Callable[[float], float], epsilon: float, over: Point, within: Point) -> float:
    """Regula falsi (Illinois) on log epsilon against log noise, aiming just inside the
    target: a handful of accountant calls. Only a noise level whose epsilon was computed
    within budget is ever returned."""
    aim = math.log(epsilon * (1 - PLAN_TOLERANCE / 2))
    x_over, f_over = math.log(over[0]), math.log(over[1]) - aim
    x_within, f_within, spent_within = math.log(within[0]), math.log(within[1]) - aim, within[1]
    side = 0
    while epsilon - spent_within > PLAN_TOLERANCE * epsilon and x_within - x_over > 1e-4:
        x = (x_over * f_within - x_within * f_over) / (f_within - f_over)
        if not x_over < x < x_within:  # an infinite or flat end: bisect
            x = (x_over + x_within) / 2
        e = spent(math.exp(x))
        if e <= epsilon:
            x_within, f_within, spent_within = x, math.log(e) - aim, e
            f_over, side = (f_over / 2 if side == -1 else f_over), -1
        else:
            x_over, f_over = x, math.log(e) - aim
            f_within, side = (f_within / 2 if side == 1 else f_within), 1
    return math.exp(x_within)


def planned_steps(rounds: int, local_steps: int, init_batches: int = 0) -> int:
    """Every step a client may take over the run, if it were sampled every round."""
    return rounds * local_steps + init_batches


def epsilon_of(history: History, delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by a history of DP-SGD steps: PRV's upper bound (or RDP's where PRV's
    grid would be too large), or RDP's with ``accountant="rdp"``. Any mix of noise
    multipliers and sample rates composes."""
    if accountant not in ("prv", "rdp"):
        raise ValueError(f"unknown DP accountant {accountant!r}: choose prv or rdp")
    steps = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not steps:
        return 0.0
    return _epsilon(steps, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(steps: Steps, delta: float, accountant: str) -> float:
    """Cached: a client asks for the same history's epsilon several times a round."""
    if accountant == "rdp":
        return rdp_epsilon(steps, delta)
    return min(prv_epsilon(steps, delta), rdp_epsilon(steps, delta))  # both bound the same loss


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise: float, sample_rate: float) -> np.ndarray:
    """One step's Renyi DP at Opacus's orders: the costly part of RDP, once per (noise, rate)."""
    from opacus.accountants import RDPAccountant  # lazy: startup
    from opacus.accountants.analysis import rdp  # lazy: startup

    return np.asarray(
        rdp.compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )


def rdp_epsilon(steps: Steps, delta: float) -> float:
    """Opacus's RDPAccountant.get_epsilon, with each (noise, rate)'s orders computed once."""
    from opacus.accountants import RDPAccountant  # lazy: startup
    from opacus.accountants.analysis import rdp  # lazy: startup

    orders = RDPAccountant.DEFAULT_ALPHAS
    total = sum([_rdp_per_step(s, q) * n for s, q, n in steps])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the smallest alpha": epsilon is then huge anyway
        return float(rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)[0])


def prv_epsilon(steps: Steps, delta: float) -> float:
    """Opacus's PRVAccountant.get_epsilon (the upper bound), with the RDP that sizes its grid
    computed once per (noise, rate); infinite where the grid would pass PRV_MAX_GRID."""
    from opacus.accountants.analysis import prv  # lazy: startup

    eps_error, delta_error = PRV_EPS_ERROR, delta * PRV_DELTA_ERROR
    total = sum(n for _, _, n in steps)
    # the truncation and the mesh as in PRVAccountant._get_domain and compute_safe_domain_size
    half_width = rdp_epsilon(steps, delta_error / 4)
    for s, q, _ in steps:
        half_width = max(half_width, rdp_epsilon(((s, q, 1),), delta_error / (8 * total)))
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    if not math.isfinite(half_width) or 2 * half_width / mesh > PRV_MAX_GRID:
        return math.inf
    domain = prv.Domain.create_aligned(-half_width, half_width, mesh)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # log(1 - q) at q = 1; tails
        losses = [prv.PoissonSubsampledGaussianPRV(q, s) for s, q, _ in steps]
        truncated = [prv.TruncatedPrivacyRandomVariable(loss, domain.t_min, domain.t_max) for loss in losses]
        discrete = [prv.discretize(t, domain) for t in truncated]
        composed = prv.compose_heterogeneous(dprvs=discrete, num_self_compositions=[n for _, _, n in steps])
        upper = composed.compute_epsilon(delta, delta_error, eps_error)[2]
    return float(upper) if math.isfinite(upper) else math.inf


def with_steps(history: History, dp: DPPlan, steps: int) -> History:
    """The history after ``steps`` more steps (consecutive identical entries merged, as Opacus does)."""
    history = [tuple(h) for h in history]
    if history and history[-1][0] == dp.noise_multiplier and history[-1][1] == dp.sample_rate:
        last = history.pop()
        return history + [(last[0], last[1], last[2] + steps)]
    return history + [(dp.noise_multiplier, dp.sample_rate, steps)]


def would_exceed(history: History, dp: DPPlan, steps: int) -> bool:
    """Whether ``steps`` more steps would take this history past the plan's epsilon (exactly
    the figure that would then be reported: the same accountant, the same history)."""
    return epsilon_of(with_steps(history, dp, steps), dp.delta, dp.accountant) > dp.epsilon


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
            engine = PrivacyEngine(accountant="rdp")  # keeps the history only: epsilon_of reads it
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
