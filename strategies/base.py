"""The pure interface every aggregation strategy implements: tensors in, tensors out.

A strategy decides what each client trains and sends, what the server sends down
(every round, and once or on catch-up), and how updates combine. Its global state is
a flat dict of named tensors, like every adapter state in fedlora.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.ml.adapters import (
    ROLE_A,
    ROLE_B,
    ROLE_HEAD,
    ROLE_R,
    LoRASpec,
    load_adapter_state,
    module_of,
    role_of,
    set_base_updates,
)
from fedlora.strategies.combine import Combine

State = dict[str, torch.Tensor]
Shape = tuple[int | None, ...]  # None: a free dimension (a client-chosen rank)

MERGED = re.compile(r"^merged\.(\d+)\.(.+)$")


class UpdateRejected(ValueError):
    """A client update that does not fit the strategy; the message is the reason."""


@dataclass
class ClientUpdate:
    """What one client sent back: the tensors of the roles it trained, and its data size."""

    client_id: int
    state: State
    num_examples: int


@dataclass
class Aggregate:
    state: State  # the new global state
    error: float  # relative Frobenius error of the global update vs the exact weighted mean


def weights(updates: Sequence[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def weighted_mean_f64(tensors: Sequence[torch.Tensor], ws: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, ws):
        out.add_(t, alpha=w)
    return out


def weighted_mean(tensors: Sequence[torch.Tensor], ws: Sequence[float]) -> torch.Tensor:
    return weighted_mean_f64(tensors, ws).to(torch.float32)


def dense_factors(state: Mapping[str, torch.Tensor], module: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B·R, A) in float64 for one adapted module: its dense update is their product."""
    a = state[f"{module}.{ROLE_A}.weight"].to(torch.float64)
    left = (alpha / a.shape[0]) * state[f"{module}.{ROLE_B}.weight"].to(torch.float64)
    r = state.get(f"{module}.{ROLE_R}.weight")
    if r is not None:
        left = left @ r.to(torch.float64)
    return left, a


def lora_deltas(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Per adapted module, the dense update (alpha/r) * B @ (R @) A the state encodes (float64)."""
    modules = sorted({module_of(n) for n in state if role_of(n) == ROLE_A and not n.startswith("merged.")})
    deltas = {}
    for m in modules:
        left, right = dense_factors(state, m, alpha)
        deltas[m] = left @ right
    return deltas


def relative_error(actual: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> float:
    """||actual - target||_F / ||target||_F over all modules together (0 when both are 0)."""
    num = sum(float(torch.sum((actual[k] - target[k]) ** 2)) for k in target)
    den = sum(float(torch.sum(target[k] ** 2)) for k in target)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def mean_of_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], ws: Sequence[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * d[k] for d, w in zip(deltas, ws)) for k in deltas[0]}


def exact_means(updates: Sequence[ClientUpdate], ws: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of every tensor the clients sent, in float64."""
    return {name: weighted_mean_f64([u.state[name] for u in updates], ws) for name in updates[0].state}


def gram_error(terms: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]) -> float:
    """Relative Frobenius error of dense updates L·X·R against L·X*·R, computed in the small space.

    Each term is (X stored, X* exact, LᵀL or None for the identity, R Rᵀ), per module:
    ||L D R||² = tr(Dᵀ LᵀL D R Rᵀ), so no d_out x d_in product is ever formed.
    """
    num = den = 0.0
    for stored, exact, gram_left, gram_right in terms:
        diff = stored.to(torch.float64) - exact
        for x, acc in ((diff, "num"), (exact, "den")):
            left = x if gram_left is None else gram_left @ x
            value = float(torch.sum((left @ gram_right) * x))
            if acc == "num":
                num += value
            else:
                den += value
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return max(num, 0.0) ** 0.5 / den**0.5


def merged_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """FLoRA's history (``merged.<round>.<module>.lora_A/B.weight``): per module its (B, A) pairs."""
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, a in state.items():
        match = MERGED.match(name)
        if not match or role_of(name) != ROLE_A:
            continue
        b = state[name[: -len(f"{ROLE_A}.weight")] + f"{ROLE_B}.weight"]
        pairs.setdefault(module_of(match.group(2)), []).append((b, a))
    return pairs


def merged_deltas(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLoRA's history summed per module, in float64."""
    return {m: sum(b.to(torch.float64) @ a.to(torch.float64) for b, a in ps) for m, ps in merged_pairs(state).items()}


def held_digest(strategy: AdapterStrategy, state: Mapping[str, torch.Tensor]) -> str:
    """Which persistent tensors (frozen A/B, merge history) a state holds, by name and shape:
    the coordinator sends the digest of what a client should hold once it has merged the
    message, and a client whose own differs (a restarted agent) asks to be sent it all."""
    names = sorted(f"{n}{tuple(t.shape)}" for n, t in state.items() if strategy.is_persistent(n))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class AdapterStrategy:
    """One federated LoRA algorithm, free of Flower."""

    name: str = ""
    trained_roles: tuple[str, ...] = (ROLE_A, ROLE_B, ROLE_HEAD)
    frozen_roles: tuple[str, ...] = ()  # sent once to each client, kept by it
    # the dense update is linear in every tensor clients send, so any entry-wise combination
    # of them (a robust median, a masked sum) is a combination of the clients' dense updates
    linear: bool = False
    combine: Combine = Combine()  # how the kept updates combine (--robust-aggregate)

    def __init__(self, spec: LoRASpec):
        self.spec = spec
        self.module_shapes: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_config(cls, spec: LoRASpec, cfg: RunConfig) -> AdapterStrategy:
        """The strategy a run's settings ask for; override to read more than the adapter shape."""
        return cls(spec)

    # ----- shapes and state -------------------------------------------------------
    def client_spec(self, rank: int | None = None) -> LoRASpec:
        """The adapter shape a client trains; a ``PerClientRank`` strategy honours ``rank``."""
        return self.spec

    def setup(self, initial_state: State) -> State:
        """Record module shapes; return the round-0 global state."""
        for name, t in initial_state.items():
            if role_of(name) == ROLE_A:
                self.module_shapes[module_of(name)] = (0, t.shape[1])
        for name, t in initial_state.items():
            if role_of(name) == ROLE_B:
                m = module_of(name)
                self.module_shapes[m] = (t.shape[0], self.module_shapes[m][1])
        return dict(initial_state)

    @property
    def sent_roles(self) -> tuple[str, ...]:
        return self.trained_roles

    def is_persistent(self, name: str) -> bool:
        """Tensors a client keeps between rounds once received (frozen roles, merge history)."""
        return role_of(name) in self.frozen_roles or name.startswith("merged.")

    def hold(self, held: State, received: State) -> State:
        """What a client keeps after receiving ``received`` on top of ``held``."""
        return {**held, **{n: t for n, t in received.items() if self.is_persistent(n)}}

    def broadcast(self, global_state: State) -> State:
        """What every sampled client receives each round."""
        return {n: t for n, t in global_state.items() if not self.is_persistent(n)}

    def catch_up(self, global_state: State, last_seen: int | None) -> State:
        """What a client that last synced at round ``last_seen`` (None: never) still lacks."""
        if last_seen is not None:
            return {}
        return {n: t for n, t in global_state.items() if role_of(n) in self.frozen_roles}

    def expected_update_shapes(self, global_state: State) -> dict[str, Shape]:
        """Names and shapes a valid client update must carry."""
        return {
            n: tuple(t.shape)
            for n, t in global_state.items()
            if role_of(n) in self.sent_roles and not n.startswith("merged.")
        }

    def check_update(self, tensors: State) -> None:
        """Strategy-specific checks beyond names and shapes; raise UpdateRejected."""

    # ----- bounding one client's influence ------------------------------------------------
    def effect_norm(self, global_state: State, tensors: State) -> float:
        """How far an update moves the model: per adapted module the Frobenius norm of the
        change of the dense s·B·(R·)A, at the rank and scaling the client used, plus the
        change of each head tensor. Measured through r x r Gram matrices: no d_out x d_in
        product is formed."""
        current = {n: t for n, t in global_state.items() if not n.startswith("merged.")}
        client = {**current, **tensors}
        total = 0.0
        for m in sorted({module_of(n) for n in client if role_of(n) == ROLE_A}):
            left, right = dense_factors(client, m, self.spec.alpha)
            if f"{m}.{ROLE_A}.weight" in current:  # minus what the global state already does
                left_g, right_g = dense_factors(current, m, self.spec.alpha)
                left, right = torch.cat([left, -left_g], 1), torch.cat([right, right_g], 0)
            total += float(torch.sum((left.T @ left) * (right @ right.T)))
        for name, t in tensors.items():
            if role_of(name) == ROLE_HEAD:
                ref = current.get(name)
                diff = t if ref is None or ref.shape != t.shape else t - ref
                total += float(torch.sum(diff.to(torch.float64) ** 2))
        return max(total, 0.0) ** 0.5

    def shrink(self, global_state: State, tensors: State, factor: float) -> State:
        """The update moved ``factor`` of the way back to the global state (a clipped update)."""
        out = {}
        for name, t in tensors.items():
            ref = global_state.get(name)
            out[name] = t * factor if ref is None or ref.shape != t.shape else ref + (t - ref) * factor
        return out

    # ----- client side ----------------------------------------------------------------
    def prepare_client_model(self, model: nn.Module, state: State, seed: int) -> None:
        """Put the global state into a client's model before local training."""
        self.materialize(model, state)

    def materialize(self, model: nn.Module, state: State) -> None:
        """Load a global state into a model (base-weight merges included) for use or evaluation."""
        set_base_updates(model, merged_pairs(state))
        load_adapter_state(model, {n: t for n, t in state.items() if not n.startswith("merged.")})

    # ----- server side ----------------------------------------------------------------
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate], round_num: int = 1) -> Aggregate:
        """Combine the clients' updates into the next global state: by default the
        weighted mean of every tensor they sent, exact when the dense update is linear in it;
        a robust ``combine`` trades that exactness for a bounded minority's influence, and
        the error against the weighted mean is what ``aggregation_error`` reports."""
        ws = weights(updates)
        means = exact_means(updates, ws)
        combined = (
            means
            if self.combine.is_mean
            else {name: self.combine([u.state[name] for u in updates], ws) for name in updates[0].state}
        )
        new_state = {**global_state, **{n: t.to(torch.float32) for n, t in combined.items()}}
        return Aggregate(new_state, self.aggregation_error(global_state, new_state, updates, ws, means))

    def aggregation_error(
        self, global_state: State, new_state: State, updates: Sequence[ClientUpdate], ws: Sequence[float], means: State
    ) -> float:
        """Relative error of the global dense update against Σ p_k ΔW_k, from the clients' own products."""
        target = self.exact_target(global_state, updates, ws)
        return relative_error(lora_deltas(new_state, self.spec.alpha), target)

    def export_adapter(self, global_state: State) -> tuple[State, float]:
        """The global state as one standard LoRA (A, B, head) and its scaling, for PEFT export."""
        state = {n: t for n, t in global_state.items() if not n.startswith("merged.")}
        for name in list(state):
            if role_of(name) == ROLE_R:  # Fed-SB: B @ R @ A as B' = B @ R
                b_name = f"{module_of(name)}.{ROLE_B}.weight"
                state[b_name] = state[b_name] @ state.pop(name)
        return state, self.spec.scaling

    def exact_target(
        self, global_state: State, updates: Sequence[ClientUpdate], ws: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        """The data-weighted mean of the clients' dense updates, Σ p_k ΔW_k."""
        return mean_of_deltas([lora_deltas({**global_state, **u.state}, self.spec.alpha) for u in updates], ws)


def with_rank(spec: LoRASpec, rank: int, with_r: bool | None = None) -> LoRASpec:
    return replace(spec, rank=rank, with_r=spec.with_r if with_r is None else with_r)


class PerClientRank:
    """A strategy whose clients may each train at their own LoRA rank (``--ranks``): a
    declaration the registry checks, with no methods of its own."""


class FederatedInit(ABC):
    """A strategy whose global adapters come from a round of client gradients before round 1.

    The bridge asks for ``init_request``, screens each reply (``check_init``,
    ``init_effect_norm``, ``shrink_init``) and calls ``initialize``; a client answers with
    ``init_reply`` of its full-weight gradients for ``init_batches`` batches.
    """

    @abstractmethod
    def init_request(self, global_state: State) -> State:
        """What clients receive for the initialisation round."""

    @abstractmethod
    def expected_init_shapes(self) -> dict[str, Shape]:
        """The tensor names and shapes a valid initialisation reply holds."""

    @abstractmethod
    def check_init(self, tensors: State) -> None:
        """Raise ``UpdateRejected`` unless ``tensors`` is a well-formed initialisation reply."""

    @abstractmethod
    def init_effect_norm(self, tensors: State) -> float:
        """How far this reply alone would move the model."""

    @abstractmethod
    def shrink_init(self, tensors: State, factor: float) -> State:
        """The reply with its effect scaled by ``factor`` (clipping)."""

    @abstractmethod
    def init_reply(self, grads: dict[str, torch.Tensor]) -> State:
        """A client's reply, from its mean full-weight gradients."""

    def guard_init(self, grads: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], list[tuple[ClientUpdate, str]]]:
        """With the defences on: the replies kept (possibly bounded further) and those left
        out, each with its reason; by default all are kept as they are."""
        return list(grads), []

    @abstractmethod
    def initialize(self, global_state: State, grads: Sequence[ClientUpdate]) -> State:
        """The global state after the initialisation round."""
