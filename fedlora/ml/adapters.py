"""LoRA adapters built from plain nn.Linear pieces, injected into any torch model.

Every trainable piece is an ``nn.Linear`` so Opacus computes per-sample gradients
with its stock samplers. Adapter state is a flat dict keyed by PEFT-style names
(``<module path>.lora_A.weight``, ``.lora_B.weight``, ``.lora_R.weight`` for Fed-SB,
plus the task head's own parameter names); the same names go over the wire, into
checkpoints and into the exported PEFT adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_R = "lora_R"
ROLE_HEAD = "head"


@dataclass(frozen=True)
class LoRASpec:
    """Shape of the adapters: rank, scaling numerator and which modules get one."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    with_r: bool = False  # Fed-SB: a trainable r x r matrix between A and B
    # task-head modules trained and shared in full beside the adapters
    head_modules: tuple[str, ...] = ("classifier", "score")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _adapter_dtype(base_layer: nn.Linear) -> tuple[torch.dtype, torch.device]:
    """The adapters' dtype and device: the base weight's, fp32 on a quantized (integer) one."""
    weight = base_layer.weight
    return (weight.dtype if weight.is_floating_point() else torch.float32), weight.device


class LoRALinear(nn.Module):
    """``base(x) + s * B(R(A(x)))`` with the base layer frozen; R only for Fed-SB.

    The base may be a quantized ``nn.Linear`` (``fedlora.ml.quantize``): its weight cannot
    take merged updates in place, so FLoRA's merged history rides beside it as the
    low-rank pair ``merged_B @ merged_A`` (buffers, None otherwise)."""

    def __init__(self, base_layer: nn.Linear, rank: int, scaling: float, with_r: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base_layer = base_layer
        self.scaling = scaling
        self.register_buffer("merged_A", None, persistent=False)
        self.register_buffer("merged_B", None, persistent=False)
        dtype, device = _adapter_dtype(base_layer)
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, dtype=dtype, device=device)
        self.lora_R = nn.Linear(rank, rank, bias=False, dtype=dtype, device=device) if with_r else None
        self.reset_adapter()
        for p in self.base_layer.parameters():
            p.requires_grad = False

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def reshape(self, rank: int, scaling: float, with_r: bool) -> None:
        """New adapter pieces of another rank (FLoRA's per-client ranks), re-initialised."""
        if rank == self.rank and with_r == (self.lora_R is not None):
            self.scaling = scaling
            return
        dtype, device = _adapter_dtype(self.base_layer)
        self.lora_A = nn.Linear(self.base_layer.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, self.base_layer.out_features, bias=False, dtype=dtype, device=device)
        self.lora_R = nn.Linear(rank, rank, bias=False, dtype=dtype, device=device) if with_r else None
        self.scaling = scaling
        self.reset_adapter()

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A Kaiming-uniform, B zero, so the adapter starts as a no-op."""
        bound = 1.0 / math.sqrt(self.lora_A.in_features)  # kaiming_uniform_(a=sqrt(5))
        with torch.no_grad():
            # drawn on the CPU: the same numbers whatever device the model is on
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
            if self.lora_R is not None:
                self.lora_R.weight.copy_(torch.eye(self.rank))

    def delta_weight(self) -> torch.Tensor:
        """The dense update this adapter adds to the base weight: s * B @ R @ A."""
        a = self.lora_A.weight
        if self.lora_R is not None:
            a = self.lora_R.weight @ a
        return self.scaling * (self.lora_B.weight @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(x)
        if self.lora_R is not None:
            h = self.lora_R(h)
        out = self.base_layer(x)
        if self.merged_A is not None:
            out = out + F.linear(F.linear(x, self.merged_A), self.merged_B)
        return out + self.scaling * self.lora_B(h)


def matches_target(module_name: str, targets: Iterable[str]) -> bool:
    """A target names a module by its last path parts: ``query`` or ``pooler.dense``."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Replace every ``nn.Linear`` whose leaf name is in ``spec.target_modules``.

    Returns the module paths that received an adapter; raises ValueError when a target
    names no ``nn.Linear`` of the model, since a typo (or a layer the model lacks, such
    as BERT's pooler under mean pooling) would otherwise silently train less.
    """
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    unmatched = [t for t in spec.target_modules if not any(matches_target(name, (t,)) for name in linear_names)]
    if unmatched:
        raise ValueError(f"target module(s) {unmatched} match no nn.Linear layer of the model")
    if not spec.target_modules:
        raise ValueError("no target modules: LoRA would train nothing but the head")
    targets = [(name, model.get_submodule(name)) for name in linear_names if matches_target(name, spec.target_modules)]
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(module, spec.rank, spec.scaling, spec.with_r))
    model.fedlora_spec = spec
    return [name for name, _ in targets]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def head_module(name: str, head_modules: Iterable[str]) -> str | None:
    """The head module a parameter belongs to (``bert.pooler.dense.weight`` -> ``pooler``)."""
    for part in name.split(".")[:-1]:
        if part in head_modules:
            return part
    return None


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the task head that is trained and shared (per the injected LoRASpec)."""
    spec = getattr(model, "fedlora_spec", None)
    heads = spec.head_modules if spec is not None else LoRASpec.head_modules
    return [name for name, _ in model.named_parameters() if head_module(name, heads) is not None]


def role_of(name: str) -> str:
    for role in (ROLE_A, ROLE_B, ROLE_R):
        if name.endswith(f".{role}.weight"):
            return role
    return ROLE_HEAD


def module_of(name: str) -> str:
    """``a.b.query.lora_A.weight`` -> ``a.b.query``."""
    return name.rsplit(".", 2)[0]


def adapter_state(model: nn.Module, roles: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Adapter and head tensors (detached CPU fp32 copies), optionally only some roles."""
    wanted = set(roles) if roles is not None else {ROLE_A, ROLE_B, ROLE_R, ROLE_HEAD}
    head = set(head_parameter_names(model))
    state = {}
    for name, p in model.named_parameters():
        role = role_of(name)
        is_adapter = role != ROLE_HEAD or name in head
        if is_adapter and role in wanted:
            state[name] = p.detach().to("cpu", torch.float32).clone()
    return state


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into the model's adapter/head parameters; names and shapes must match."""
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if name not in params:
            raise KeyError(f"model has no adapter parameter {name!r}")
        target = params[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.device, target.dtype))


def set_trainable(model: nn.Module, roles: Iterable[str]) -> None:
    """Freeze everything, then unfreeze the adapter/head parameters of the given roles."""
    roles = set(roles)
    head = set(head_parameter_names(model))
    for name, p in model.named_parameters():
        if ".base_layer." in name:
            p.requires_grad = False
        elif name in head:
            p.requires_grad = ROLE_HEAD in roles
        else:
            p.requires_grad = role_of(name) in roles and role_of(name) != ROLE_HEAD


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    for name, module in list(lora_modules(model).items()):
        base = module.base_layer
        if not base.weight.is_floating_point():
            raise ValueError(
                f"{name}: cannot merge an adapter into a quantized base weight; load the base in full precision"
            )
        base.weight += module.delta_weight().to(base.weight.dtype)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, base)


def reset_adapters(model: nn.Module, generator: torch.Generator | None = None) -> None:
    for module in lora_modules(model).values():
        module.reset_adapter(generator)


def reshape_adapters(model: nn.Module, spec: LoRASpec) -> None:
    """Make every adapter of ``model`` match ``spec``'s rank and R (a no-op when it does)."""
    for module in lora_modules(model).values():
        module.reshape(spec.rank, spec.scaling, spec.with_r)
    model.fedlora_spec = spec


@torch.no_grad()
def set_base_updates(model: nn.Module, pairs: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Base weight of each adapted module := its pretrained value + Σ B_t·A_t over its
    ``pairs`` (or + 0): FLoRA's merged history. A full-precision weight takes the sum in
    place (formed in float64, as ``set_base_deltas`` receives it); a quantized one stays as
    it is and its module adds x·(ΣB_t A_t)ᵀ through the stacked pair, exactly."""
    dense = {}
    for name, module in lora_modules(model).items():
        if not module.base_layer.weight.is_floating_point():
            stacked = pairs.get(name)
            device = module.lora_A.weight.device
            module.merged_B = None if not stacked else torch.cat([b for b, _ in stacked], 1).to(device, torch.float32)
            module.merged_A = None if not stacked else torch.cat([a for _, a in stacked], 0).to(device, torch.float32)
        elif name in pairs:
            dense[name] = sum(b.to(torch.float64) @ a.to(torch.float64) for b, a in pairs[name]).to(torch.float32)
    set_base_deltas(model, dense)


@torch.no_grad()
def set_base_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Base weight of each adapted module := its pretrained value + ``deltas[module]`` (or + 0).

    The pretrained value is kept on the layer the first time, so one cached model can
    serve clients that merged different histories (FLoRA).
    """
    for name, module in lora_modules(model).items():
        weight = module.base_layer.weight
        if not weight.is_floating_point():  # quantized: set_base_updates keeps its history beside it
            continue
        if not hasattr(module, "pretrained_weight"):
            if name not in deltas:
                continue
            module.pretrained_weight = weight.detach().clone()
        base = module.pretrained_weight
        weight.copy_(base + deltas[name].to(weight.device, weight.dtype) if name in deltas else base)
