"""Fed-SB: clients train only an r x r matrix R between frozen A and B (LoRA-SB).

The dense update s * B @ R @ A is linear in R, so the weighted mean of R is exact, and
each client sends r² numbers per module whatever the number of clients.

LoRA-SB initialises A, B and R from a truncated SVD of an approximate first full-weight
update, ΔW ≈ -η ∇W. Here that gradient is federated: each client computes it on its
own data and sends it (under DP when DP is on); the server takes the data-weighted
mean and the SVD. No data leaves a client and none is pooled (the public Fed-SB code
computes it centrally on the union of all clients' data).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_R, LoRASpec, role_of
from fedlora.strategies.base import AdapterStrategy, ClientUpdate, Shape, State, weighted_mean, weights, with_rank

GRAD_SUFFIX = ".grad"


class FedSB(AdapterStrategy):
    name = "fedsb"
    trained_roles = (ROLE_R, ROLE_HEAD)
    frozen_roles = (ROLE_A, ROLE_B)
    needs_init = True

    def __init__(self, spec: LoRASpec, init_step: float = 1e-3):
        super().__init__(with_rank(spec, spec.rank, with_r=True))
        self.init_step = init_step

    def client_spec(self, rank: int | None = None) -> LoRASpec:
        return self.spec

    def setup(self, initial_state: State) -> State:
        state = super().setup(initial_state)
        for m in self.module_shapes:
            state[f"{m}.{ROLE_R}.weight"] = torch.zeros(self.spec.rank, self.spec.rank)
        return state

    def init_request(self, global_state: State) -> State:
        """What clients need to compute the initialisation gradient: the head."""
        return {n: t for n, t in global_state.items() if role_of(n) == ROLE_HEAD}

    def expected_init_shapes(self) -> dict[str, Shape]:
        return {f"{m}{GRAD_SUFFIX}": shape for m, shape in self.module_shapes.items()}

    def initialize(self, global_state: State, grads: Sequence[ClientUpdate]) -> State:
        """A, B, R0 from the truncated SVD of -η * (data-weighted mean gradient)."""
        ws = weights(grads)
        r, s = self.spec.rank, self.spec.scaling
        state = dict(global_state)
        for m in self.module_shapes:
            g = weighted_mean([u.state[f"{m}{GRAD_SUFFIX}"] for u in grads], ws).to(torch.float64)
            u_mat, sing, vh = torch.linalg.svd(-self.init_step * g, full_matrices=False)
            state[f"{m}.{ROLE_B}.weight"] = u_mat[:, :r].contiguous().to(torch.float32)
            state[f"{m}.{ROLE_A}.weight"] = vh[:r].contiguous().to(torch.float32)
            state[f"{m}.{ROLE_R}.weight"] = (torch.diag(sing[:r]) / s).to(torch.float32)
        return state
